"""Train the world's text-to-video `WanPipeline` (transformer + text encoder) on procedural clips, on accelerate.

    python -m attn_pipelines.world.train_vae --out runs/world/vae
    python -m attn_pipelines.world.train_t2v --vae runs/world/vae/vae --out runs/world/t2v   # ~1 h, 1 thread
    python -m attn_pipelines.world.train_t2v --vae ... --out /tmp/t --steps 3 --clips 32     # smoke

Flow matching as Wan is trained: x_t = (1 - s) x0 + s noise, the transformer predicts noise - x0 at
timestep 1000 s (s logit-normal), on the frozen VAE's normalised latents of `--clips` clips
(encoded once, cached in `--out`). The text encoder (`UMT5EncoderModel`) trains with the
transformer; its embeddings are built exactly as `WanPipeline.encode_prompt` builds them (zeros
after the prompt's tokens, 512 positions), and 10% of captions are dropped to "" (the pipeline's
default negative prompt), so classifier-free guidance works. The saved weights are an EMA of the
trained ones. `--out` receives a diffusers pipeline directory (`pipeline/`, loadable with
`DiffusionPipeline.from_pretrained`), `train_config.json`, `metrics.json` and a resumable
`state.pt` (rerun the same command to continue).

Every `--eval-every` steps the EMA pipeline generates `accuracy.TRAIN_EVAL_PROMPTS` (24 one-object
prompts, seed 0, the CLI's defaults) and the attribute classifier reads them: the curve of colour,
shape, colour+shape and direction accuracy goes to `metrics.json` (`evals`) beside the loss, and the
EMA weights with the best `accuracy.selection_score` so far are saved as `best/` (a pipeline
directory like `pipeline/`): that is what `publish` ships by default.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

from .accuracy import TRAIN_EVAL_PROMPTS, accuracy, selection_score
from .common import ModuleEMA, RunRecords, Timer, atomic_save, cosine_schedule, environment, setup_threads
from .data import video_sample
from .models import (
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TRANSFORMER_CONFIG,
    VIDEO,
    build_pipeline,
    build_text_encoder,
    build_transformer,
    world_dir,
    world_tokenizer,
)
from .score import AttributeScorer

__all__ = ["cached_latents", "encode_captions", "latent_cache", "latent_dataset", "main"]

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default


def _tokens(tokenizer: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    t = tokenizer(
        [prompt_clean(c) for c in captions], padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    return t.input_ids, t.attention_mask


def encode_captions(
    tokenizer: Any, text_encoder: Any, captions: list[str], device: Any = "cpu", length: int = MAX_SEQUENCE_LENGTH
) -> torch.Tensor:
    """Prompt embeddings [B, length, D] as `WanPipeline._get_t5_prompt_embeds` makes them (length 512), with
    gradients; a shorter `length` keeps `length` positions (zeros past the prompt) for `PadWeightedCrossAttn`.

    The pipeline pads the ids to 512 and zeroes every position past the prompt; running the encoder
    on the padded-to-longest ids with the same attention mask gives the same values at the prompt's
    positions (masked keys and relative position buckets do not depend on the padding length)."""
    ids, mask = _tokens(tokenizer, captions)
    if ids.shape[1] >= length and length < MAX_SEQUENCE_LENGTH:
        raise ValueError(f"a caption of {ids.shape[1]} tokens leaves no padded position in {length}")
    ids, mask = ids.to(device), mask.to(device)
    h = text_encoder(ids, mask).last_hidden_state * mask[..., None].to(torch.float32)
    return torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[1]))


class PadWeightedCrossAttn:
    """Training-only cross-attention processor: the pipeline's 512 text positions, computed on fewer.

    `WanPipeline` pads prompt embeddings with zeros to 512 positions; every padded position gives the
    same key and value (the text projection of a zero vector), so attention over the 512 positions
    equals attention over the prompt plus ONE padded position whose logit carries + log(512 - L) (L the
    prompt's length). Training feeds the prompt plus `P - L` padded positions and adds
    log((512 - L) / (P - L)) to their logits: the same function as the saved model with diffusers'
    own `WanAttnProcessor` at inference (checked by `check_pad_weighting`), at a fraction of the cost.
    `bias` [B, 1, 1, P] is set by the training loop before each forward."""

    def __init__(self) -> None:
        self.bias: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None) -> torch.Tensor:  # fmt: skip
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def short_embeddings(tokenizer: Any, text_encoder: Any, captions: list[str], pad_to: int, device: Any = "cpu"):
    """(embeddings [B, pad_to, D] zero past each prompt, logit bias [B, 1, 1, pad_to]) for `PadWeightedCrossAttn`."""
    emb = encode_captions(tokenizer, text_encoder, captions, device, length=pad_to)
    lens = _tokens(tokenizer, captions)[1].sum(-1).to(emb.device)
    pos = torch.arange(pad_to, device=emb.device)
    weight = torch.log((MAX_SEQUENCE_LENGTH - lens).float() / (pad_to - lens).float())
    bias = torch.where(pos[None] >= lens[:, None], weight[:, None], torch.zeros(()))
    return emb, bias[:, None, None, :]


def use_pad_weighting(transformer: Any) -> list[PadWeightedCrossAttn]:
    """Install `PadWeightedCrossAttn` on every block's cross-attention (training); returns the processors."""
    procs = []
    for block in transformer.blocks:
        proc = PadWeightedCrossAttn()
        block.attn2.set_processor(proc)
        procs.append(proc)
    return procs


@torch.no_grad()
def check_pad_weighting(transformer: Any, tokenizer: Any, text_encoder: Any, latents: torch.Tensor,
                        captions: list[str], pad_to: int) -> float:  # fmt: skip
    """Max abs difference between the training forward (short text, weighted) and diffusers' own (512 zeros)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    t = torch.full((len(captions),), 500.0)
    for block in transformer.blocks:
        block.attn2.set_processor(WanAttnProcessor())
    full = encode_captions(tokenizer, text_encoder, captions)
    ref = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=full, return_dict=False)[0]
    procs = use_pad_weighting(transformer)
    emb, bias = short_embeddings(tokenizer, text_encoder, captions, pad_to)
    for p in procs:
        p.bias = bias
    out = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
    return float((out - ref).abs().max())


@torch.no_grad()
def latent_dataset(vae: Any, seed: int, n: int, two_object_prob: float, batch: int = 16) -> tuple[torch.Tensor, list]:
    """Normalised posterior means [n, z, f, h, w] of clips 0..n-1 (seed `seed`) and their captions."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    lat, caps = [], []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        samples = [video_sample(seed, i, two_object_prob=two_object_prob) for i in range(s, s + m)]
        caps += [x.caption for x in samples]
        x = torch.stack([torch.from_numpy(x.video) for x in samples]).permute(0, 4, 1, 2, 3).mul(2).sub(1)
        lat.append((vae.encode(x).latent_dist.mode() - mean) / std)
    return torch.cat(lat), caps


def latent_cache(out: str | Path, seed: int, clips: int, two_object_prob: float) -> Path:
    """Where a run in `out` keeps its encoded clips (a run finding the file there skips the encoding; sweeps share
    one file, linked into each run's folder)."""
    return Path(out) / f"latents_{seed}_{clips}_{two_object_prob}.pt"


def cached_latents(cache: Path, vae: Any, seed: int, clips: int, two_object_prob: float) -> dict[str, Any]:
    """{"latents", "captions"} of `latent_dataset` from `cache`, or encoded by `vae` (a model, or a VAE folder loaded
    only when there is something to encode) and saved there atomically, so an interrupted encoding leaves no file."""
    if cache.is_file():
        return torch.load(cache)
    if isinstance(vae, (str, Path)):
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(vae).eval()
    lat, caps = latent_dataset(vae, seed, clips, two_object_prob)
    data = {"latents": lat, "captions": caps}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(data, cache)
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.train_t2v", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="trained VAE folder (train_vae's out/vae)")
    p.add_argument(
        "--decoder-vae",
        type=Path,
        default=None,
        help="a VAE with the same encoder and latent statistics as --vae but a retrained decoder (train_vae "
        "--decoder-steps = --steps): the evaluated and saved pipelines use it as soon as it exists",
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--init-pipeline",
        type=Path,
        default=None,
        help="start the transformer and text encoder from this trained pipeline folder (fine-tune)",
    )
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--clips", type=int, default=8000, help="training clips (encoded once)")
    p.add_argument("--two-object-prob", type=float, default=0.2)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--text-len", type=int, default=16, help="text positions computed (see PadWeightedCrossAttn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (the schedule is kept)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=250, help="accuracy of the EMA model every N steps (0: never)")
    p.add_argument(
        "--eval-prompts",
        type=int,
        default=len(TRAIN_EVAL_PROMPTS),
        help=f"first N of the {len(TRAIN_EVAL_PROMPTS)} fixed evaluation prompts",
    )
    p.add_argument("--classifier", type=Path, default=None, help="attribute classifier (default: the shipped one)")
    p.add_argument("--eval-steps", type=int, default=20, help="denoising steps of the accuracy samples (CLI: 20)")
    return p


def same_encoder(a: Any, b: Any) -> bool:
    """Whether two `AutoencoderKLWan` encode alike: equal encoder weights, latent statistics equal to float rounding
    (they are re-measured after each training run)."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(("encoder.", "quant_conv."))]
    return (
        bool(keys)
        and all(torch.equal(sa[k], sb[k]) for k in keys)
        and all(
            torch.allclose(torch.tensor(getattr(a.config, k)), torch.tensor(getattr(b.config, k)), rtol=1e-4, atol=1e-6)
            for k in ("latents_mean", "latents_std")
        )
    )


class _DecoderVae:
    """The VAE the evaluated and saved pipelines use: `--decoder-vae` once it has been written, else `--vae`."""

    def __init__(self, vae: Any, path: Path | None) -> None:
        self.base, self.path, self.vae, self.name, self.stamp = vae, path, vae, "vae", None

    def get(self) -> tuple[Any, str]:
        from diffusers import AutoencoderKLWan

        weights = self.path / "diffusion_pytorch_model.safetensors" if self.path else None
        if weights is not None and weights.is_file() and weights.stat().st_mtime != self.stamp:
            new = AutoencoderKLWan.from_pretrained(self.path).eval()
            if not same_encoder(self.base, new):
                raise SystemExit(f"--decoder-vae {self.path} encodes differently from --vae: train only its decoder")
            self.vae, self.name, self.stamp = new, "decoder-vae", weights.stat().st_mtime
        return self.vae, self.name


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKLWan

    a = parser().parse_args(argv)
    if not 0 <= a.eval_prompts <= len(TRAIN_EVAL_PROMPTS):
        raise SystemExit(f"--eval-prompts must be in 0..{len(TRAIN_EVAL_PROMPTS)}, got {a.eval_prompts}")
    threads = setup_threads(a.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    say = accelerator.print
    timer = Timer()

    vae = AutoencoderKLWan.from_pretrained(a.vae).eval()
    data = cached_latents(latent_cache(out, a.seed, a.clips, a.two_object_prob), vae, a.seed, a.clips,
                          a.two_object_prob)  # fmt: skip
    latents, captions = data["latents"], data["captions"]
    say(f"{len(captions)} clips, latents {tuple(latents.shape)} ({timer.elapsed:.0f} s)")

    tokenizer = world_tokenizer()
    transformer = build_transformer()
    text_encoder = build_text_encoder(len(tokenizer))
    if a.init_pipeline and not (out / "state.pt").is_file():  # fine-tune a trained pipeline (a resume wins)
        from diffusers import WanTransformer3DModel
        from transformers import UMT5EncoderModel

        transformer.load_state_dict(
            WanTransformer3DModel.from_pretrained(a.init_pipeline, subfolder="transformer").state_dict()
        )
        text_encoder.load_state_dict(
            UMT5EncoderModel.from_pretrained(a.init_pipeline, subfolder="text_encoder").state_dict()
        )
        say(f"initialised the transformer and text encoder from {a.init_pipeline}")
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay)
    sched = cosine_schedule(opt, a.steps, a.warmup)
    # the EMA copies keep diffusers' processors
    ema_t, ema_e = (ModuleEMA(copy.deepcopy(m).eval(), a.ema) for m in (transformer, text_encoder))
    probe = latents[:3]
    diff = check_pad_weighting(transformer, tokenizer, text_encoder, probe, captions[:2] + [""], a.text_len)
    say(f"pad-weighted cross-attention vs diffusers' WanAttnProcessor on 512 positions: max abs diff {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"PadWeightedCrossAttn differs from WanAttnProcessor by {diff}")
    procs = use_pad_weighting(transformer)
    rec = RunRecords(out, timer, list(TRAIN_EVAL_PROMPTS[: a.eval_prompts]))  # history, curve, best, state.pt
    st = rec.load()
    if st is not None:
        transformer.load_state_dict(st["transformer"])
        text_encoder.load_state_dict(st["text_encoder"])
        ema_t.load_state_dict(st["ema_transformer"], st["step"])
        ema_e.load_state_dict(st["ema_text_encoder"], st["step"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        say(f"resumed at step {rec.step}")
    start = rec.step
    transformer, text_encoder, opt = accelerator.prepare(transformer, text_encoder, opt)
    dev = accelerator.device
    gen = torch.Generator().manual_seed(a.seed * 1000 + start)

    def save_state(step: int) -> None:
        rec.save(step, {"transformer": accelerator.unwrap_model(transformer).state_dict(),
                        "text_encoder": accelerator.unwrap_model(text_encoder).state_dict(),
                        "ema_transformer": ema_t.state_dict(), "ema_text_encoder": ema_e.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict()})  # fmt: skip

    decoder = _DecoderVae(vae, a.decoder_vae)
    decoder.get()  # refuse a mismatched decoder VAE before training
    scorer = None
    if a.eval_every and a.eval_prompts:
        scorer = AttributeScorer(a.classifier or world_dir() / "classifier")

    # train_config.json and metrics.json (what `publish` reads; also mid-run): rec.write
    config = {"args": vars(a), "transformer_config": TRANSFORMER_CONFIG, "text_encoder_config": TEXT_ENCODER_CONFIG,
              "scheduler_config": SCHEDULER_CONFIG, "video": VIDEO, "threads": threads, **environment()}  # fmt: skip

    def evaluate(step: int) -> None:
        """Accuracy of the EMA pipeline on the fixed prompts; saves it as best/ when it beats the best so far."""
        if scorer is None or rec.evaluated(step):
            return
        t0 = timer.elapsed
        eval_vae, vae_name = decoder.get()
        pipe = build_pipeline(eval_vae, ema_t.current, ema_e.current, tokenizer)
        pipe.set_progress_bar_config(disable=True)
        res = accuracy(pipe, scorer, TRAIN_EVAL_PROMPTS[: a.eval_prompts], steps=a.eval_steps)
        row = {"step": step, **{k: round(v, 4) for k, v in res["one_object"].items() if k != "videos"},
               "score": round(selection_score(res["one_object"]), 4),
               "loss_avg": rec.run_loss and round(rec.run_loss, 4), "s": round(rec.before + t0, 1),
               "eval_s": round(timer.elapsed - t0, 1), "vae": vae_name}  # fmt: skip
        # scores of one decoder only: a row of another decoder than the best's replaces it
        if rec.add_eval(row, lambda r, b: r["score"] > b["score"] or b.get("vae") != r["vae"]):
            pipe.save_pretrained(out / "best", safe_serialization=True)
        say({"eval": row, "best_step": rec.best["step"]}, flush=True)
        rec.write(step, config)

    done = start  # steps completed
    for step in range(start, a.steps):
        idx = torch.randint(len(captions), (a.batch_size,), generator=gen)
        x0 = latents[idx].to(dev)
        caps = [captions[i] if torch.rand((), generator=gen) >= a.caption_dropout else "" for i in idx.tolist()]
        sigma = torch.sigmoid(torch.randn(a.batch_size, generator=gen)).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        emb, bias = short_embeddings(tokenizer, text_encoder, caps, a.text_len, dev)
        for proc in procs:
            proc.bias = bias
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb, return_dict=False)[0]
        loss = (pred.float() - (noise - x0)).pow(2).mean()
        accelerator.backward(loss)
        grad = accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema_t.update(accelerator.unwrap_model(transformer))
        ema_e.update(accelerator.unwrap_model(text_encoder))
        rec.run_loss = loss.item() if rec.run_loss is None else 0.98 * rec.run_loss + 0.02 * loss.item()
        if step % 25 == 0 or step == a.steps - 1:
            row = {"step": step, "loss": round(loss.item(), 4), "loss_avg": round(rec.run_loss, 4),
                   "grad_norm": round(float(grad), 3), "lr": opt.param_groups[0]["lr"],
                   "s": round(timer.elapsed, 1)}  # fmt: skip
            rec.history.append(row)
            say(row, flush=True)
        done = step + 1
        if a.eval_every and done % a.eval_every == 0:
            evaluate(done)
        if done % a.save_every == 0 or (a.eval_every and done % a.eval_every == 0):
            save_state(done)
        if timer.over(a.max_minutes):
            say(f"--max-minutes {a.max_minutes} reached at step {step}")
            break
    evaluate(done)
    save_state(done)
    pipe = build_pipeline(decoder.get()[0], ema_t.current, ema_e.current, tokenizer)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    rec.write(done, config)
    say(f"t2v: step {done} of {a.steps}, {timer.elapsed:.0f} s this run -> {out / 'pipeline'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

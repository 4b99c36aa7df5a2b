"""Train the world's text-to-image `StableDiffusion3Pipeline` (VAE, then transformer + both text encoders).

    python -m attn_pipelines.world.train_t2i --out runs/world_t2i                       # ~45 min, 1 thread
    python -m attn_pipelines.world.train_t2i --out /tmp/t --vae-steps 2 --steps 3 --scenes 32 --eval-every 0  # smoke

Phase 1 (`--vae-steps`): the one-level `AutoencoderKL` learns to reconstruct scene images (MSE on the
posterior mean's decoding plus a small KL); its latent statistics become `shift_factor` / `scaling_factor`.
Phase 2: flow matching as SD3 is trained, x_t = (1 - s) x0 + s noise, the transformer predicts noise - x0
at timestep 1000 s (s logit-normal, shifted towards noise by `--sigma-shift` as the sampler's `shift` moves its
steps: the sampler's first steps, where a 32 px image's layout is decided, lie above s = 0.9, where the
unshifted logit-normal puts 1.4% of the training samples), on the normalised posterior means of `--scenes`
scene images (encoded once, cached in `--out`). Both CLIP text encoders train with the transformer; their embeddings
are built exactly as `StableDiffusion3Pipeline.encode_prompt` builds them, and 10% of captions are
dropped to "" (the pipeline's default negative prompt), so classifier-free guidance works. The saved
weights are an EMA of the trained ones. `--max-sequence-length N` is the number of zero T5 positions the
pipeline appends (its `max_sequence_length`; 256 is its default): training computes them as one position
weighted N times (`ZeroTokenJointAttn`; none at 0), and N is saved with the model (`t2i.T2I_SETTINGS_FILE`),
so every caller generates with it.

Every `--eval-every` steps the EMA pipeline draws `t2i.TRAIN_EVAL_PROMPTS` (24 one-object prompts,
seed 0, the CLI's defaults) and the attribute classifier reads the requested quadrant of each: the
curve of colour, shape, colour+shape and place accuracy goes to `metrics.json` beside the loss, and the
weights with the best colour+shape (then place) so far are saved as `best/`. `--out` receives
`vae/`, `pipeline/`, `best/` (diffusers pipeline directories), `train_config.json`, `metrics.json`
and a resumable `state.pt`: rerunning the same command continues (`--max-minutes` stops early).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import (
    ModuleEMA,
    RunRecords,
    Timer,
    cosine_lr,
    cosine_schedule,
    environment,
    setup_threads,
    write_json,
)
from .data import scene_sample
from .models import world_dir
from .score import AttributeScorer
from .t2i import (
    PIPELINE_T5_POSITIONS,
    T2I_SCHEDULER_CONFIG,
    T2I_TEXT_ENCODER_CONFIG,
    T2I_TRANSFORMER_CONFIG,
    T2I_VAE_CONFIG,
    TRAIN_EVAL_PROMPTS,
    build_t2i_pipeline,
    build_t2i_text_encoder,
    build_t2i_transformer,
    build_t2i_vae,
    save_t2i_pipeline,
    t2i_accuracy,
    t2i_tokenizer,
)

__all__ = ["ZeroTokenJointAttn", "clip_embeddings", "check_zero_token_weighting", "main"]

T5_POSITIONS = PIPELINE_T5_POSITIONS  # StableDiffusion3Pipeline's default max_sequence_length (zeros without a T5)


def _images(seed: int, start: int, n: int) -> tuple[torch.Tensor, list[str]]:
    samples = [scene_sample(seed, i) for i in range(start, start + n)]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).mul(2).sub(1)
    return x, [s.caption for s in samples]


def clip_embeddings(tokenizer: Any, encoders: list[Any], captions: list[str], device: Any = "cpu"):
    """(prompt embeddings [B, 24, 128], pooled [B, 64]) as `StableDiffusion3Pipeline._get_clip_prompt_embeds` builds
    them (max-length padding, penultimate hidden state, both encoders concatenated), with gradients."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)  # fmt: skip
    hs, pooled = [], []
    for enc in encoders:
        o = enc(ids, output_hidden_states=True)
        hs.append(o.hidden_states[-2])
        pooled.append(o[0])
    return torch.cat(hs, -1), torch.cat(pooled, -1)


class ZeroTokenJointAttn:
    """Training-only SD3 joint attention: the pipeline's N zero T5 positions (256 by default), computed as one.

    Without a T5 the pipeline appends N = `max_sequence_length` zero vectors to the prompt embeddings. They
    are identical through every block (no positional embedding on text, the same weights), so attention
    over the N equals attention over ONE of them whose logit carries + log(N); the queries of the N - 1
    others only repeat its output, which nothing reads after the last block. Training feeds the 24
    CLIP positions plus one zero position and adds log(N) to that key's logit: the same function
    as diffusers' `JointAttnProcessor2_0` on 24 + N positions (checked by `check_zero_token_weighting`)."""

    def __init__(self, positions: int = T5_POSITIONS) -> None:
        if positions < 1:
            raise ValueError(f"positions must be >= 1 (0 zero positions need no weighting), got {positions}")
        self.positions = positions

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        b, n = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = math.log(self.positions)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[-1] * attn.heads).to(q.dtype)
        img, ctx = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx


def use_zero_token_weighting(transformer: Any, positions: int = T5_POSITIONS) -> None:
    """Install `ZeroTokenJointAttn` for `positions` zero positions on every joint block (training); with none,
    diffusers' own processor."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    for block in transformer.transformer_blocks:
        block.attn.set_processor(ZeroTokenJointAttn(positions) if positions else JointAttnProcessor2_0())


def _short_context(emb: torch.Tensor, positions: int = T5_POSITIONS) -> torch.Tensor:
    """The CLIP positions + one zero (T5) position standing for `positions` of them (none when 0)."""
    return torch.nn.functional.pad(emb, (0, 0, 0, 1)) if positions else emb


@torch.no_grad()
def check_zero_token_weighting(transformer: Any, tokenizer: Any, encoders: list[Any], latents: torch.Tensor,
                               captions: list[str], positions: int = T5_POSITIONS) -> float:  # fmt: skip
    """Max abs difference between the training forward (one weighted zero position) and diffusers' own
    (`positions` zero positions)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    t = torch.full((len(captions),), 500.0)
    emb, pooled = clip_embeddings(tokenizer, encoders, captions)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(JointAttnProcessor2_0())
    full = torch.nn.functional.pad(emb, (0, 0, 0, positions))
    ref = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=full, pooled_projections=pooled,
                      return_dict=False)[0]  # fmt: skip
    use_zero_token_weighting(transformer, positions)
    out = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=_short_context(emb, positions),
                      pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
    return float((out - ref).abs().max())


def train_vae(out: Path, a: argparse.Namespace, say: Any) -> Any:
    """Phase 1 (resumable by its saved folder): the VAE, then its latent statistics. Returns it (eval mode)."""
    from diffusers import AutoencoderKL

    folder = out / "vae"
    if (folder / "config.json").is_file():
        say(f"VAE: using {folder}")
        return AutoencoderKL.from_pretrained(folder).eval()
    vae = build_t2i_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 17)
    for step in range(a.vae_steps):
        x, _ = _images(a.seed + 1, int(torch.randint(10**6, (), generator=gen)) * 64, a.vae_batch_size)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        loss = (rec - x).pow(2).mean() + a.vae_kl * post.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = a.vae_lr * cosine_lr(step, a.vae_steps, 20)
        opt.step()
        opt.zero_grad()
        if step % 25 == 0 or step == a.vae_steps - 1:
            say({"vae_step": step, "loss": round(loss.item(), 5)}, flush=True)
    vae.eval()
    with torch.no_grad():
        x, _ = _images(a.seed + 2, 0, 256)
        z = vae.encode(x).latent_dist.mode()
        psnr = float(-10 * torch.log10(((vae.decode(z).sample - x) / 2).pow(2).mean()))
    shift, scale = float(z.mean()), float(1 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(folder, safe_serialization=True)
    write_json(out / "vae_metrics.json", {"steps": a.vae_steps, "psnr_db": round(psnr, 2), "shift_factor": shift,
                                          "scaling_factor": scale})  # fmt: skip
    say(f"VAE: {a.vae_steps} steps, held-out PSNR {psnr:.2f} dB, shift {shift:.4f}, scale {scale:.4f}")
    return vae


@torch.no_grad()
def latent_dataset(vae: Any, seed: int, n: int, batch: int = 64) -> tuple[torch.Tensor, list[str]]:
    """Normalised posterior means [n, 4, 32, 32] of scenes 0..n-1 (seed `seed`) and their captions."""
    lat, caps = [], []
    for s in range(0, n, batch):
        x, c = _images(seed, s, min(batch, n - s))
        lat.append((vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor)
        caps += c
    return torch.cat(lat), caps


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.train_t2i", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--vae-batch-size", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--text-lr",
        type=float,
        default=None,
        help="learning rate of both text encoders (default: --lr; 0 keeps them as initialised)",
    )
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--scenes", type=int, default=12000, help="training scenes (encoded once)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--sigma-shift",
        type=float,
        default=1.0,
        help="training noise levels s (logit-normal) shifted as the sampler shifts them: shift s / (1 + (shift - 1) s)",
    )
    p.add_argument(
        "--max-sequence-length",
        type=int,
        default=PIPELINE_T5_POSITIONS,
        help="zero T5 positions the pipeline appends (its max_sequence_length), saved with the model",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (the schedule is kept)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250, help="accuracy of the EMA model every N steps (0: never)")
    p.add_argument("--eval-prompts", type=int, default=len(TRAIN_EVAL_PROMPTS),
                   help=f"first N of the {len(TRAIN_EVAL_PROMPTS)} fixed evaluation prompts")  # fmt: skip
    p.add_argument("--classifier", type=Path, default=None, help="attribute classifier (default: the shipped one)")
    p.add_argument("--eval-steps", type=int, default=20, help="denoising steps of the accuracy samples (CLI: 20)")
    return p


def _check_args(a: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "scenes", "vae_batch_size"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.vae_steps < 1 and not (Path(a.out) / "vae" / "config.json").is_file():
        raise SystemExit(f"--vae-steps must be >= 1 (no trained VAE in {a.out}/vae), got {a.vae_steps}")
    if not 0 <= a.eval_prompts <= len(TRAIN_EVAL_PROMPTS):
        raise SystemExit(f"--eval-prompts must be in 0..{len(TRAIN_EVAL_PROMPTS)}, got {a.eval_prompts}")
    if not 0 <= a.max_sequence_length <= 512:
        raise SystemExit(f"--max-sequence-length must be in 0..512, got {a.max_sequence_length}")
    if a.sigma_shift <= 0:
        raise SystemExit(f"--sigma-shift must be > 0, got {a.sigma_shift}")
    if not 0 <= a.caption_dropout < 1:
        raise SystemExit(f"--caption-dropout must be in [0, 1), got {a.caption_dropout}")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    _check_args(a)
    threads = setup_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()

    def say(*x: Any, flush: bool = True) -> None:
        print(*x, flush=flush)

    vae = train_vae(out, a, say)
    cache = out / f"latents_{a.seed}_{a.scenes}.pt"
    if cache.is_file():
        data = torch.load(cache)
    else:
        lat, caps = latent_dataset(vae, a.seed, a.scenes)
        data = {"latents": lat, "captions": caps}
        torch.save(data, cache)
    latents, captions = data["latents"], data["captions"]
    say(f"{len(captions)} scenes, latents {tuple(latents.shape)} ({timer.elapsed:.0f} s)")

    tokenizer = t2i_tokenizer()
    transformer = build_t2i_transformer()
    encoders = [build_t2i_text_encoder(tokenizer), build_t2i_text_encoder(tokenizer)]
    msl = a.max_sequence_length
    diff = check_zero_token_weighting(transformer.eval(), tokenizer, encoders, latents[:3], captions[:2] + [""], msl)
    say(f"one weighted zero position vs diffusers' JointAttnProcessor2_0 on {msl}: max abs diff {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"ZeroTokenJointAttn differs from JointAttnProcessor2_0 by {diff}")
    transformer.train()
    text_lr = a.lr if a.text_lr is None else a.text_lr
    for e in encoders:
        e.train()
        e.requires_grad_(text_lr > 0)
    text_params = [p for e in encoders for p in e.parameters()] if text_lr > 0 else []
    params = list(transformer.parameters()) + text_params
    groups: list[Any] = [{"params": list(transformer.parameters()), "lr": a.lr}, {"params": text_params, "lr": text_lr}]
    if a.text_lr is None or not text_params:  # one group: what a state.pt of before --text-lr holds
        groups = [{"params": params, "lr": a.lr}] if a.text_lr is None else groups[:1]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay)
    sched = cosine_schedule(opt, a.steps, a.warmup)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    ema_copy = copy.deepcopy(transformer).eval()
    for block in ema_copy.transformer_blocks:  # the EMA copy runs diffusers' own processor
        block.attn.set_processor(JointAttnProcessor2_0())
    ema_t = ModuleEMA(ema_copy, a.ema)
    ema_e = [ModuleEMA(copy.deepcopy(e).eval(), a.ema) for e in encoders]
    rec = RunRecords(out, timer, list(TRAIN_EVAL_PROMPTS[: a.eval_prompts]))
    st = rec.load()
    if st is not None:
        transformer.load_state_dict(st["transformer"])
        ema_t.load_state_dict(st["ema_transformer"], st["step"])
        for i in range(2):
            encoders[i].load_state_dict(st["text_encoders"][i])
            ema_e[i].load_state_dict(st["ema_text_encoders"][i], st["step"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        say(f"resumed at step {rec.step}")
    start = rec.step
    gen = torch.Generator().manual_seed(a.seed * 1000 + start)
    scorer = None
    if a.eval_every and a.eval_prompts:
        scorer = AttributeScorer(a.classifier or world_dir() / "classifier")
    config = {"args": vars(a), "vae_config": T2I_VAE_CONFIG, "transformer_config": T2I_TRANSFORMER_CONFIG,
              "text_encoder_config": T2I_TEXT_ENCODER_CONFIG, "scheduler_config": T2I_SCHEDULER_CONFIG,
              "threads": threads, **environment()}  # fmt: skip

    def save_state(step: int) -> None:
        rec.save(step, {"transformer": transformer.state_dict(), "ema_transformer": ema_t.state_dict(),
                        "text_encoders": [e.state_dict() for e in encoders],
                        "ema_text_encoders": [e.state_dict() for e in ema_e], "opt": opt.state_dict(),
                        "sched": sched.state_dict()})  # fmt: skip

    def evaluate(step: int) -> None:
        """Accuracy of the EMA pipeline on the fixed prompts; saved as best/ when it beats the best so far."""
        if scorer is None or rec.evaluated(step):
            return
        t0 = timer.elapsed
        pipe = build_t2i_pipeline(vae, ema_t.current, ema_e[0].current, ema_e[1].current, msl)
        pipe.set_progress_bar_config(disable=True)
        res = t2i_accuracy(pipe, scorer, TRAIN_EVAL_PROMPTS[: a.eval_prompts], steps=a.eval_steps)
        row = {"step": step, **{k: round(res[k], 4) for k in ("color", "shape", "color_shape", "place")},
               "loss_avg": rec.run_loss and round(rec.run_loss, 4), "s": round(rec.before + t0, 1),
               "eval_s": round(timer.elapsed - t0, 1)}  # fmt: skip
        row["score"] = round(row["color_shape"] + 0.1 * row["place"], 4)
        if rec.add_eval(row):
            save_t2i_pipeline(pipe, out / "best")
        say({"eval": row, "best_step": rec.best["step"]})
        rec.write(step, config)

    done = start
    for step in range(start, a.steps):
        idx = torch.randint(len(captions), (a.batch_size,), generator=gen)
        x0 = latents[idx]
        caps = [captions[i] if torch.rand((), generator=gen) >= a.caption_dropout else "" for i in idx.tolist()]
        sigma = torch.sigmoid(torch.randn(a.batch_size, generator=gen))
        sigma = a.sigma_shift * sigma / (1 + (a.sigma_shift - 1) * sigma)  # 1: SD3's logit-normal as it is
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        emb, pooled = clip_embeddings(tokenizer, encoders, caps)
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=_short_context(emb, msl),
                           pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
        loss = (pred.float() - (noise - x0)).pow(2).mean()
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema_t.update(transformer)
        for e, m in zip(ema_e, encoders):
            e.update(m)
        rec.run_loss = loss.item() if rec.run_loss is None else 0.98 * rec.run_loss + 0.02 * loss.item()
        if step % 25 == 0 or step == a.steps - 1:
            row = {"step": step, "loss": round(loss.item(), 4), "loss_avg": round(rec.run_loss, 4),
                   "grad_norm": round(float(grad), 3), "lr": opt.param_groups[0]["lr"],
                   "s": round(rec.seconds, 1)}  # fmt: skip
            rec.history.append(row)
            say(row)
        done = step + 1
        if a.eval_every and done % a.eval_every == 0:
            evaluate(done)
        if done % a.save_every == 0 or (a.eval_every and done % a.eval_every == 0):
            save_state(done)
        if timer.over(a.max_minutes):
            say(f"--max-minutes {a.max_minutes} reached at step {done}")
            break
    if a.eval_every:
        evaluate(done)
    save_state(done)
    pipe = build_t2i_pipeline(vae, ema_t.current, ema_e[0].current, ema_e[1].current, msl)
    save_t2i_pipeline(pipe, out / "pipeline")
    rec.write(done, config)
    say(f"t2i: step {done} of {a.steps}, {timer.elapsed:.0f} s this run -> {out / 'pipeline'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the world's `AutoencoderKLWan` (2x spatial, 2x temporal) on procedural clips, on accelerate.

    python -m attn_pipelines.world.train_vae --out runs/world/vae            # ~7 min, 1 CPU thread
    python -m attn_pipelines.world.train_vae --init old/vae --out runs/world/vae --decoder-steps 400
    python -m attn_pipelines.world.train_vae --out /tmp/vae --steps 5 --smoke

Clips are `data.video_sample(seed, i)` drawn afresh every step (never repeated). Loss: L1 + MSE on pixels in
[-1, 1], each pixel weighted 1 + `--fg-weight` where the clip shows a shape (the shape is a few percent of the
frame, and its colour is what the attribute classifier reads), on the posterior mean (`--latent mode`, the
noise-free latent the transformer is trained on), on a posterior sample plus a small KL term (`--latent
sample`), or on the posterior mean plus Gaussian noise of `--latent-noise` times each channel's spread over
the batch (`--latent noisy`). A VAE trained on samples can leave channels whose posterior noise swamps their
signal (the decoder then learns to ignore them, and a noise-free retrain keeps ignoring them). `noisy` gives
every channel the same signal-to-noise (1 / `--latent-noise`, whatever the encoder's scale), so a channel the
decoder does not read is capacity thrown away and the encoder moves content into it; the saved posterior's std
is then set to that noise (`noisy_posterior`), so a sampled latent is what the decoder was trained on and the
reported signal-to-noise is the one it was trained at. The first `--decoder-steps` steps train the decoder
alone, then the whole VAE trains. After training, the per-channel mean and std of the posterior means over 512
clips become `latents_mean` / `latents_std` in the config, which `WanPipeline` uses to un-normalise the
transformer's latents, and `vae_report` measures each channel's signal-to-noise, what the decoder loses
without it, and the attribute classifier's colour / shape accuracy on reconstructed held-out clips. Writes
`vae/` (diffusers `save_pretrained`), `train_config.json` and `metrics.json` to `--out`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import Timer, cosine_schedule, environment, setup_threads, write_json
from .data import BACKGROUND, video_sample
from .models import VAE_CONFIG, VIDEO, build_vae, world_dir
from .score import AttributeScorer

__all__ = ["channel_noise", "clips", "foreground_weight", "main", "noisy_posterior", "psnr", "vae_report"]


def clips(seed: int, start: int, n: int, frames: int = VIDEO["frames"], size: int = VIDEO["size"],
          two_object_prob: float = 0.2) -> torch.Tensor:  # fmt: skip
    """Clips `start .. start+n-1` of the video set as a [n, 3, F, H, W] tensor in [-1, 1]."""
    v = np.stack([video_sample(seed, i, frames=frames, size=size, two_object_prob=two_object_prob).video
                  for i in range(start, start + n)])  # fmt: skip
    return torch.from_numpy(v).permute(0, 4, 1, 2, 3).mul(2).sub(1).contiguous()


def foreground_weight(x: torch.Tensor, weight: float, threshold: float = 0.05) -> torch.Tensor:
    """Per-pixel loss weight [n, 1, F, H, W] of clips `x` in [-1, 1]: 1 + `weight` where a shape covers the pixel
    (RGB distance from the background above `threshold`, so anti-aliased edges count), normalised to mean 1."""
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    fg = ((x + 1) / 2 - bg).norm(dim=1, keepdim=True) > threshold
    w = 1 + weight * fg.to(x.dtype)
    return w / w.mean()


def channel_noise(mu: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`mu` [n, z, f, h, w] plus Gaussian noise of `scale` times each channel's std over the batch and positions.

    The std is not detached: scaling a channel up scales its noise with it, so every channel is read at the same
    signal-to-noise 1 / `scale` and the encoder cannot buy a clean channel by making it large."""
    spread = mu.std(dim=(0, 2, 3, 4), keepdim=True)
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
    return mu + scale * spread * eps


@torch.no_grad()
def noisy_posterior(vae: Any, latents_std: list[float], scale: float) -> None:
    """Make `vae`'s posterior std the noise `--latent noisy` trained it with: `scale` x the channel's latent std,
    whatever the input (the log-variance half of `quant_conv` becomes a constant). `latent_dist.sample()` then
    draws what the decoder learned to read, and `vae_report`'s signal-to-noise is the trained one."""
    z = len(latents_std)
    conv = vae.quant_conv
    conv.weight[z:].zero_()
    logvar = 2 * torch.log(scale * torch.tensor(latents_std, dtype=conv.bias.dtype))
    conv.bias[z:] = logvar


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors, on the [0, 1] scale."""
    mse = ((a - b) / 2).pow(2).mean().clamp_min(1e-12)
    return float(10 * torch.log10(1 / mse))


@torch.no_grad()
def vae_report(vae: Any, seed: int = 1, n: int = 64, scorer_dir: str | Path | None = None) -> dict[str, Any]:
    """What a VAE keeps, on `n` held-out clips of `seed` (one object each, so the classifier's answer is defined).

    * `snr`: per latent channel, the std of the posterior mean over clips and positions divided by the RMS
      posterior std (the noise a sampled latent carries): below ~1 a sampled latent is mostly noise there;
    * `channel_drop_db`: per channel, the PSNR lost when that channel of the (noise-free) latent is replaced
      by its mean: how much the decoder reads it;
    * `psnr_db`, and the attribute classifier's colour / shape / both accuracy on the reconstructions (and
      on the originals, the classifier's own ceiling on these clips)."""
    vae = vae.eval()
    x = clips(seed, 0, n, two_object_prob=0.0)
    mus, sds, recs = [], [], []
    for i in range(0, n, 8):
        post = vae.encode(x[i : i + 8]).latent_dist
        mus.append(post.mean)
        sds.append(post.std)
        recs.append(vae.decode(post.mean).sample.clamp(-1, 1))
    mu, sd, rec = torch.cat(mus), torch.cat(sds), torch.cat(recs)
    dims = (0, 2, 3, 4)
    snr = (mu.std(dim=dims) / sd.pow(2).mean(dim=dims).sqrt()).tolist()
    base = psnr(rec, x)
    drop = []
    for c in range(mu.shape[1]):
        m = mu.clone()
        m[:, c] = mu[:, c].mean()
        r = torch.cat([vae.decode(m[i : i + 8]).sample.clamp(-1, 1) for i in range(0, n, 8)])
        drop.append(base - psnr(r, x))
    scorer = AttributeScorer(scorer_dir or world_dir() / "classifier")
    hits = {"rec": {"color": 0, "shape": 0, "both": 0}, "orig": {"color": 0, "shape": 0, "both": 0}}
    confusions: dict[str, int] = {}
    for i in range(n):
        want = video_sample(seed, i, two_object_prob=0.0).objects[0]
        for key, v in (("rec", rec[i]), ("orig", x[i])):
            color, shape, _ = scorer.predict(((v.permute(1, 2, 3, 0) + 1) / 2).numpy())
            ok_c, ok_s = color == want["color"], shape == want["shape"]
            hits[key]["color"] += ok_c
            hits[key]["shape"] += ok_s
            hits[key]["both"] += ok_c and ok_s
            if key == "rec" and not (ok_c and ok_s):
                k = f"{want['color']} {want['shape']} -> {color} {shape}"
                confusions[k] = confusions.get(k, 0) + 1
    acc = {key: {k: v / n for k, v in h.items()} for key, h in hits.items()}
    return {"clips": n, "seed": seed, "psnr_db": base, "snr": snr, "channel_drop_db": drop,
            "reconstructed": acc["rec"], "original": acc["orig"], "reconstruction_errors": confusions}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.train_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (vae/, train_config.json, metrics.json)")
    p.add_argument("--init", default=None, help="start from this trained VAE folder (fine-tune) instead of scratch")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--decoder-steps", type=int, default=0, help="first steps train the decoder alone")
    p.add_argument(
        "--latent",
        choices=("mode", "sample", "noisy"),
        default="mode",
        help="decode the posterior mean (noise-free, as the transformer sees it), a sample (+ KL), or the mean "
        "plus --latent-noise x each channel's spread (every channel at the same signal-to-noise)",
    )
    p.add_argument(
        "--latent-noise", type=float, default=0.25, help="noise / spread of each channel with --latent noisy, in (0, 1]"
    )
    p.add_argument("--fg-weight", type=float, default=4.0, help="extra loss weight on the shapes' pixels")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0, help="data and init seed (held-out clips use seed + 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 or $ATTNPLUG_THREADS)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (the schedule is kept)")
    p.add_argument("--stat-clips", type=int, default=512, help="clips for the latent mean / std")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: few clips for the statistics")
    p.add_argument("--report-only", action="store_true", help="no training: write vae_report of --init to --out")
    return p


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    a = parser().parse_args(argv)
    if not 0 < a.latent_noise <= 1:
        raise SystemExit(f"--latent-noise must be in (0, 1], got {a.latent_noise}")
    threads = setup_threads(a.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(a.seed)
    out = Path(a.out)
    if a.report_only:
        if not a.init:
            raise SystemExit("--report-only needs --init (the VAE folder to measure)")
        from diffusers import AutoencoderKLWan

        report = vae_report(AutoencoderKLWan.from_pretrained(a.init), seed=a.seed + 1, n=8 if a.smoke else 64)
        write_json(out / "report.json", {"vae": a.init, "report": report, **environment()})
        accelerator.print(
            f"{a.init}: SNR {[round(v, 2) for v in report['snr']]}, reconstructed {report['reconstructed']}"
        )
        return 0
    if a.init:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(a.init)
    else:
        vae = build_vae()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    sched = cosine_schedule(opt, a.steps, a.warmup)
    vae, opt = accelerator.prepare(vae, opt)
    raw = accelerator.unwrap_model(vae)
    encoder = [*raw.encoder.parameters(), *raw.quant_conv.parameters()]
    timer = Timer()
    history = []
    step = 0
    for step in range(a.steps):
        decoder_only = step < a.decoder_steps
        for p in encoder:
            p.requires_grad_(not decoder_only)
        x = clips(a.seed, step * a.batch_size, a.batch_size).to(accelerator.device)
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        if a.latent == "noisy":
            z = channel_noise(post.mode(), a.latent_noise)
        else:
            z = post.mode() if a.latent == "mode" else post.sample()
        rec = vae.decode(z).sample
        w = foreground_weight(x, a.fg_weight)
        l1 = ((rec - x).abs() * w).mean()
        mse = ((rec - x).pow(2) * w).mean()
        loss = l1 + mse
        if a.latent == "sample" and not decoder_only:
            loss = loss + a.kl_weight * post.kl().mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0 or step == a.steps - 1:
            row = {"step": step, "loss": loss.item(), "l1": l1.item(), "psnr": psnr(rec.detach(), x),
                   "decoder_only": decoder_only, "s": round(timer.elapsed, 1)}  # fmt: skip
            history.append(row)
            accelerator.print(row, flush=True)
        if timer.over(a.max_minutes):
            accelerator.print(f"--max-minutes {a.max_minutes} reached at step {step}")
            break
    vae = accelerator.unwrap_model(vae).eval()
    with torch.no_grad():
        n_stat = 8 if a.smoke else a.stat_clips
        mus = [vae.encode(clips(a.seed + 7, i, 16)).latent_dist.mode() for i in range(0, n_stat, 16)]
        mu = torch.cat(mus)  # [N, z, f, h, w]
        mean = mu.mean(dim=(0, 2, 3, 4)).tolist()
        std = mu.std(dim=(0, 2, 3, 4)).tolist()
        held = clips(a.seed + 1, 0, 8 if a.smoke else 64)
        rec = torch.cat(
            [vae.decode(vae.encode(held[i : i + 8]).latent_dist.mode()).sample for i in range(0, len(held), 8)]
        )
        held_psnr = psnr(rec.clamp(-1, 1), held)
    seconds = round(timer.elapsed, 1)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    if a.latent == "noisy":
        noisy_posterior(vae, std, a.latent_noise)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    cfg = {"args": vars(a), "vae_config": VAE_CONFIG, "video": VIDEO, "threads": threads, **environment()}
    write_json(out / "train_config.json", cfg)
    report = vae_report(vae, seed=a.seed + 1, n=8 if a.smoke else 64)
    metrics = {"steps": step + 1, "seconds": seconds, "held_out_psnr_db": held_psnr, "held_out_clips": len(held),
               "latents_mean": mean, "latents_std": std, "report": report, "history": history}  # fmt: skip
    write_json(out / "metrics.json", metrics)
    rec = report["reconstructed"]
    accelerator.print(f"vae: {step + 1} steps in {seconds:.0f} s; held-out PSNR {held_psnr:.2f} dB; SNR per channel "
                      f"{[round(v, 2) for v in report['snr']]}; reconstructions read as colour {rec['color']:.0%}, "
                      f"shape {rec['shape']:.0%} -> {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

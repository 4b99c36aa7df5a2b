"""Train the world's `AutoencoderKLWan` (2x spatial, 2x temporal) on procedural clips, on accelerate.

    python -m attn_pipelines.world.train_vae --out runs/world/vae            # ~20 min, 1 CPU thread
    python -m attn_pipelines.world.train_vae --out /tmp/vae --steps 5 --smoke

Clips are `data.video_sample(seed, i)` drawn afresh every step (never repeated). Loss: L1 + MSE on
pixels in [-1, 1] plus a small KL term (the latents stay near unit scale). After training, the
per-channel mean and std of the posterior means over 512 clips become `latents_mean` /
`latents_std` in the config, which `WanPipeline` uses to un-normalise the transformer's latents.
Writes `vae/` (diffusers `save_pretrained`), `train_config.json` and `metrics.json` to `--out`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .common import Timer, cosine_lr, environment, setup_threads, write_json
from .data import video_sample
from .models import VAE_CONFIG, VIDEO, build_vae

__all__ = ["clips", "main", "psnr"]


def clips(seed: int, start: int, n: int, frames: int = VIDEO["frames"], size: int = VIDEO["size"]) -> torch.Tensor:
    """Clips `start .. start+n-1` of the video set as a [n, 3, F, H, W] tensor in [-1, 1]."""
    v = np.stack([video_sample(seed, i, frames=frames, size=size).video for i in range(start, start + n)])
    return torch.from_numpy(v).permute(0, 4, 1, 2, 3).mul(2).sub(1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors, on the [0, 1] scale."""
    mse = ((a - b) / 2).pow(2).mean().clamp_min(1e-12)
    return float(10 * torch.log10(1 / mse))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.train_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (vae/, train_config.json, metrics.json)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0, help="data and init seed (held-out clips use seed + 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 or $ATTNPLUG_THREADS)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (the schedule is kept)")
    p.add_argument("--stat-clips", type=int, default=512, help="clips for the latent mean / std")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: few clips for the statistics")
    return p


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    a = parser().parse_args(argv)
    threads = setup_threads(a.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(a.seed)
    out = Path(a.out)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, a.steps, a.warmup))
    vae, opt = accelerator.prepare(vae, opt)
    timer = Timer()
    history = []
    step = 0
    for step in range(a.steps):
        x = clips(a.seed, step * a.batch_size, a.batch_size).to(accelerator.device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        loss = l1 + mse + a.kl_weight * post.kl().mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0 or step == a.steps - 1:
            row = {"step": step, "loss": loss.item(), "l1": l1.item(), "psnr": psnr(rec.detach(), x),
                   "s": round(timer.elapsed, 1)}  # fmt: skip
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
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    cfg = {"args": vars(a), "vae_config": VAE_CONFIG, "video": VIDEO, "threads": threads, **environment()}
    write_json(out / "train_config.json", cfg)
    metrics = {"steps": step + 1, "seconds": round(timer.elapsed, 1), "held_out_psnr_db": held_psnr,
               "held_out_clips": len(held), "latents_mean": mean, "latents_std": std, "history": history}  # fmt: skip
    write_json(out / "metrics.json", metrics)
    accelerator.print(f"vae: {step + 1} steps in {timer.elapsed:.0f} s; held-out PSNR {held_psnr:.2f} dB -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

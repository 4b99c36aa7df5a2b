"""What a radial length-extension LoRA step costs as the video gets longer: measured on the world's trained
text-to-video transformer (CPU), plus radial's attention density on Wan2.1's real token grids.

    python benchmarks/train_lora_scaling.py            # ~ minutes on 2 CPU cores
    python benchmarks/train_lora_scaling.py --smoke    # seconds (checks the script; writes nothing)

Part 1 (measured): one LoRA training step (`diffusion_attn.lora.lora_loss`: Wan's flow-matching loss,
forward + backward + AdamW on the LoRA, rank 16 on the attention projections) of the world model's
`WanTransformer3DModel` (assets/world/t2v) at 1x / 2x / 4x its training length (9 / 17 / 33 frames of
32 x 32 px: 5 / 9 / 17 latent frames, 320 / 576 / 1088 tokens) with dense attention and with radial
(Wan's decay 0.2 and attention sink, every layer sparse, blocks of 64 tokens = one latent frame), with and
without gradient checkpointing; 512 text positions as WanPipeline encodes them. Each configuration runs
in its own process (1 thread): median step time over the timed steps and the peak resident memory above
the process's memory after loading the model (ru_maxrss).

Part 2 (computed, no timing): radial's block density (blocks of 128, Wan's official settings) for
Wan2.1 at 480 x 832 px, 81 / 161 / 321 frames (the grids a 1x / 2x / 4x length extension generates).
Writes results/train_lora_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORLD = ROOT / "assets" / "world" / "t2v"
LENGTHS = {"1x": 5, "2x": 9, "4x": 17}  # latent frames of 9 / 17 / 33 video frames (2x temporal VAE)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(length: str, attn: str, ckpt: bool, steps: int) -> dict:
    """One configuration, in this process."""
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    import diffusion_attn as da
    from diffusion_attn.lora import TARGET_MODULES, lora_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_pretrained(WORLD / "transformer")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(TARGET_MODULES["wan"])))
    params = [p for p in model.parameters() if p.requires_grad]
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    handle = None
    if attn == "radial":
        handle = da.apply(model, da.Radial(dense_layers=0, block_size=64), step_source="callback")
        handle.set_step(10**6)
    opt = torch.optim.AdamW(params, lr=1e-4)
    c = model.config
    latents = torch.randn(1, c.in_channels, LENGTHS[length], 16, 16)
    batch = {"latents": latents, "encoder_hidden_states": torch.randn(1, 512, c.text_dim)}
    base = _rss_mb()
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        loss = lora_loss(None, model, "wan", batch, torch.Generator().manual_seed(step), shift=3.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step builds layouts and caches
            times.append(time.perf_counter() - t)
    density = None
    if handle is not None:
        lays = [v[0] for v in handle.variants[0]._cache.values() if isinstance(v, tuple)]
        density = min(lay.density for lay in lays)
        handle.remove()
    tokens = LENGTHS[length] * 8 * 8
    return {
        "length": length, "attention": attn, "gradient_checkpointing": ckpt, "tokens": tokens,
        "step_s_median": statistics.median(times), "step_s_all": times, "peak_rss_above_loaded_mb": _rss_mb() - base,
        "attention_density": density, "loss": float(loss),
    }  # fmt: skip


def wan_densities() -> list[dict]:
    from diffusion_attn.variants.base import TokenLayout
    from diffusion_attn.variants.radial import Radial

    out = []
    for frames in (81, 161, 321):
        grid = ((frames - 1) // 4 + 1, 480 // 16, 832 // 16)  # VAE 4x temporal / 8x spatial, patch (1, 2, 2)
        layout = TokenLayout(grid=grid, text_len=0, text_first=False, family="wan")
        r = Radial()
        t = time.perf_counter()
        bm = r.block_mask(layout)  # [nb, nb]: blocks of 128 tokens
        out.append({
            "frames": frames, "grid": grid, "tokens": grid[0] * grid[1] * grid[2],
            "radial_block_density": float(bm.float().mean()), "settings": r.resolved("wan"),
            "build_s": time.perf_counter() - t,
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--one", nargs=3, metavar=("LENGTH", "ATTN", "CKPT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.one[2] == "1", a.steps)))
        return 0
    configs = [(n, at, ck) for n in LENGTHS for at in ("dense", "radial") for ck in (False, True)]
    if a.smoke:
        configs, a.steps = [("1x", "radial", False)], 1
    rows = []
    for length, attn, ckpt in configs:
        cmd = [sys.executable, __file__, "--steps", str(a.steps), "--one", length, attn, "1" if ckpt else "0"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}))
        rows.append(row)
    if a.smoke:
        return 0
    dens = wan_densities()
    for d in dens:
        print(json.dumps(d))
    out = {
        "world_model_lora_step": rows, "wan21_radial_density": dens,
        "machine": {"cpu_count": os.cpu_count(), "threads": 1, "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},
    }  # fmt: skip
    path = ROOT / "benchmarks" / "results" / "train_lora_scaling.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Images/s of agent attention vs softmax attention in ViT-S at 224, 448 and 1024 px.

    python benchmarks/agent_bench.py            # CUDA, bf16 (target: >= 3x at 1024^2)
    python benchmarks/agent_bench.py --smoke    # tiny model on CPU (checks the script)

Both models are timm's vit_small_patch16 at the given size; the agent model is the same network
after `vision_attn.inject(model, Agent(num_agents=49))`. Writes JSON + PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _images_per_s(model, x, cuda: bool, iters: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            model(x)
        if cuda:
            torch.cuda.synchronize()
    return x.shape[0] * iters / (time.perf_counter() - t)


def bench(size: int, batch: int, dtype, device, iters: int, smoke: bool) -> dict:
    import timm

    import vision_attn as va

    kw = dict(img_size=size, num_classes=1000)
    if smoke:
        kw.update(embed_dim=64, depth=2, num_heads=2)
    softmax = timm.create_model("vit_small_patch16_224", **kw).to(device, dtype).eval()
    agent = timm.create_model("vit_small_patch16_224", **kw).to(device, dtype).eval()
    va.inject(agent, va.Agent(num_agents=4 if smoke else 49))
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    s = _images_per_s(softmax, x, cuda, iters)
    a = _images_per_s(agent, x, cuda, iters)
    return {"img_size": size, "batch": batch, "tokens": (size // 16) ** 2, "softmax_img_s": s, "agent_img_s": a,
            "speedup": a / s}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, plan, iters = torch.device("cpu"), torch.float32, [(32, 2), (64, 2)], 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("agent_bench.py needs a CUDA GPU (use --smoke to check the script on CPU)")
        device, dtype, plan, iters = torch.device("cuda"), torch.bfloat16, [(224, 64), (448, 16), (1024, 4)], 20
    rows = [bench(size, batch, dtype, device, iters, args.smoke) for size, batch in plan]
    report = {
        "benchmark": "agent_bench",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__},
        "dtype": str(dtype),
        "target": {"speedup_at_1024": 3.0},
        "results": rows,
        "pass": None if args.smoke else rows[-1]["speedup"] >= 3.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "agent_bench_smoke" if args.smoke else f"agent_bench_{report['device'].replace(' ', '_')}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["img_size"] for r in rows], [r["speedup"] for r in rows], "o-")
    ax.axhline(1.0, color="gray", ls="--")
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("agent / softmax images/s")
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=100)
    print(json.dumps(rows, indent=1))
    return report


if __name__ == "__main__":
    main()

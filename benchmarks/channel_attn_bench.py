"""Fused ECA (attn_kernels.channel_attn) vs timm's eager EcaModule, forward and forward+backward.

    python benchmarks/channel_attn_bench.py            # CUDA
    python benchmarks/channel_attn_bench.py --smoke    # tiny, CPU interpreter (checks the script)

Writes JSON (device, versions, shapes, times, ratios) and a PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(64, 64, 56, 56), (64, 256, 28, 28), (64, 512, 14, 14), (64, 1280, 7, 7), (64, 32, 112, 112)]
SMOKE = [(2, 8, 6, 6)]


def _time(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _bench_shape(B: int, C: int, H: int, W: int, dev: str, dtype: torch.dtype, cuda: bool) -> dict:
    from timm.layers import EcaModule

    from attn_kernels.channel_attn import eca_fused

    x = torch.randn(B, C, H, W, device=dev, dtype=dtype, requires_grad=True)
    eager = EcaModule(channels=C).to(dev, dtype)
    w = eager.conv.weight
    go = torch.randn_like(x)
    fused = lambda: eca_fused(x, w, 1.0, backend="triton")  # noqa: E731
    fwd_e = _time(lambda: eager(x), cuda)
    fwd_f = _time(fused, cuda)
    bwd_e = _time(lambda: torch.autograd.grad(eager(x), x, go), cuda)
    bwd_f = _time(lambda: torch.autograd.grad(fused(), x, go), cuda)
    with torch.no_grad():
        err = float((eager(x) - fused()).abs().max())
    gb = 2 * x.numel() * x.element_size() / 1e9  # one read + one write (ideal traffic, fwd)
    return dict(shape=[B, C, H, W], fwd_eager_ms=fwd_e, fwd_fused_ms=fwd_f, fwdbwd_eager_ms=bwd_e,
                fwdbwd_fused_ms=bwd_f, speedup_fwd=fwd_e / fwd_f, speedup_fwdbwd=bwd_e / bwd_f,
                fused_fwd_gbps_ideal_traffic=gb / (fwd_f / 1e3), max_err=err)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("channel_attn_bench.py needs a CUDA GPU (use --smoke to check the script on CPU)")
    import triton

    cuda = not args.smoke
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    rows, interrupted = [], None
    try:
        for B, C, H, W in SMOKE if args.smoke else SHAPES:
            rows.append(_bench_shape(B, C, H, W, dev, dtype, cuda))
    except KeyboardInterrupt:  # run_gpu.sh's section limit: keep the finished shapes
        interrupted = "KeyboardInterrupt: the rows above are complete"
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for r in rows:  # a speed-up counts only when the fused output matches the eager module's
        r["check_ok"] = r["max_err"] == r["max_err"] and r["max_err"] <= tol
    report = {
        "benchmark": "channel_attn_bench",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "dtype": str(dtype),
        "results": rows,
        "check_tolerance_max_abs": tol,
        "all_checks_pass": all(r["check_ok"] for r in rows) if rows else None,
        "interrupted": interrupted,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "channel_attn_bench_smoke" if args.smoke else f"channel_attn_bench_{report['device'].replace(' ', '_')}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = ["x".join(map(str, r["shape"])) for r in rows]
    ax.bar([i - 0.2 for i in range(len(rows))], [r["speedup_fwd"] for r in rows], 0.4, label="fwd")
    ax.bar([i + 0.2 for i in range(len(rows))], [r["speedup_fwdbwd"] for r in rows], 0.4, label="fwd+bwd")
    ax.axhline(1.0, color="gray", ls="--")
    ax.set_xticks(range(len(rows)), labels, rotation=20, fontsize=7)
    ax.set_ylabel("speed-up vs timm EcaModule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=100)
    print(json.dumps(rows, indent=1))
    return report


if __name__ == "__main__":
    main()

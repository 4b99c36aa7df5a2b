"""Kernel benchmark: attnplug's dense and block-sparse Triton attention vs torch SDPA (each
backend) and FlexAttention on the same block mask, in one run.

Shapes: Wan2.1 480p x 81 frames (B1 H12 N32760 D128) and HunyuanVideo 720p x 129 frames
(B1 H24 N~119k D128); densities 1, 0.5, 0.25, 0.1 (random 128x128 block masks, diagonal kept);
modifier overhead; max error vs an fp32 reference on a slice. Writes JSON (device, versions,
shapes, times, TFLOP/s, ratios, pass/fail of the targets) and a PNG plot to benchmarks/results/.

    python benchmarks/kernel_bench.py                # CUDA, bf16
    python benchmarks/kernel_bench.py --smoke        # tiny shapes, CPU interpreter (checks the script)
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

SHAPES = {
    "wan2.1_480p_81f": dict(B=1, H=12, N=32760, D=128),
    "hunyuan_720p_129f": dict(B=1, H=24, N=119040, D=128),
}
SMOKE_SHAPES = {"smoke": dict(B=1, H=2, N=200, D=32)}
DENSITIES = (1.0, 0.5, 0.25, 0.1)
TARGETS = {
    "dense_vs_best_sdpa": 0.9,  # our dense speed >= 0.9x the best SDPA backend
    "sparse_time_over_density_dense": 1.15,  # sparse time <= 1.15 * density * dense time
    "vs_flex_same_mask": 1.2,  # >= 1.2x FlexAttention
    "modifier_overhead": 1.05,  # modifiers <= 1.05x plain
    "max_err_bf16": 2e-2,
}


def _time(fn, smoke: bool) -> float:
    """Median milliseconds of fn()."""
    if not smoke and torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _block_mask(H: int, nb: int, density: float, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    bm = torch.rand(1, H, nb, nb, generator=g) < density
    bm |= torch.eye(nb, dtype=torch.bool)
    return bm.to(device)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return names


def bench_shape(name: str, B: int, H: int, N: int, D: int, *, dtype, device, block: int, smoke: bool) -> dict:
    from attn_kernels import BlockLayout, LogitDecay, OutputMix, attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    flops_dense = 4 * B * H * N * N * D
    res: dict = {"shape": dict(B=B, H=H, N=N, D=D, block=block), "sdpa_ms": {}, "sparse": {}}
    backend = "triton"
    dense = BlockLayout.dense(N, N, block, block).to(device)
    res["dense_ms"] = _time(lambda: attention(q, k, v, dense, backend=backend), smoke)
    res["dense_tflops"] = flops_dense / res["dense_ms"] / 1e9
    if device.type == "cuda":
        from torch.nn.attention import sdpa_kernel

        for bname, be in _sdpa_backends().items():
            if bname == "math" and N > 40000:
                continue  # N x N memory
            try:
                with sdpa_kernel(be):
                    res["sdpa_ms"][bname] = _time(
                        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), smoke
                    )
            except RuntimeError as e:  # backend unavailable for this shape/dtype
                res["sdpa_ms"][bname] = f"unavailable: {str(e).splitlines()[0][:120]}"
    times = [t for t in res["sdpa_ms"].values() if isinstance(t, float)]
    if times:
        res["best_sdpa_ms"] = min(times)
        res["ratio_dense_vs_best_sdpa"] = res["best_sdpa_ms"] / res["dense_ms"]
    nb = -(-N // block)
    flex = None
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention

            flex = torch.compile(flex_attention)
        except Exception as e:  # pragma: no cover
            res["flex_error"] = str(e)[:200]
    for density in DENSITIES:
        bm = _block_mask(H, nb, density, device)
        lay = BlockLayout.from_block_mask(bm, N, N, block, block)
        entry: dict = {"block_density": lay.block_density}
        entry["ms"] = _time(lambda lay=lay: attention(q, k, v, lay, backend=backend), smoke)
        entry["ratio_time_over_density_dense"] = entry["ms"] / (max(lay.block_density, 1e-9) * res["dense_ms"])
        if flex is not None:
            counts = bm.sum(-1).to(torch.int32)
            idx = torch.argsort(bm.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
            bmask = BlockMask.from_kv_blocks(counts, idx, BLOCK_SIZE=block, seq_lengths=(N, N))
            entry["flex_ms"] = _time(lambda bmask=bmask: flex(q, k, v, block_mask=bmask), smoke)
            entry["ratio_vs_flex"] = entry["flex_ms"] / entry["ms"]
        res["sparse"][str(density)] = entry
    mods = (LogitDecay(0.9, N // 4), OutputMix(torch.full((H,), 0.25)))
    res["modifiers_ms"] = _time(lambda: attention(q, k, v, dense, modifiers=mods, backend=backend), smoke)
    res["ratio_modifier_overhead"] = res["modifiers_ms"] / res["dense_ms"]
    # accuracy on a slice of query rows vs the fp32 reference (full keys)
    rows = slice(0, min(N, 1024))
    out = attention(q, k, v, dense, backend=backend)[:, :, rows].float()
    ref = attention(q[:, :, rows].float().cpu(), k.float().cpu(), v.float().cpu(), backend="reference")
    res["max_err_vs_fp32"] = float((out.cpu() - ref).abs().max())
    return res


def check_targets(res: dict) -> dict:
    t = {}
    if "ratio_dense_vs_best_sdpa" in res:
        t["dense_vs_best_sdpa"] = res["ratio_dense_vs_best_sdpa"] >= TARGETS["dense_vs_best_sdpa"]
    t["sparse_scaling"] = all(
        e["ratio_time_over_density_dense"] <= TARGETS["sparse_time_over_density_dense"]
        for d, e in res["sparse"].items()
        if float(d) < 1
    )
    flex = [e["ratio_vs_flex"] for e in res["sparse"].values() if "ratio_vs_flex" in e]
    if flex:
        t["vs_flex_same_mask"] = min(flex) >= TARGETS["vs_flex_same_mask"]
    t["modifier_overhead"] = res["ratio_modifier_overhead"] <= TARGETS["modifier_overhead"]
    t["max_err"] = res["max_err_vs_fp32"] <= TARGETS["max_err_bf16"]
    return t


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        dens = [float(d) for d in res["sparse"]]
        ax.plot(dens, [e["ms"] for e in res["sparse"].values()], "o-", label="attnplug block-sparse")
        if all("flex_ms" in e for e in res["sparse"].values()):
            ax.plot(dens, [e["flex_ms"] for e in res["sparse"].values()], "s--", label="FlexAttention")
        ax.plot(dens, [d * res["dense_ms"] for d in dens], ":", label="density x dense (ideal)")
        if "best_sdpa_ms" in res:
            ax.axhline(res["best_sdpa_ms"], color="gray", ls="--", label="best SDPA (dense)")
        ax.set_xlabel("block density")
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, shapes, block = torch.device("cpu"), torch.float32, SMOKE_SHAPES, 32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("kernel_bench.py needs a CUDA GPU (use --smoke to check the script on CPU)")
        device, dtype, block = torch.device("cuda"), getattr(torch, args.dtype), args.block
        shapes = {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    import triton

    results = {
        name: bench_shape(name, **s, dtype=dtype, device=device, block=block, smoke=args.smoke)
        for name, s in shapes.items()
    }
    report = {
        "benchmark": "kernel_bench",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "dtype": str(dtype),
        "targets": TARGETS,
        "results": results,
        "pass": {name: check_targets(r) for name, r in results.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_bench_smoke" if args.smoke else f"kernel_bench_{torch.cuda.get_device_name().replace(' ', '_')}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(results, args.out / f"{stem}.png")
    print(json.dumps(report["pass"], indent=2))
    return report


if __name__ == "__main__":
    main()

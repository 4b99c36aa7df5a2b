"""Sparse video attention benchmark: dense SDPA vs radial vs NA/GNA vs LiteAttention.

End-to-end: one forward of a randomly initialised WanTransformer3DModel with the
Wan2.1-T2V-1.3B config (30 layers, 12 heads x 128) at 480p x 81 frames (latent 21 x 60 x 104
-> 21 x 30 x 52 tokens) in bf16, and at 4x frames (81 latent frames) where memory allows.
Op-level: HunyuanVideo's 30 x 48 x 80 grid, 24 heads, head dim 128: NA window 18x24x24 and GNA
stride 16x8x8 against cuDNN SDPA (NATTEN's H100 figures: 3.4x and 9.7x).

    python benchmarks/diffusion_bench.py                 # GPU, writes benchmarks/results/
    python benchmarks/diffusion_bench.py --smoke --out /tmp/x   # tiny CPU run (tests)

Writes <out>/diffusion_bench[_smoke].json (device, versions, shapes, times in ms, ratios)
and a .png bar plot of the speed-ups with the targets.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {"e2e_radial_1x": 1.9, "e2e_radial_4x": 3.7, "op_na": 3.4, "op_gna": 9.7}

WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
WAN_TINY = dict(
    WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "diffusers", "natten"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    out["cuda"] = torch.version.cuda
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


# -- end to end ----------------------------------------------------------------------------------
def e2e(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    import diffusion_attn as da
    from diffusion_attn.variants import LiteAttention, Neighborhood, Radial

    cfg = WAN_TINY if args.smoke else WAN_1_3B
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg).to(dtype).eval()
    lengths = {"1x": args.latent_frames}
    if args.four_x:
        lengths["4x"] = 4 * (args.latent_frames - 1) + 1  # 4x video frames -> latent 1 + 4 (F - 1)
    results: dict[str, Any] = {"config": cfg, "runs": {}}
    variants = {
        "radial": lambda: Radial(dense_steps=0),  # official Wan defaults, measured on a sparse step
        "na": lambda: Neighborhood(kernel_size=tuple(args.e2e_na_kernel)),
        "gna": lambda: Neighborhood(kernel_size=tuple(args.e2e_na_kernel), stride=tuple(args.e2e_gna_stride)),
        "lite": lambda: LiteAttention(threshold=args.lite_threshold),
    }
    for tag, frames in lengths.items():
        lat = (1, cfg["in_channels"], frames, args.latent_hw[0], args.latent_hw[1])
        grid = (frames, args.latent_hw[0] // 2, args.latent_hw[1] // 2)
        run: dict[str, Any] = {
            "latent": list(lat),
            "grid": list(grid),
            "tokens": math.prod(grid),
            "ms": {},
            "notes": {},
        }
        try:
            x = torch.randn(lat, device=device, dtype=dtype)
            t = torch.tensor([500.0], device=device)
            ctx = torch.randn(1, args.text_len, cfg["text_dim"], device=device, dtype=dtype)

            def fwd(x=x, t=t, ctx=ctx):
                with torch.inference_mode():
                    return model(x, t, ctx, return_dict=False)[0]

            run["ms"]["dense"] = timeit(fwd, device, args.warmup, args.iters)
            ref = fwd().float()
            for name, make in variants.items():
                if name not in args.variants:
                    continue
                try:
                    handle = da.apply(model, make())
                except Exception as exc:  # report and go on: one variant must not hide the others
                    run["notes"][name] = f"apply failed: {type(exc).__name__}: {exc}"
                    continue
                try:
                    var = handle.variants[0]
                    if name == "lite":  # denoising steps 0..settle-1 (same input): the skip set settles
                        for step in range(args.lite_settle):
                            handle.set_step(step)
                            fwd()
                        handle.set_step(args.lite_settle)
                        sets = [s for st in handle.runtimes[0].states.values() for s in var.skip_set(st)]
                        if sets:
                            run.setdefault("lite_skipped_tiles", sum(float(s.float().mean()) for s in sets) / len(sets))
                    out = fwd().float()
                    run["ms"][name] = timeit(fwd, device, args.warmup, args.iters)
                    run["notes"][name] = f"rel. L2 vs dense {((out - ref).norm() / ref.norm()).item():.4f}"
                except Exception as exc:
                    run["notes"][name] = f"failed: {type(exc).__name__}: {exc}"
                finally:
                    handle.remove()
            run["speedup"] = {k: run["ms"]["dense"] / v for k, v in run["ms"].items() if k != "dense"}
        except torch.cuda.OutOfMemoryError as exc:  # 4x may not fit
            run["notes"]["oom"] = str(exc).splitlines()[0]
        results["runs"][tag] = run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# -- op level ------------------------------------------------------------------------------------
def op_level(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import attn_kernels
    from attn_kernels.verify import check_rows_of, plant_peaks, rows_to_check
    from diffusion_attn.variants import Neighborhood, TokenLayout

    grid = tuple(args.op_grid)
    heads, hd = args.op_heads, args.op_head_dim
    n = math.prod(grid)
    q, k, v = (torch.randn(1, heads, n, hd, device=device, dtype=dtype) for _ in range(3))
    res: dict[str, Any] = {
        "grid": list(grid),
        "heads": heads,
        "head_dim": hd,
        "ms": {},
        "density": {},
        "block_density": {},
        "notes": {},
    }

    def sdpa():
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    res["ms"]["sdpa"] = timeit(sdpa, device, args.warmup, args.iters)
    backend = "reference" if device.type == "cpu" else "triton"
    layout = TokenLayout(grid)
    for name, var in (
        ("na", Neighborhood(kernel_size=tuple(args.op_na_kernel))),
        ("gna", Neighborhood(kernel_size=tuple(args.op_na_kernel), stride=tuple(args.op_gna_stride))),
    ):
        t0 = time.perf_counter()
        bl, perm = var.build(layout, device)
        res["notes"][f"{name}_build_s"] = round(time.perf_counter() - t0, 3)
        res["density"][name] = bl.density
        res["block_density"][name] = bl.block_density
        qp, kp, vp = (x[:, :, perm] if perm is not None else x for x in (q, k, v))

        def run(bl=bl, qp=qp, kp=kp, vp=vp):
            return attn_kernels.attention(qp, kp, vp, bl, backend=backend)

        res["ms"][name] = timeit(run, device, args.warmup, args.iters)
        # the figure counts only if the kernel's rows pass the peaked-logit check against float64
        rows = rows_to_check(n, 128, device)
        kc = plant_peaks(qp, kp, bl, rows)
        o, lse = attn_kernels.attention(qp, kc, vp, bl, return_lse=True, backend=backend)
        res.setdefault("check", {})[name] = check_rows_of(qp, kc, vp, bl, o, lse, rows).as_dict()

        def run_with_perm(bl=bl, perm=perm):  # including the token permutation and its inverse
            if perm is None:
                return attn_kernels.attention(q, k, v, bl, backend=backend)
            o = attn_kernels.attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], bl, backend=backend)
            return o[:, :, torch.argsort(perm)]

        res["ms"][f"{name}+perm"] = timeit(run_with_perm, device, args.warmup, args.iters)
    ok = {k: res["check"].get(k.split("+")[0], {}).get("ok", False) for k in res["ms"] if k != "sdpa"}
    res["speedup"] = {k: res["ms"]["sdpa"] / v for k, v in res["ms"].items() if k != "sdpa" and ok[k]}
    res["all_checks_pass"] = all(c["ok"] for c in res["check"].values())
    return res


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, vals, targets = [], [], []
    for tag, run in result.get("e2e", {}).get("runs", {}).items():
        for k, v in run.get("speedup", {}).items():
            labels.append(f"e2e {k} {tag}")
            vals.append(v)
            targets.append(TARGETS.get(f"e2e_{k}_{tag}"))
    for k, v in result.get("op", {}).get("speedup", {}).items():
        labels.append(f"op {k}")
        vals.append(v)
        targets.append(TARGETS.get(f"op_{k}"))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels) + 2), 4))
    ax.bar(range(len(vals)), vals, color="#2a4d8f")
    for i, t in enumerate(targets):
        if t is not None:
            ax.plot([i - 0.4, i + 0.4], [t, t], color="#d33", lw=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speed-up over dense (x)")
    ax.set_title(f"{result['device']['name']} (red: targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (model, grids, iterations)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--no-op", dest="op", action="store_false")
    p.add_argument("--no-4x", dest="four_x", action="store_false")
    p.add_argument("--variants", nargs="+", default=["radial", "na", "gna", "lite"])
    p.add_argument("--latent-frames", type=int, default=21)
    p.add_argument("--latent-hw", type=int, nargs=2, default=(60, 104))
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--e2e-na-kernel", type=int, nargs=3, default=(13, 15, 15))
    p.add_argument("--e2e-gna-stride", type=int, nargs=3, default=(4, 5, 5))
    p.add_argument("--lite-threshold", type=float, default=-10.0)
    p.add_argument("--lite-settle", type=int, default=4)
    p.add_argument("--op-grid", type=int, nargs=3, default=(30, 48, 80))
    p.add_argument("--op-heads", type=int, default=24)
    p.add_argument("--op-head-dim", type=int, default=128)
    p.add_argument("--op-na-kernel", type=int, nargs=3, default=(18, 24, 24))
    p.add_argument("--op-gna-stride", type=int, nargs=3, default=(16, 8, 8))
    a = p.parse_args(argv)
    if a.smoke:  # tiny shapes; every code path still runs
        a.warmup, a.iters = 0, 1
        a.latent_frames, a.latent_hw, a.text_len = 3, (8, 12), 8
        a.e2e_na_kernel, a.e2e_gna_stride = (3, 3, 5), (1, 3, 5)
        a.op_grid, a.op_heads, a.op_head_dim = (8, 16, 16), 2, 16
        a.op_na_kernel, a.op_gna_stride = (4, 8, 8), (4, 8, 8)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict[str, Any] = {
        "device": device_info(device),
        "versions": versions(),
        "dtype": str(dtype),
        "smoke": args.smoke,
        "targets": TARGETS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "diffusion_bench_smoke" if args.smoke else "diffusion_bench"

    def save() -> None:  # after each part: a run cut short (SIGINT) keeps what finished
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))

    try:
        if args.op:
            result["op"] = op_level(args, device, dtype)
            save()
        if args.e2e:
            result["e2e"] = e2e(args, device, dtype)
    except KeyboardInterrupt:
        result["interrupted"] = "KeyboardInterrupt: the parts above are complete"
    save()
    try:
        plot(result, args.out / f"{stem}.png")
    except Exception as e:  # the JSON is what counts
        print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(json.dumps({k: result[k] for k in ("device",)} | {"op": result.get("op", {}).get("speedup")}, default=str))
    return result


if __name__ == "__main__":
    main()

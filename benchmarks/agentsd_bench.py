"""AgentSD's self-attention against softmax attention at Stable Diffusion 1.5's highest-resolution level.

    python benchmarks/agentsd_bench.py            # CPU (eager agent formula), fp32; GPU: --gpu (bf16, fused kernel)
    python benchmarks/agentsd_bench.py --smoke    # seconds: tiny sizes (checks the script)

One attention call of SD 1.5's first down block (320 channels, 8 heads of 40, batch 2 for CFG) on
square latents g x g (256 px -> 32, 512 px -> 64, 768 px -> 96), forward only, median of interleaved
repeats, three ways on the same q, k, v and merge metric:

* softmax: `torch.nn.functional.scaled_dot_product_attention` (what `AttnProcessor2_0` runs);
* tome:    AgentSD's late phase (stride 2, merge 0.4, agents 0.5: no agents fit), merged softmax;
* agentsd: AgentSD's early phase (stride 4, merge 0.4, agents 0.95), merged agent attention,

the last two through `AgentSD.plan(...).compute`, the code the hooked UNet runs (merging, the agent
formula or kernel, un-merging). The q/k/v projections and `to_out` are the model's and the same for
all three (not timed). On CPU the sweep runs at torch's intra-op thread count and at 1 thread
(`--threads`): on a loaded machine, every small parallel op of the merging pays for preempted worker
threads, so the 1-thread figures are the stable ones; the load average is recorded. Writes
results/agentsd_bench_<device>.json (`--out DIR` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _compute(var, grid: int, batch: int, heads: int, head_dim: int, step: int, device, dtype):
    """AgentSD's compute callable for one UNet self-attention call (and its metric dict)."""
    from diffusion_attn.variants.base import AttnContext, AttnPlan, TokenLayout

    lay = TokenLayout(grid=(1, grid, grid), family="unet", downsample=1)
    ctx = AttnContext(0, 1, step, None, lay, batch, heads, head_dim, device, dtype)
    plan = var.plan(ctx, AttnPlan())
    return plan


def layer_sweep(grids, batch, heads, head_dim, repeats, device, dtype) -> list[dict]:
    import diffusion_attn as da
    from diffusion_attn.variants.agentsd import expected_agents

    cuda = device.type == "cuda"
    backend = "auto"
    rows = []
    for g in grids:
        n = g * g
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype) for _ in range(3))
        metric = torch.randn(batch, n, heads * head_dim, generator=gen).to(device, dtype)
        var = da.AgentSD(use_rand=False)
        early = _compute(var, g, batch, heads, head_dim, 0, device, dtype)
        late = _compute(var, g, batch, heads, head_dim, var.switch_step, device, dtype)
        early.extras["metric"] = metric
        late.extras["metric"] = metric
        fns = {
            "softmax": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "tome": lambda q=q, k=k, v=v, p=late: p.compute(q, k, v, backend),
            "agentsd": lambda q=q, k=k, v=v, p=early: p.compute(q, k, v, backend),
        }
        times = {name: [] for name in fns}
        with torch.inference_mode():
            for fn in fns.values():  # warm-up
                fn()
            for _ in range(repeats):  # interleaved: load changes hit every method alike
                for name, fn in fns.items():
                    times[name].append(_time(fn, cuda))
        sizes = var.sizes(n, g, g, 0)
        row = {
            "grid": g,
            "tokens": n,
            "batch": batch,
            "merged_tokens": sizes[3],
            "agents": expected_agents(n, g, g, var.merge_ratio, var.agent_ratio, var.stride),
            "late_merged_tokens": var.sizes(n, g, g, var.switch_step)[3],
        }
        for name in fns:
            row[f"{name}_ms"] = 1e3 * statistics.median(times[name])
        row["tome_speedup"] = row["softmax_ms"] / row["tome_ms"]
        row["agentsd_speedup"] = row["softmax_ms"] / row["agentsd_ms"]
        rows.append(row)
        print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in row.items()}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few repeats (checks the script)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16 (the fused agent kernel where it fits)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--threads", type=int, nargs="*", default=None, help="CPU intra-op thread counts (default: torch's, 1)"
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("agentsd_bench: --gpu needs CUDA")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    grids = (16, 24) if args.smoke else (32, 48, 64, 96)
    repeats = args.repeats or (2 if args.smoke else 7)
    default_threads = torch.get_num_threads()
    threads = args.threads or ([1] if args.smoke else sorted({default_threads, 1}, reverse=True))
    if args.gpu:
        threads = [default_threads]
    runs = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            print(f"-- {n} thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)
            runs[str(n)] = {
                "load_avg_before": os.getloadavg()[0],
                "layer": layer_sweep(grids, 2, 8, 40, repeats, device, dtype),
            }
    finally:
        torch.set_num_threads(default_threads)
    result = {
        "what": "one SD1.5 highest-resolution self-attention call (8 heads x 40, batch 2), forward, median ms",
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_after": os.getloadavg()[0],
        },
        "dtype": str(dtype).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "smoke": args.smoke,
        "threads": runs,
        "layer": runs[str(threads[-1])]["layer"],  # the last thread count's rows (1 on CPU)
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"agentsd_bench_{'smoke' if args.smoke else device.type}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / name}")
    return result


if __name__ == "__main__":
    main()

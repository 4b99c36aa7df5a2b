"""Where agent attention beats softmax attention: the token-count crossover, CPU (eager) and GPU.

    python benchmarks/agent_bench.py                 # CPU: attention-layer sweep, eager agent vs timm's SDPA
    python benchmarks/agent_bench.py --gpu           # CUDA, bf16: the sweep + ViT-S images/s at 224/448/1024 px
    python benchmarks/agent_bench.py --smoke         # seconds: tiny sweep (checks the script)

The sweep times one ViT-S attention layer (dim 384, 6 heads, class token) at square patch grids
g x g (N = g² + 1 tokens): timm's `Attention` (fused SDPA) against `AgentAttention` built from it
(n agents; eager on CPU, the fused Triton kernel on CUDA), forward only, median of interleaved
repeats. The crossover is the smallest N from which agent attention is faster at every larger
measured N, interpolated (log-log) between the two bracketing sizes. Writes
results/agent_bench_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

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


def layer_sweep(grids, agents, dim, heads, batch, repeats, device, dtype, rows: list | None = None) -> list[dict]:
    """Seconds per forward of one attention layer, softmax (SDPA) vs agent, at each grid and agent
    count, appended to `rows` as each grid finishes (a run cut short keeps the finished grids)."""
    from timm.layers import Attention

    from vision_attn.variants.agent import AgentAttention

    cuda = device.type == "cuda"
    rows = [] if rows is None else rows
    for g in grids:
        n_tok = g * g + 1
        torch.manual_seed(0)
        base = Attention(dim, num_heads=heads, qkv_bias=True).to(device, dtype).eval()
        x = torch.randn(batch, n_tok, dim, device=device, dtype=dtype)
        mods = {"softmax": base}
        for n in agents:
            if n <= g * g and math.isqrt(n) ** 2 == n:
                mods[f"agent{n}"] = AgentAttention(base, (g, g), 1, n).to(device, dtype).eval()
        times = {k: [] for k in mods}
        checks = {}
        with torch.inference_mode():
            for k, m in mods.items():  # a figure counts only if the timed path equals the eager formula
                if k != "softmax":
                    got = m(x).float()
                    m.backend = "reference"
                    ref = m(x).float()
                    m.backend = "auto"
                    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                    checks[k] = {"rel_err_vs_eager": err, "ok": err <= (2e-2 if dtype != torch.float32 else 1e-4)}
            for m in mods.values():  # warm-up
                m(x)
                m(x)
            for _ in range(repeats):  # interleaved: load changes hit every method alike
                for k, m in mods.items():
                    times[k].append(_time(lambda m=m, x=x: m(x), cuda))
        row = {"grid": g, "tokens": n_tok, "batch": batch, "softmax_ms": 1e3 * statistics.median(times["softmax"])}
        for k in mods:
            if k != "softmax":
                row[f"{k}_ms"] = 1e3 * statistics.median(times[k])
                row[f"{k}_check"] = checks[k]
                if checks[k]["ok"]:
                    row[f"{k}_speedup"] = row["softmax_ms"] / row[f"{k}_ms"]
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def crossover(rows: list[dict], key: str) -> float | None:
    """Smallest token count from which `key` speedup stays > 1 (log-log interpolation), None if never."""
    pts = [(r["tokens"], r[key]) for r in rows if key in r]
    if not pts or pts[-1][1] <= 1.0:
        return None
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] > 1.0:
        i -= 1
    if i == 0:
        return float(pts[0][0])  # faster everywhere measured: the crossover is at or below the smallest size
    (n0, s0), (n1, s1) = pts[i - 1], pts[i]
    t = (0.0 - math.log(s0)) / (math.log(s1) - math.log(s0))
    return float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))


def model_images_per_s(sizes, batch_for, dtype, device, iters: int, agents: int) -> list[dict]:
    import timm

    import vision_attn as va

    cuda = device.type == "cuda"
    rows = []
    for size in sizes:
        softmax = timm.create_model("vit_small_patch16_224", img_size=size).to(device, dtype).eval()
        agent = timm.create_model("vit_small_patch16_224", img_size=size).to(device, dtype).eval()
        va.inject(agent, va.Agent(num_agents=agents))
        x = torch.randn(batch_for(size), 3, size, size, device=device, dtype=dtype)
        res = {}
        with torch.inference_mode():
            for name, m in (("softmax", softmax), ("agent", agent)):
                m(x)
                res[name] = x.shape[0] * iters / sum(_time(lambda m=m, x=x: m(x), cuda) for _ in range(iters))
        rows.append({"img_size": size, "tokens": (size // 16) ** 2 + 1, "batch": x.shape[0],
                     "softmax_img_s": res["softmax"], "agent_img_s": res["agent"],
                     "speedup": res["agent"] / res["softmax"]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sweep on the CPU (checks the script)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, plus whole-model images/s")
    ap.add_argument("--agents", type=int, nargs="+", default=[16, 49])
    ap.add_argument("--grids", type=int, nargs="+", default=[8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("agent_bench.py --gpu needs a CUDA GPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    dim, heads = 384, 6
    if args.smoke:
        args.grids, args.agents, args.repeats, dim, heads = [4, 8], [4], 2, 64, 2
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict] = []
    interrupted = None
    try:
        layer_sweep(args.grids, args.agents, dim, heads, args.batch, args.repeats, device, dtype, rows)
    except KeyboardInterrupt:  # run_gpu.sh's section limit: keep the finished grids
        interrupted = "KeyboardInterrupt: the rows above are complete"
    report = {
        "benchmark": "agent_bench",
        "command": "python benchmarks/agent_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
        "threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__},
        "dtype": str(dtype),
        "layer": {"dim": dim, "heads": heads, "class_token": True, "softmax": "timm.layers.Attention (fused SDPA)",
                  "agent": "AgentAttention " + ("(fused Triton kernel)" if device.type == "cuda" else "(eager)")},
        "sweep": rows,
        "crossover_tokens": {f"agent{n}": crossover(rows, f"agent{n}_speedup") for n in args.agents},
    }  # fmt: skip
    report["interrupted"] = interrupted
    if args.gpu and not args.smoke and interrupted is None:
        report["vit_small_images_per_s"] = model_images_per_s(
            [224, 448, 1024], lambda s: {224: 64, 448: 16, 1024: 4}[s], dtype, device, 20, 49
        )
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else ("gpu" if args.gpu else "cpu")
    (args.out / f"agent_bench_{tag}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["crossover_tokens"]))
    return report


if __name__ == "__main__":
    main()

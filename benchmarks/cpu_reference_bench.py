"""CPU reference backend vs torch SDPA: dense and block-sparse attention at one video-ish shape.

Times `attn_kernels.reference_attention` (what `attention(..., backend="reference")` runs on CPU)
against `F.scaled_dot_product_attention`, fp32, B1 H4 N4096 D64: dense, and random 128-token
block masks (diagonal kept) at block densities 0.5 / 0.25 / 0.1. Cases are timed round-robin
(each repeat runs every case once, so machine load hits all alike) after a warm-up call that also
builds the layout's cached plan; the medians are reported. Targets: our dense within 1.5x of
SDPA; 25% density at most 0.5x our dense. A spot check compares each output with SDPA under the
equivalent boolean mask. Runs once per intra-op thread count (torch's, then 1): on a shared
machine every parallel region waits for busy cores, which a single thread never does; the load
average is recorded. Writes <out>/cpu_reference.{json,png}.

    python benchmarks/cpu_reference_bench.py                      # -> benchmarks/results/
    python benchmarks/cpu_reference_bench.py --threads 4          # one thread count only
    python benchmarks/cpu_reference_bench.py --smoke [--out DIR]  # tiny shapes (a temp dir by default)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attn_kernels import BlockLayout, reference_attention  # noqa: E402

TARGETS = {
    "dense_vs_sdpa": ("<=", 1.5, "our dense time / SDPA time"),
    "sparse_0.25_vs_dense": ("<=", 0.5, "our time at block density 0.25 / our dense time"),
}
FULL = {"B": 1, "H": 4, "N": 4096, "D": 64, "block": 128, "densities": (0.5, 0.25, 0.1), "repeats": 7}
SMOKE = {"B": 1, "H": 2, "N": 256, "D": 16, "block": 32, "densities": (0.5, 0.25, 0.1), "repeats": 2}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def block_mask(nb: int, density: float, seed: int) -> torch.Tensor:
    """Random bool [nb, nb] block mask with the diagonal kept."""
    g = torch.Generator().manual_seed(seed)
    bm = torch.rand(nb, nb, generator=g) < density
    bm.fill_diagonal_(True)
    return bm


def run(cfg: dict, repeats: int) -> dict:
    """Times (ms, every sample) and spot-check errors of every case."""
    B, H, N, D, blk = cfg["B"], cfg["H"], cfg["N"], cfg["D"], cfg["block"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    nb = -(-N // blk)
    cases = {
        "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v), None),
        "dense": (lambda: reference_attention(q, k, v), None),
    }
    info: dict[str, dict] = {"sdpa": {}, "dense": {}}
    for i, d in enumerate(cfg["densities"]):
        bm = block_mask(nb, d, seed=1 + i)
        lay = BlockLayout.from_block_mask(bm, N, N, blk, blk)
        tm = bm.repeat_interleave(blk, 0).repeat_interleave(blk, 1)[:N, :N]
        cases[f"sparse_{d}"] = (lambda lay=lay: reference_attention(q, k, v, lay), tm)
        info[f"sparse_{d}"] = {"target_density": d, "block_density": lay.block_density}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for name, (fn, tm) in cases.items():  # warm-up; the first call builds the layout's plan
            t = time.perf_counter()
            out = fn()
            info[name]["first_call_ms"] = 1e3 * (time.perf_counter() - t)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=tm)
            info[name]["max_abs_err_vs_sdpa"] = float((out - ref).abs().max())
        for _ in range(repeats):
            for name, (fn, _) in cases.items():
                t = time.perf_counter()
                fn()
                samples[name].append(1e3 * (time.perf_counter() - t))
    return {"samples_ms": samples, "info": info}


def check(name: str, value: float) -> dict:
    cmp, thr, what = TARGETS[name]
    ok = value <= thr if cmp == "<=" else value >= thr
    return {"target": name, "value": value, "cmp": cmp, "threshold": thr, "what": what, "pass": bool(ok)}


def summarize(res: dict) -> dict:
    """Medians, ratios and target checks of one run."""
    med = {n: statistics.median(s) for n, s in res["samples_ms"].items()}
    ratios = {"dense_vs_sdpa": med["dense"] / med["sdpa"]}
    ratios.update({f"{n}_vs_dense": med[n] / med["dense"] for n in med if n.startswith("sparse_")})
    return {"median_ms": med, "ratios": ratios, "targets": [check(name, ratios[name]) for name in TARGETS]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    runs = report["by_threads"]
    names = list(report["median_ms"])
    width = 0.8 / len(runs)
    for j, (threads, run) in enumerate(runs.items()):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(names))]
        a.bar(xs, [run["median_ms"][n] for n in names], width, label=f"{threads} thread(s)")
    a.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    a.set_ylabel("median ms")
    a.set_title(report["shape_label"], fontsize=9)
    a.legend(fontsize=7)
    sparse = [n for n in names if n.startswith("sparse_")]
    dens = [report["cases"][n]["block_density"] for n in sparse]
    top = 1.6
    for threads, run in runs.items():
        ms = run["median_ms"]
        ys = [ms[n] / ms["dense"] for n in sparse]
        top = max(top, *ys)
        b.plot(dens, ys, "o-", label=f"ours sparse / ours dense, {threads} thread(s)")
    b.plot([0, 1], [0, 1], color="gray", ls=":", label="proportional to density")
    b.plot([0.25], [0.5], "rv", label="target: <= 0.5 at 0.25")
    b.set_xlabel("block density (diagonal included)")
    b.set_ylabel("time ratio")
    b.set_xlim(0, 1)
    b.set_ylim(0, top * 1.05)
    b.legend(fontsize=7)
    load = report["device"]["loadavg_1_5_15_before"][0]
    fig.suptitle(f"{report['device']['processor']}, {report['device']['cpu_count']} cores, load {load:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, says nothing on speed")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 7; smoke 2)")
    ap.add_argument(
        "--threads", type=int, nargs="+", default=None,
        help="torch intra-op thread counts, one full run each; the first carries the targets "
        "(default: torch's count, then 1 when that is more; smoke: torch's count)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    repeats = args.repeats or cfg["repeats"]
    results = ROOT / "benchmarks" / "results"
    out = args.out or (Path(tempfile.mkdtemp(prefix="cpu_ref_smoke_")) if args.smoke else results)
    if args.smoke and out.resolve() == results.resolve():
        raise SystemExit("--smoke numbers are not results: pass another --out (default: a temp dir)")
    default = torch.get_num_threads()
    threads = args.threads or ([default] if args.smoke or default == 1 else [default, 1])
    load0 = os.getloadavg()
    by_threads, res = {}, None
    try:
        for n in threads:
            torch.set_num_threads(n)
            r = run(cfg, repeats)
            res = res or r
            by_threads[str(n)] = {**summarize(r), "samples_ms": r["samples_ms"]}
    finally:
        torch.set_num_threads(default)
    head = by_threads[str(threads[0])]
    B, H, N, D = cfg["B"], cfg["H"], cfg["N"], cfg["D"]
    report = {
        "benchmark": "cpu_reference_bench",
        "smoke": args.smoke,
        "device": {
            "type": "cpu",
            "processor": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads[0],
            "loadavg_1_5_15_before": load0,
            "loadavg_1_5_15_after": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()},
        "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "float32", "block": cfg["block"]},
        "shape_label": f"B{B} H{H} N{N} D{D} fp32, {cfg['block']}-token blocks",
        "repeats": repeats,
        "median_ms": head["median_ms"],
        "samples_ms": head["samples_ms"],
        "cases": res["info"],
        "ratios": head["ratios"],
        "targets": head["targets"],
        "by_threads": by_threads,
    }
    if args.smoke:
        for run_ in by_threads.values():
            for t in run_["targets"]:
                t["pass"] = None  # tiny shapes say nothing about speed
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_reference.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "cpu_reference.png")
    print(f"cpu_reference_bench: wrote {out / 'cpu_reference.json'}")
    for n, run_ in by_threads.items():
        print(f"  {n} thread(s):")
        for name, m in run_["median_ms"].items():
            print(f"    {name:<14} {m:9.1f} ms")
        for t in run_["targets"]:
            print(f"    {t['target']:<22} {t['value']:.3f} {t['cmp']} {t['threshold']}  pass={t['pass']}")
    return report


if __name__ == "__main__":
    main()

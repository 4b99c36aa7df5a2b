"""Host time per `attn_kernels.attention` call, with the kernel launch stubbed out.

What a GPU cannot hide: the Python and dispatcher work around each launch (checks, the custom
op, argument packing, output allocation). Measured on CPU tensors through the Triton path
(``TRITON_INTERPRET=1`` lets it accept them) with `triton_attention._LAUNCH_HOOK` replacing the
launch, so only host work is timed: prebuilt layout and modifiers (steady state), forward without
grad, forward with grad enabled and its backward. Timed as the calling thread's CPU time
(`time.thread_time`), so a loaded machine does not inflate it. Targets: <= 20 us per call without grad, <= 40 us
with grad (forward; the backward is reported beside it). Writes host_overhead.json / .png.

    python benchmarks/host_overhead.py [--out DIR] [--calls 2000]
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

os.environ["TRITON_INTERPRET"] = "1"  # the Triton path accepts CPU tensors; nothing is launched

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS_US = {"no_grad": 20.0, "grad_forward": 40.0}


def _per_call_us(fn, calls: int, rounds: int = 7) -> dict:
    for _ in range(min(200, calls)):  # warm caches (layout views, prepared modifiers, op dispatch)
        fn()
    per = []
    for _ in range(rounds):  # this thread's CPU time: what the host spends, whatever else runs
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        per.append((time.thread_time() - t0) / calls * 1e6)
    return {"median_us": statistics.median(per), "min_us": min(per), "rounds": rounds, "calls": calls}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from attn_kernels import BlockLayout, LogitDecay, OutputMix, attention
    from attn_kernels import triton_attention as ta

    launches = []
    ta._LAUNCH_HOOK = lambda kind, grid, args, meta: launches.append(kind)
    B, H, N, D = 1, 12, 4096, 128  # shapes only matter for allocation (the outputs are allocated)
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    bm = torch.rand(1, H, N // 128, N // 128, generator=torch.Generator().manual_seed(0)) < 0.3
    bm |= torch.eye(N // 128, dtype=torch.bool)
    lay = BlockLayout.from_block_mask(bm, N, N, 128, 128)
    mods = (LogitDecay(0.9, N // 4), OutputMix(torch.full((H,), 0.2)))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    go = torch.randn(B, H, N, D)

    cases = {
        "dense_no_grad": lambda: attention(q, k, v, None, backend="triton"),
        "sparse_no_grad": lambda: attention(q, k, v, lay, backend="triton"),
        "sparse_modifiers_no_grad": lambda: attention(q, k, v, lay, modifiers=mods, backend="triton"),
        "sparse_grad_forward": lambda: attention(qg, kg, vg, lay, backend="triton"),
        "sparse_modifiers_grad_forward": lambda: attention(qg, kg, vg, lay, modifiers=mods, backend="triton"),
    }
    res = {}
    with torch.no_grad():
        for name in ("dense_no_grad", "sparse_no_grad", "sparse_modifiers_no_grad"):
            res[name] = _per_call_us(cases[name], a.calls)
    for name in ("sparse_grad_forward", "sparse_modifiers_grad_forward"):
        res[name] = _per_call_us(cases[name], a.calls)
    out = attention(qg, kg, vg, lay, backend="triton")
    res["sparse_backward"] = _per_call_us(
        lambda: torch.autograd.grad(attention(qg, kg, vg, lay, backend="triton"), (qg, kg, vg), go), a.calls // 4
    )
    del out
    res["sparse_backward"]["note"] = "forward + backward host time per step (3 launches: fwd, delta+dkdv+dq)"
    targets = []
    for name, r in res.items():
        kind = "no_grad" if name.endswith("no_grad") else "grad_forward" if name.endswith("grad_forward") else None
        if kind:
            thr = TARGETS_US[kind]
            targets.append({"case": name, "value_us": r["median_us"], "threshold_us": thr,
                            "pass": r["median_us"] <= thr})  # fmt: skip
    report = {
        "benchmark": "host_overhead",
        "what": "host microseconds per attention() call, kernel launch stubbed, prebuilt layout and modifiers",
        "shape": {"B": B, "H": H, "N": N, "D": D, "block": 128, "block_density": lay.block_density},
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "results": res,
        "targets": targets,
        "all_targets_pass": all(t["pass"] for t in targets),
        "launches_seen": sorted(set(launches)),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "host_overhead.json").write_text(json.dumps(report, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        names = list(res)
        ax.barh(names, [res[n]["median_us"] for n in names])
        for t in targets:
            ax.plot([t["threshold_us"]] * 2, [names.index(t["case"]) - 0.4, names.index(t["case"]) + 0.4], "r-")
        ax.set_xlabel("host us per call (red: target)")
        fig.tight_layout()
        fig.savefig(a.out / "host_overhead.png", dpi=100)
    except Exception as e:  # the JSON is what counts
        print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    for n, r in res.items():
        print(f"{n:<32} {r['median_us']:8.1f} us")
    return report


if __name__ == "__main__":
    main()

"""`attnplug bench`: run the benchmark scripts of a source checkout and tabulate their latest results.

Full runs write to benchmarks/results/ (the scripts' own place); `--smoke` runs write to a new
temporary directory (or `--out`), never into the source tree: smoke numbers are not results.
The exit status is 1 when any script fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CLIError, RunError

__all__ = ["BENCH_SCRIPTS", "add_parser", "run", "print_results_table"]

#: script name (benchmarks/<name>.py) -> stem of the results JSON it writes
BENCH_SCRIPTS: dict[str, str] = {
    "kernel_bench": "kernel_bench",
    "diffusion_bench": "diffusion_bench",
    "agent_bench": "agent_bench",
    "channel_attn_bench": "channel_attn_bench",
    "cpu_reference_bench": "cpu_reference",
    "hopper_features": "hopper_features",
}


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="run the benchmark scripts of a source checkout and tabulate results")
    b.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCH_SCRIPTS)})")
    b.add_argument("--smoke", action="store_true", help="tiny sizes: a quick check that each script runs")
    b.add_argument("--table-only", action="store_true", help="run nothing; print the latest results")
    b.add_argument("--bench-dir", default=None, help="benchmarks folder of a source checkout (default: ./benchmarks)")
    b.add_argument(
        "--out", default=None, help="where scripts write (default: benchmarks/results; --smoke: a new temp dir)"
    )
    b.set_defaults(func=run)


def _bench_dir(arg: str | None) -> Path:
    if arg:
        d = Path(arg)
        if not d.is_dir():
            raise CLIError(f"--bench-dir {arg!r} is not a directory")
        return d
    d = Path.cwd() / "benchmarks"
    if not d.is_dir():
        raise CLIError(
            f"the benchmarks/ folder is not here ({d}): `attnplug bench` runs the scripts of a source checkout "
            "(git clone), they are not part of the installed package; run it from the checkout's root or pass "
            "--bench-dir <checkout>/benchmarks"
        )
    return d


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


_SKIP_SUBTREES = ("versions", "device", "config")


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts as (dotted.path, value); short scalar lists are kept as one value."""
    out: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if not prefix and k in _SKIP_SUBTREES:
                continue
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        if len(data) <= 4 and all(_scalar(x) for x in data):
            out.append((prefix, data))
    elif _scalar(data):
        out.append((prefix, data))
    return out


def _rows(data: Any) -> list[dict[str, Any]]:
    """Table rows of a results JSON: its list of records, or one (metric, value) row per nested leaf."""
    if isinstance(data, dict):
        for key in ("results", "rows", "records"):
            if isinstance(data.get(key), list):
                return [r for r in data[key] if isinstance(r, dict)]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return list(data)
    return [{"metric": k, "value": v} for k, v in _flatten(data)]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_results_table(results_dir: Path, names: Sequence[str]) -> int:
    """Print the newest results JSON of each benchmark name as a table; returns how many were found."""
    found = 0
    for name in names:
        stem = BENCH_SCRIPTS.get(name, name)
        files = sorted(results_dir.glob(f"{stem}*.json"), key=lambda p: p.stat().st_mtime)
        if not files:
            print(f"\n== {name}: no results in {results_dir}")
            continue
        latest = files[-1]
        try:
            data = json.loads(latest.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"\n== {name}: {latest.name} is not valid JSON ({e})")
            continue
        found += 1
        device = data.get("device") if isinstance(data, dict) else None
        if isinstance(device, dict):
            device = device.get("name") or device.get("type") or json.dumps(device, default=str)
        print(f"\n== {name}: {latest.name}" + (f" (device: {device})" if device else ""))
        rows = _rows(data)
        cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if _scalar(v)))
        if not rows or not cols:
            print("  (no tabular rows)")
            continue
        widths = {c: min(48, max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows))) for c in cols}
        print(("  " + "  ".join(c[: widths[c]].ljust(widths[c]) for c in cols)).rstrip())
        for r in rows:
            print(("  " + "  ".join(_fmt(r.get(c, ""))[: widths[c]].ljust(widths[c]) for c in cols)).rstrip())
    return found


def _out_dir(args: argparse.Namespace, bdir: Path) -> Path:
    results = bdir / "results"
    if args.out is not None:
        out = Path(args.out)
        if args.smoke and out.resolve() == results.resolve():
            raise CLIError(f"--out {args.out!r}: smoke numbers are not results; give another folder")
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {args.out!r} is a file, not a directory")
        return out
    if args.smoke and not args.table_only:
        return Path(tempfile.mkdtemp(prefix="attnplug-bench-smoke-"))
    return results


def run(args: argparse.Namespace) -> int:
    """Run benchmarks/<name>.py [--smoke] --out DIR for each name, then print the latest results."""
    bdir = _bench_dir(args.bench_dir)
    names = list(dict.fromkeys(args.names)) or list(BENCH_SCRIPTS)
    unknown = [n for n in names if n not in BENCH_SCRIPTS]
    if unknown:
        raise CLIError(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCH_SCRIPTS)}")
    out = _out_dir(args, bdir)
    failed: list[str] = []
    if not args.table_only:
        missing = [n for n in names if not (bdir / f"{n}.py").is_file()]
        if missing:
            present = sorted(p.stem for p in bdir.glob("*.py"))
            raise CLIError(f"benchmark script(s) missing in {bdir}: {missing}; present: {present or 'none'}")
        out.mkdir(parents=True, exist_ok=True)
        for n in names:
            cmd = [sys.executable, str(bdir / f"{n}.py"), *(["--smoke"] if args.smoke else []), "--out", str(out)]
            print(f"attnplug: running {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.run(cmd, cwd=bdir.parent).returncode
            if rc != 0:
                print(f"attnplug: {n} failed with exit status {rc}", file=sys.stderr, flush=True)
                failed.append(f"{n} (exit status {rc})")
    found = print_results_table(out, names)
    if args.smoke and not args.table_only:
        print(f"\nattnplug: smoke results are in {out} (not in the source tree)")
    if args.table_only and found == 0:
        raise CLIError(f"no results JSON in {out} for {', '.join(names)}")
    if failed:
        raise RunError(f"{len(failed)} of {len(names)} benchmark(s) failed: {', '.join(failed)}")
    return 0

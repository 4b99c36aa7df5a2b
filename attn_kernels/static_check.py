"""Static check of every Triton launch configuration for Hopper (sm_90a), no GPU needed.

Why: speed needs a GPU to measure, but a configuration that spills registers or needs more
shared memory than an H100 has will be slow (or fail to launch) whatever else is right, and
Triton's own compiler plus ``ptxas`` say so on any machine. Each kernel module lists the
configurations it can launch (`static_configs()`: every tile table entry and autotune
candidate, per head dim, dtype and feature flags); this module compiles each one exactly as a
launch would specialise it (Triton's own argument binder: alignment, ``== 1`` and divisibility
by 16) for ``sm_90a`` and reads registers, spills and shared memory.

    python -m attn_kernels.static_check            # the full set, a table, exit 1 on a violation
    python -m attn_kernels.static_check --ci       # the representative subset (CI)
    python -m attn_kernels.static_check --json out.json --jobs 2

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the JIT functions); the tests
call it in a subprocess. ptxas reports are cached by PTX hash in ``~/.cache/attnplug/sm90``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from . import agent_attn, channel_attn, triton_attention
from .launch_config import LaunchConfig

__all__ = ["H100_SHARED_LIMIT", "LaunchConfig", "all_configs", "compile_sm90", "main", "violations"]

#: Largest dynamic shared memory one block may opt into on sm_90 (H100/H200): 227 KiB.
H100_SHARED_LIMIT = 232_448


def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):  # pragma: no cover - depends on the triton wheel
        raise RuntimeError(f"static_check: ptxas not found at {path} (a Linux triton wheel ships it)")
    return path


def _cache_dir() -> Path:
    d = Path(os.environ.get("ATTNPLUG_CACHE", Path.home() / ".cache" / "attnplug")) / "sm90"
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_sm90(cfg: LaunchConfig, arch: int = 90) -> dict:
    """Compile one configuration for ``sm_{arch}a``; returns registers, spills, shared memory."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("static_check: unset TRITON_INTERPRET (the interpreter has no compiler to ask)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = cfg.kernel
    while not hasattr(kernel, "params") and hasattr(kernel, "fn"):  # autotune / heuristics wrappers
        kernel = kernel.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bound, spec, options = binder(*cfg.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    key = hashlib.sha256(ptx.encode()).hexdigest()[:32]
    cached = _cache_dir() / f"{key}.txt"
    if cached.exists():
        report = cached.read_text()
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            res = subprocess.run(
                [_ptxas(), "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                capture_output=True,
                text=True,
                check=True,
            )
        finally:
            os.unlink(f.name)
        report = res.stderr
        cached.write_text(report)
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    stack = re.search(r"(\d+) bytes stack frame", report)
    return {
        "name": cfg.name,
        "regs": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "stack": int(stack.group(1)) if stack else 0,
        "shared": int(compiled.metadata.shared),
        "wgmma": "wgmma" in ptx,
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "ci": cfg.ci,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _modules() -> list[Callable[[], Iterable[LaunchConfig]]]:
    return [m.static_configs for m in (triton_attention, agent_attn, channel_attn) if hasattr(m, "static_configs")]


def all_configs(ci_only: bool = False) -> list[LaunchConfig]:
    """Every launch configuration of attnplug's kernels (names are unique)."""
    out: list[LaunchConfig] = []
    for fn in _modules():
        out.extend(c for c in fn() if c.ci or not ci_only)
    names = [c.name for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"static_check: duplicate configuration names {sorted(dup)}")
    return out


def violations(report: dict) -> list[str]:
    """Why a compiled configuration is not acceptable on an H100 (empty when it is)."""
    why = []
    if report["spill_stores"] or report["spill_loads"]:
        why.append(f"spills {report['spill_stores']} B stores / {report['spill_loads']} B loads")
    if report["shared"] > H100_SHARED_LIMIT:
        why.append(f"shared memory {report['shared']} B > {H100_SHARED_LIMIT} B")
    return why


def _compile_index(args: tuple[int, bool]) -> dict:
    i, ci_only = args
    cfg = all_configs(ci_only)[i]
    try:
        return compile_sm90(cfg)
    except Exception as e:  # a config that does not compile is a violation, reported by name
        return {"name": cfg.name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def run(ci_only: bool = False, jobs: int = 1, match: str | None = None) -> list[dict]:
    """Compile the configurations (in `jobs` processes); returns one report per configuration."""
    cfgs = all_configs(ci_only)
    idx = [i for i, c in enumerate(cfgs) if match is None or re.search(match, c.name)]
    work = [(i, ci_only) for i in idx]
    if jobs > 1 and len(work) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            return pool.map(_compile_index, work, chunksize=1)
    return [_compile_index(w) for w in work]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_kernels.static_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--ci", action="store_true", help="only the representative subset run in CI")
    p.add_argument("--match", default=None, help="only configurations whose name matches this regex")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="compile processes")
    p.add_argument("--json", default=None, help="write the reports to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print only violations and the summary")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    reports = run(a.ci, a.jobs, a.match)
    bad = 0
    for r in reports:
        why = [r["error"]] if "error" in r else violations(r)
        bad += bool(why)
        if why or not a.quiet:
            if "error" in r:
                print(f"{r['name']:<64} ERROR {r['error']}")
            else:
                print(
                    f"{r['name']:<64} regs {r['regs']:>3}  spill {r['spill_stores']:>5}/{r['spill_loads']:<5} "
                    f"smem {r['shared']:>6}  {'wgmma' if r['wgmma'] else 'mma  ' if r['mma'] else 'fma  '} "
                    f"w{r['num_warps']} s{r['num_stages']}" + (f"  <- {'; '.join(why)}" if why else "")
                )
    print(f"{len(reports)} configurations, {bad} violations, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if a.json:
        import triton

        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps(
                {
                    "arch": "sm_90a",
                    "shared_limit": H100_SHARED_LIMIT,
                    "triton": triton.__version__,
                    "ptxas": subprocess.run([_ptxas(), "--version"], capture_output=True, text=True).stdout.strip(),
                    "configs": reports,
                },
                indent=1,
            )
        )
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Every kernel configuration compiles for Hopper (sm_90a) with zero register spills and shared
memory within the H100 limit — checked with Triton's own compiler and ptxas, no GPU needed.

CI compiles the representative subset (`ci=True` configurations); `pytest -m slow` compiles all
of them. The compiler runs in a subprocess without TRITON_INTERPRET (the interpreter replaces the
JIT functions). A second test ties the check to the runtime: every tile the launchers can pick
(table entries per block size, autotune candidates) is one of the checked configurations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_present() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def _run(tmp_path: Path, *flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNPLUG_CACHE"] = str(tmp_path / "cache") if "ATTNPLUG_CACHE" not in os.environ else env["ATTNPLUG_CACHE"]
    out = tmp_path / "static.json"
    res = subprocess.run(
        [sys.executable, "-m", "attn_kernels.static_check", "--quiet", "--json", str(out), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert res.returncode == 0, f"static check failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return json.loads(out.read_text())


def _assert_clean(report: dict) -> None:
    assert report["configs"], "no configuration was compiled"
    for r in report["configs"]:
        assert "error" not in r, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= report["shared_limit"], r
        if r["name"].startswith(("attn.fwd", "attn.dkdv", "attn.dq", "agent.fwd_keys", "agent.fwd_query",
                                 "agent.bwd_q", "agent.bwd_k")):  # fmt: skip
            # (ECA/CA and the backward's delta are row reductions: no matrix product to emit)
            assert r["mma"], f"{r['name']}: no tensor-core instruction emitted"


@pytest.mark.skipif(not _ptxas_present(), reason="triton wheel without ptxas (non-Linux)")
def test_representative_configs_compile_without_spills(tmp_path):
    report = _run(tmp_path, "--ci", "--jobs", "2")
    _assert_clean(report)
    names = {r["name"] for r in report["configs"]}
    assert any(n.startswith("attn.fwd") for n in names) and any(n.startswith("attn.dkdv") for n in names)
    assert any(n.startswith("attn.dq") for n in names)
    # the default forward of the old kernel (128x128 tile, d128) spilled 2,860 B: now a 128-block
    # layout runs 128x64 tiles at d128 in bf16, Hopper's wgmma included
    fwd = [r for r in report["configs"] if r["name"].startswith("attn.fwd[bfloat16,d128/128,128x64")]
    assert fwd and all(r["wgmma"] for r in fwd)


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_present(), reason="triton wheel without ptxas (non-Linux)")
def test_every_config_compiles_without_spills(tmp_path):
    report = _run(tmp_path, "--jobs", str(max(1, min(4, os.cpu_count() or 1))))
    _assert_clean(report)


def test_every_launchable_tile_is_checked():
    """pick_tiles (no autotune) and the autotuner only ever use table entries, and the static
    check enumerates every table entry for every dtype, head-dim class and feature flag."""
    from attn_kernels import triton_attention as ta
    from attn_kernels.layout import VALID_BLOCK_SIZES

    table = {(kind, width, hc): set(c) for (kind, width, hc), c in ta.CANDIDATES.items()}
    for kind in ("fwd", "dkdv", "dq"):
        for dtype, width in ((torch.float16, "16"), (torch.bfloat16, "16"), (torch.float32, "32")):
            for d in (1, 16, 40, 64, 72, 96, 128, 160, 256):
                for bq in VALID_BLOCK_SIZES:
                    for bk in VALID_BLOCK_SIZES:
                        t = ta.pick_tiles(kind, bq, bk, d, d, dtype)
                        entry = (t["BLOCK_M"], t["BLOCK_N"], t["num_warps"], t["num_stages"])
                        assert entry in table[(kind, width, ta._head_class(d, d))]
                        assert t["BLOCK_M"] <= bq and t["BLOCK_N"] <= bk
    names = {c.name for c in ta.static_configs()}
    for (kind, width, hc), cands in ta.CANDIDATES.items():
        dt = "float32" if width == "32" else "bfloat16"
        d = {64: 64, 128: 128, 256: 256}[hc]
        for bm, bn, w, st in cands:
            assert f"attn.{kind}[{dt},d{d}/{d},{bm}x{bn},w{w}s{st}]" in names


def test_hopper_features_bench_smoke(tmp_path):
    """The TMA / warp-specialisation trial runs end to end (static part skipped in the interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "benchmarks/hopper_features.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "hopper_features.json").read_text())
    assert report["timings"].startswith("skipped") and report["static_sm90"].startswith("skipped")

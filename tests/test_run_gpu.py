"""benchmarks/run_gpu.sh cannot rot: its plan fits the lease, its CPU dry run (every section at smoke
size, kernels in Triton's interpreter) finishes with every section's JSON and checks collected, and a
section cut off by its time limit still leaves its partial JSON and pytest's report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"


def test_plan_fits_the_lease_with_pytest_first():
    res = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [ln.split() for ln in res.stdout.splitlines()[1:]]
    sections = {r[0]: int(r[1]) for r in rows if r[0] != "total"}
    assert list(sections)[:2] == ["setup", "pytest_gpu"]
    assert sum(sections.values()) <= 420
    over = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, KERNEL_BUDGET_S="400"))  # fmt: skip
    assert over.returncode == 1 and "more than" in over.stderr


def test_dry_run_runs_every_section_and_collects_the_checks(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"run_gpu.log", "run_gpu_summary.json", "pytest_gpu.xml", "results.tar.gz"} <= set(files)
    summary = json.loads((out / "run_gpu_summary.json").read_text())
    status = {s["section"]: s["status"] for s in summary["sections"]}
    assert status == {
        "setup": "ok", "pytest_gpu": "ok", "kernel_bench": "ok", "diffusion_bench": "ok", "agent_bench": "ok",
        "channel_attn_bench": "ok", "hopper_features": "ok",
    }, summary["sections"]  # fmt: skip
    assert summary["env"]["torch"] and summary["env"]["triton"]
    assert "unreadable" not in summary["pytest"]
    kb = summary["results"]["kernel_bench_smoke.json"]
    assert kb["all_checks_pass"] is True and kb["correctness"]  # every figure's check travels with it
    assert {c["impl"] for c in kb["correctness"]} >= {"ours", "ours_logitdecay+outputmix"}
    assert all(t["value"] is None or "margin" in t for t in kb["targets"])
    assert summary["results"]["diffusion_bench_smoke.json"]["op"]["all_checks_pass"] is True
    assert summary["results"]["channel_attn_bench_smoke.json"]["all_checks_pass"] is True
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "kernel_bench_smoke.json" in tar.getnames()


def _wait_for(proc: subprocess.Popen, path: Path, text: str, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {path.read_text()[-2000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _sigint_as_timeout_gives_it() -> None:
    """The children get SIGINT's default disposition, as run_gpu.sh's `timeout -s INT` gives its sections: a suite
    started in the background of a non-interactive shell (`nohup pytest &`) runs with SIGINT ignored, which its
    children would inherit, and Python keeps an inherited SIG_IGN instead of raising KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_leaves_partial_json_and_pytest_report(tmp_path):
    """What run_gpu.sh's section limit sends (SIGINT) makes kernel_bench write what it measured and
    pytest write its JUnit report."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1")
    log_kb, log_pt = tmp_path / "kb.log", tmp_path / "pt.log"
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_fast():\n    pass\n\ndef test_slow():\n    print('started', flush=True)\n"
                    "    time.sleep(600)\n")  # fmt: skip
    with open(log_kb, "w") as f1, open(log_pt, "w") as f2:
        kb = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "kernel_bench.py"), "--smoke", "--out", str(tmp_path / "kb"),
             "--backend", "reference"], cwd=ROOT, env=env, stdout=f1, stderr=subprocess.STDOUT,
            preexec_fn=_sigint_as_timeout_gives_it,
        )  # fmt: skip
        pt = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(slow),
             f"--junitxml={tmp_path / 'junit.xml'}"], cwd=tmp_path, env=env, stdout=f2, stderr=subprocess.STDOUT,
            preexec_fn=_sigint_as_timeout_gives_it,
        )  # fmt: skip
        try:
            _wait_for(kb, log_kb, "wan_dense ours")
            _wait_for(pt, log_pt, "started")
            kb.send_signal(signal.SIGINT)
            pt.send_signal(signal.SIGINT)
            kb.wait(timeout=120)
            pt.wait(timeout=120)
        finally:
            for p in (kb, pt):
                if p.poll() is None:
                    p.kill()
    report = json.loads((tmp_path / "kb" / "kernel_bench_smoke.json").read_text())
    assert report["interrupted"] and report["complete"] is False
    assert any(r["case"] == "wan_dense" and r["impl"] == "ours" and r["check_ok"] for r in report["results"])
    junit = (tmp_path / "junit.xml").read_text()
    assert 'name="test_fast"' in junit

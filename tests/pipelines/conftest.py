"""Fixtures for the CLI tests: tiny pipelines saved once per session, a subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from attn_pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "wan", "wan")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from attn_pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "flux", "flux")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: the repo on PYTHONPATH, hub offline, CPU threads capped."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300):
    """Run `python -m attn_pipelines.cli ARGS` as a real subprocess; returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "attn_pipelines.cli", *args],
        cwd=cwd or ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def cli():
    """The subprocess runner `run_cli(*args, cwd=None, env=None)` (see `cli_env` for the env)."""
    return run_cli


@pytest.fixture(scope="session")
def make_env():
    """`cli_env(**extra)`: environment for CLI subprocesses."""
    return cli_env

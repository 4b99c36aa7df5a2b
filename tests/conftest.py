"""Shared pytest setup: CPU by default, `-m gpu` for CUDA tests, Triton interpreter on CPU."""

from __future__ import annotations

import os

# Kernels run in Triton's interpreter on CPU tensors unless a GPU is present.
# Must be set before triton is imported anywhere.
try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny test grids give nearly dense layouts, which attnplug runs dense (the model's own processor,
# `DENSE_ENGINE_BLOCK_DENSITY`); the suite exercises the kernels on them, so the routing is off here
# and tests/diffusion/test_dense_engine.py checks it at its default.
os.environ.setdefault("ATTNPLUG_DENSE_ENGINE_DENSITY", "1.01")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

# The world's checkpoints ship as package data (`attn_pipelines.assets`, which pyproject.toml maps to assets/);
# where this install does not provide it (the checkout only on sys.path, or an editable install made before the
# mapping), the tests read this checkout's assets/world through the documented variable. Tests may read the
# checkout; the package never does (tests/test_imports.py, tests/pipelines/test_cli_commands.py).
if "ATTNPLUG_WORLD_DIR" not in os.environ:
    import importlib.util as _util
    from pathlib import Path as _Path

    try:
        _spec = _util.find_spec("attn_pipelines.assets")
    except ModuleNotFoundError:  # attn_pipelines itself not importable yet: the tests fail on their own
        _spec = None
    if _spec is None or not any((_Path(p) / "world").is_dir() for p in _spec.submodule_search_locations or []):
        os.environ["ATTNPLUG_WORLD_DIR"] = str(_Path(__file__).resolve().parents[1] / "assets" / "world")

import pytest  # noqa: E402


def pytest_configure(config):
    """Triton 3.6's interpreter turns one-element arrays into loop bounds with int(), which NumPy 2.4
    made an error (Triton 3.8's does not): say so once instead of failing every kernel test."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    tv = tuple(int(x) for x in triton.__version__.split(".")[:2])
    nv = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if tv < (3, 7) and nv >= (2, 4):
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, found "
            f"{numpy.__version__}: pip install 'numpy<2.4' (or a Triton >= 3.8)"
        )


def pytest_collection_modifyitems(config, items):
    # `slow` tests (the full static check, real-width checkpoints, multi-rank rings, ...) run only when
    # asked for (`pytest -m slow`): the default run is CI's and must stay short
    if "slow" not in (config.getoption("markexpr") or ""):
        skip_slow = pytest.mark.skip(reason="slow: run with `pytest -m slow`")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield

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

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
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

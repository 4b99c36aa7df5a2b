"""Fixtures of the diffusion tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def attnplug_log(caplog):
    """caplog for attnplug's logger (diffusers' loggers do not propagate to the root logger): INFO and up."""
    logger = logging.getLogger("diffusers.attnplug")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


@pytest.fixture
def restore_active_backend():
    """set_attention_backend also sets diffusers' global active backend: put it back after the test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture
def backend_spy(monkeypatch):
    """Count the calls each diffusers attention backend function receives (delegating to the real one)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    counts: dict[str, int] = {}
    for name in (AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH):
        fn = _AttentionBackendRegistry._backends[name]

        def spy(*args, _fn=fn, _name=name.value, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    return counts

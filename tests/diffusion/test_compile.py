"""`torch.compile(fullgraph=True)` of a tiny Wan transformer with each sparse variant: no graph
break, and the compiled forwards equal the eager ones step by step.

The design is "build once per (shape, phase), reuse": layouts are built on the host at the first
call of each phase and cannot be built inside a trace, so `handle.prepare(**inputs)` first runs one
eager forward per phase (dense warm-up, sparse, LiteAttention's seeding and steady steps); the
compiled forwards then only look layouts up (LiteAttention builds its per-step layout with device
ops). The step comes from `handle.set_step` (step_source "callback"): the default timestep mode
reads the timestep on the host, which is a graph break. backend "eager" keeps this fast.
"""

from __future__ import annotations

import pytest
import torch

import diffusion_attn as da

from .tiny import run, tiny_wan

VARIANTS = {
    "radial": lambda: da.Radial(dense_steps=1, block_size=16),
    "gna": lambda: da.Neighborhood(kernel_size=(3, 3, 3), stride=(1, 1, 3), block_size=16),
    "lite": lambda: da.LiteAttention(threshold=-0.05, block_size=16),
}
STEPS = (0, 1, 2, 3)  # dense warm-up / seeding, first sparse step, steady state


def _skip_sets(handle) -> list[torch.Tensor]:
    """LiteAttention's skip set of every layer (clones)."""
    states = handle.runtimes[0].states
    return [st["skip"].clone() for key in sorted(states) for st in states[key].values() if "skip" in st]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fullgraph_compile_has_no_graph_break_and_matches_eager(name):
    model, inputs = tiny_wan(frames=3)
    handle = da.apply(model, VARIANTS[name](), step_source="callback")
    try:
        handle.prepare(**inputs)
        c0 = handle.attention_calls
        eager = []
        for step in STEPS:
            handle.set_step(step)
            eager.append(run(model, inputs))
        c1 = handle.attention_calls
        eager_skip = _skip_sets(handle)
        handle.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")  # raises on any graph break
        for step, ref in zip(STEPS, eager):
            handle.set_step(step)
            with torch.no_grad():
                out = compiled(**inputs, return_dict=False)[0]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert handle.attention_calls - c1 == c1 - c0 > 0  # the sparse path ran inside the compiled forwards
        if name == "lite":  # the tile statistics came back out of the compiled region
            skip = _skip_sets(handle)
            assert len(skip) == 2 and any(bool(s.any()) for s in skip)
            assert all(torch.equal(a, b) for a, b in zip(skip, eager_skip))
    finally:
        handle.remove()


def test_without_prepare_the_first_sparse_step_cannot_be_traced():
    """Why the warm-up exists: a Radial layout is built on the host at its first call; torch.compile(model)
    after apply() (no entry attnplug can warm up) stops with an error naming handle.prepare."""
    model, inputs = tiny_wan(frames=3)
    with da.apply(model, da.Radial(dense_steps=0, block_size=16), step_source="callback"):
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with pytest.raises(Exception, match=r"(?s)compile warm-up needed.*handle\.prepare"), torch.no_grad():
            compiled(**inputs, return_dict=False)

"""A nearly dense layout of a speed-only variant runs the model's own (dense) processor: a variant
never makes a call slower than not applying it; layouts that mean something are never routed."""

from __future__ import annotations

import pytest
import torch

import diffusion_attn as da
from attn_kernels import BlockLayout
from diffusion_attn.runtime import planner
from diffusion_attn.variants.base import AttnPlan

from .tiny import run, tiny_wan


def _layout(density: float, nb: int = 10) -> BlockLayout:
    bm = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
    bm.view(-1)[: round(density * nb * nb)] = True
    return BlockLayout.from_block_mask(bm, nb * 16, nb * 16, 16, 16)


@pytest.mark.parametrize(("density", "dense"), [(0.77, False), (0.78, True), (1.0, True), (0.3, False)])
def test_threshold_routes_only_nearly_dense_layouts(monkeypatch, density, dense):
    monkeypatch.setattr(planner, "DENSE_ENGINE_BLOCK_DENSITY", 0.78)
    plan = AttnPlan(layout=_layout(density))
    out = planner.dense_engine_if_nearly_dense(plan, [da.Radial()])
    assert out.is_dense is dense
    assert (out is plan) is not dense


def test_meaningful_layouts_and_extra_work_are_never_routed(monkeypatch):
    monkeypatch.setattr(planner, "DENSE_ENGINE_BLOCK_DENSITY", 0.0)  # every layout "nearly dense"
    lay = _layout(0.9)
    regional = da.Regional(entities=[("a red circle", torch.ones(4, 4, dtype=torch.bool))])
    assert planner.dense_engine_if_nearly_dense(AttnPlan(layout=lay), [regional]).layout is lay  # masks mean something
    for extra in ({"perm": torch.arange(160)}, {"modifiers": (object(),)}, {"after": [lambda *a: None]}):
        plan = AttnPlan(layout=lay, **extra)
        assert planner.dense_engine_if_nearly_dense(plan, [da.Radial()]) is plan
    device_built = BlockLayout.from_device_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16, 16)
    assert device_built.known_block_density() is None  # its count lives on the device: never read (no sync)
    assert planner.dense_engine_if_nearly_dense(AttnPlan(layout=device_built), [da.Radial()]).layout is device_built


@pytest.mark.parametrize(("threshold", "routed"), [(0.0, True), (1.01, False)])
def test_radial_on_a_nearly_dense_grid_runs_the_model_processor(monkeypatch, threshold, routed):
    monkeypatch.setattr(planner, "DENSE_ENGINE_BLOCK_DENSITY", threshold)
    model, inputs = tiny_wan(frames=3)
    ref = run(model, inputs)
    handle = da.apply(model, da.Radial(dense_steps=0, block_size=16), step_source="callback")
    try:
        handle.set_step(0)
        out = run(model, inputs)
        if routed:
            assert torch.equal(out, ref)  # the model's own processor: bit-identical
            assert handle.attention_calls == 0
        else:  # the kernel ran the (here fully dense) radial layout
            assert handle.attention_calls > 0
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    finally:
        handle.remove()

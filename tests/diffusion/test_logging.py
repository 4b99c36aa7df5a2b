"""Logging through diffusers' logger (issue 9): what was patched, the plan per layer once per phase, a warning
when a variant will do nothing."""

from __future__ import annotations

import logging

import diffusion_attn as da

from .tiny import run, tiny_wan, tiny_wan_pipeline, wan_pipeline_inputs


def _msgs(log, level):
    return [r.getMessage() for r in log.records if r.levelno == level and r.name == "diffusers.attnplug"]


def test_apply_logs_what_it_patched_and_each_phase_once(attnplug_log):
    model, inputs = tiny_wan()
    radial = da.Radial(dense_steps=2, dense_layers=1, block_size=16)
    with da.apply(model, radial, step_source="callback") as handle:
        for step in range(5):
            handle.set_step(step)
            run(model, inputs)
    info = _msgs(attnplug_log, logging.INFO)
    assert any("patched 2 attention modules of WanTransformer3DModel" in m and "blocks.0.attn1" in m for m in info)
    plans = [m for m in info if ": layers " in m]
    assert len(plans) == 2  # warm-up phase, sparse phase: once each, not once per step
    assert "step 0" in plans[0] and "0-1: dense (model's processor)" in plans[0]
    assert "step 2" in plans[1] and "0: dense (model's processor); 1: attnplug kernel (radial)" in plans[1]
    assert any("removed" in m for m in info)
    assert not _msgs(attnplug_log, logging.WARNING)


def test_warns_when_a_variant_will_do_nothing(attnplug_log):
    model, _ = tiny_wan()
    with da.apply(model, da.Radial(dense_steps=12), num_steps=10):
        pass
    with da.apply(model, da.Radial(dense_steps=0, dense_layers=2)):
        pass
    with da.apply(model, da.LiteAttention(warmup_steps=4), num_steps=4):
        pass
    with da.apply(model, da.Radial(dense_steps=2, dense_last_steps=2), num_steps=4):  # 2 + 2 = all 4 steps
        pass
    with da.apply(model, da.Radial(dense_steps=2, dense_last_steps=1), num_steps=4):  # step 2 sparse: no warning
        pass
    with da.apply(model, da.Radial(dense_steps=0, dense_layers=1)):  # layer 1 sparse: no warning
        pass
    warned = _msgs(attnplug_log, logging.WARNING)
    assert len(warned) == 4
    assert "dense_steps=2 + dense_last_steps=2 cover all 4 denoising steps" in warned[3]
    assert "dense_steps=12 + dense_last_steps=0 cover all 10 denoising steps" in warned[0]
    assert "dense_layers=2 >= the 2 hooked attention layers" in warned[1]
    assert "warmup_steps=4 >= 4 denoising steps" in warned[2]


def test_warning_from_the_pipelines_step_count(attnplug_log):
    """apply() did not know the number of steps; the pipeline's run does (3 steps < the 12 dense ones)."""
    pipe = tiny_wan_pipeline()
    with da.apply(pipe, da.Radial()):
        assert not _msgs(attnplug_log, logging.WARNING)
        pipe(**wan_pipeline_inputs(pipe, steps=3))
        pipe(**wan_pipeline_inputs(pipe, steps=3))
    warned = _msgs(attnplug_log, logging.WARNING)
    assert len(warned) == 1 and "cover all 3 denoising steps" in warned[0]  # once, not per generation

"""One step clock per pipeline (issue 9): Wan2.2's two experts share it, per-token timesteps, positional
calls per family, repeated timesteps are steps (not CFG calls), handle.step follows the pipeline."""

from __future__ import annotations

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.clock import StepClock, timestep_value

from .probes import Recorder
from .tiny import BUILDERS, run, tiny_ltx_video, tiny_wan, tiny_wan_pipeline, wan_pipeline_inputs


class StepLog:
    """callback_on_step_end: (pipeline step i, handle.step, kernel calls made during step i)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.rows: list[tuple[int, int, int]] = []
        self._calls = 0

    def __call__(self, pipe, i, t, kw):
        calls = self.handle.attention_calls
        self.rows.append((i, self.handle.step, calls - self._calls))
        self._calls = calls
        return kw


def _expert_log(pipe) -> list[str]:
    log: list[str] = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(lambda m, a, name=name: log.append(name))
    return log


def test_wan22_two_experts_share_one_clock_and_dense_last_steps_fire():
    """transformer (t >= 700) then transformer_2: the second expert continues at the pipeline's step, Radial's
    dense warm-up ends at step 3 (not 3 + the first expert's steps) and dense_last_steps fires at the last
    step with the number of steps taken from the pipeline (apply() got no num_steps)."""
    pipe = tiny_wan_pipeline(two_experts=True, boundary_ratio=0.7)
    experts = _expert_log(pipe)
    radial = da.Radial(dense_steps=3, dense_layers=0, dense_last_steps=1, block_size=16)
    steps = 7
    with da.apply(pipe, radial) as handle:
        assert len(handle.runtimes) == 2 and handle.runtimes[0].clock is handle.runtimes[1].clock
        log = StepLog(handle)
        pipe(**wan_pipeline_inputs(pipe, steps=steps, callback_on_step_end=log))
    assert experts.count("transformer") == 2 * 4 and experts.count("transformer_2") == 2 * 3  # CFG: 2 per step
    assert [r[1] for r in log.rows] == list(range(steps))  # handle.step == the pipeline's step, both experts
    sparse_per_step = 2 * 2  # 2 layers x (cond, uncond)
    assert [r[2] for r in log.rows] == [0, 0, 0] + [sparse_per_step] * 3 + [0]


def test_i2v_expand_timesteps_two_experts_timestep_clock():
    """WanImageToVideoPipeline(expand_timesteps=True) (Wan2.2 TI2V): per-token timesteps with the conditioning
    frame at 0 and no step index in the cache context: the clock reads the max, advances every step and
    continues across the experts; each call sees its branch."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_wan_pipeline(
        "i2v", two_experts=True, boundary_ratio=0.9, expand_timesteps=True,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )  # fmt: skip
    experts = _expert_log(pipe)
    rec = Recorder()
    seen_t: list[torch.Tensor] = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen_t.append(kw["timestep"]), with_kwargs=True)
    radial = da.Radial(dense_steps=2, dense_layers=0, block_size=16)
    with da.apply(pipe, radial, rec) as handle:
        log = StepLog(handle)
        pipe(**wan_pipeline_inputs(pipe, steps=6, callback_on_step_end=log))
    assert seen_t[0].dim() == 2 and float(seen_t[0].min()) == 0.0  # per-token, conditioning frame at 0
    assert "transformer_2" in experts and "transformer" in experts
    assert rec.steps() == [s for s in range(6) for _ in range(2)]
    assert rec.branches() == ["cond", "uncond"] * 6
    assert {s[3] for s in rec.seen} == {6}  # num_steps from the pipeline
    assert [r[2] for r in log.rows] == [0, 0] + [4] * 4


def test_ltx_image_to_video_per_token_timesteps():
    """LTX image-to-video passes timestep [B, N] = t * (1 - conditioning_mask): the first frame's tokens are 0."""
    model, inputs = tiny_ltx_video(frames=3)
    n = inputs["hidden_states"].shape[1]
    cond = torch.zeros(1, n)
    cond[:, : n // 3] = 1.0  # the first latent frame is the conditioning image
    rec = Recorder()
    with da.apply(model, rec) as handle:
        for t in (1000.0, 900.0, 750.0):
            with model.cache_context("cond_uncond"):
                run(model, {**inputs, "timestep": torch.tensor([t]).unsqueeze(-1) * (1 - cond)})
        assert handle.step == 2 and handle.clock.timestep == 750.0
    assert rec.steps() == [0, 1, 2]
    assert timestep_value(torch.tensor([[0.0, 3.0], [0.0, 3.0]])) == 3.0


def _positional(family: str, inputs: dict, t: float) -> tuple:
    """The forward's positional arguments, in the order of each family's signature."""
    i = dict(inputs)
    ts = torch.full_like(i["timestep"], t)
    if family == "wan":  # (hidden_states, timestep, encoder_hidden_states)
        return (i["hidden_states"], ts, i["encoder_hidden_states"])
    if family == "hunyuan_video":  # (hidden_states, timestep, encoder_hidden_states, mask, pooled, guidance)
        return (
            i["hidden_states"], ts, i["encoder_hidden_states"], i["encoder_attention_mask"],
            i["pooled_projections"], i["guidance"],
        )  # fmt: skip
    if family == "cogvideox":  # (hidden_states, encoder_hidden_states, timestep, timestep_cond, ofs, rope)
        return (i["hidden_states"], i["encoder_hidden_states"], ts, None, None, i["image_rotary_emb"])
    if family == "ltx_video":  # (hidden_states, encoder_hidden_states, timestep, mask, num_frames, height, width)
        return (
            i["hidden_states"], i["encoder_hidden_states"], ts, i["encoder_attention_mask"], i["num_frames"],
            i["height"], i["width"],
        )  # fmt: skip
    if family == "flux":  # (hidden_states, encoder_hidden_states, pooled, timestep, img_ids, txt_ids)
        return (i["hidden_states"], i["encoder_hidden_states"], i["pooled_projections"], ts, i["img_ids"], i["txt_ids"])
    if family == "sd3":  # (hidden_states, encoder_hidden_states, pooled_projections, timestep)
        return (i["hidden_states"], i["encoder_hidden_states"], i["pooled_projections"], ts)
    raise AssertionError(family)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_positional_calls_read_the_timestep_where_each_family_has_it(family):
    """`model(x, t, ...)` in a custom loop: the timestep position differs per family (Wan / HunyuanVideo 1,
    CogVideoX / LTX 2, FLUX / SD3 3); the clock advances on each smaller timestep and the grid is read."""
    model, inputs = BUILDERS[family]()
    scale = 1.0 if family == "flux" else 1000.0
    ref = run(model, inputs)
    rec = Recorder()
    with da.apply(model, rec) as handle:
        with torch.no_grad():
            outs = [model(*_positional(family, inputs, t * scale), return_dict=False)[0] for t in (0.9, 0.9, 0.7, 0.5)]
        assert handle.step == 2
    assert rec.steps() == [0, 0, 1, 2]  # equal timestep without a cache context: a CFG call of the same step
    torch.testing.assert_close(outs[0], ref)  # positional call == keyword call, dense plan
    grid = {"wan": (3, 4, 6), "hunyuan_video": (3, 4, 4), "cogvideox": (3, 4, 4), "ltx_video": (3, 4, 6)}
    assert handle.runtimes[0].grid == grid.get(family, (1, 6, 8) if family == "flux" else (1, 4, 6))


def _loop(model, inputs, timesteps, branches) -> None:
    """A custom denoising loop: per timestep one call per cache-context branch."""
    for t in timesteps:
        for name in branches:
            with model.cache_context(name):
                run(model, {**inputs, "timestep": torch.tensor([float(t)])})


@pytest.mark.parametrize("branches", [("cond", "uncond"), ("cond_uncond",)])
def test_repeated_timesteps_karras_are_steps_not_cfg(branches):
    """DPM-Solver with Karras sigmas, 100 steps: the last timesteps repeat ([..., 2, 1, 1, 0]). With branch names
    a second call of the same branch at an equal timestep is the next step."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    sched.set_timesteps(100)
    ts = sched.timesteps.tolist()
    assert any(a == b for a, b in zip(ts, ts[1:]))
    model, inputs = tiny_wan(frames=2, height=4, width=4)
    rec = Recorder()
    with da.apply(model, rec) as handle:
        _loop(model, inputs, ts[-12:], branches)
        assert handle.step == 11
    assert rec.steps() == [s for s in range(12) for _ in branches]


def test_unipc_flow_shift_12_wan_pipeline_100_steps():
    """UniPC with flow_shift=12 and 100 steps starts at [999, 999, ...]: the pipeline's steps 0..99 are the
    clock's steps (WanPipeline's cache context carries the step index: nothing read on the host)."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)
    pipe = tiny_wan_pipeline(scheduler=sched)
    rec = Recorder()
    with da.apply(pipe, rec) as handle:
        log = StepLog(handle)
        pipe(**wan_pipeline_inputs(pipe, steps=100, height=16, width=16, callback_on_step_end=log))
    ts = pipe.scheduler.timesteps.tolist()
    assert ts[0] == ts[1] == 999
    assert [r[1] for r in log.rows] == list(range(100))
    assert rec.steps() == [s for s in range(100) for _ in range(2)]


def test_repeated_timesteps_without_context_use_the_pipeline_scheduler():
    """A custom loop with no cache context but the pipeline's scheduler (apply got the pipeline): an equal
    timestep after `scheduler.step` is a new step; before it (CFG) the same step."""
    from diffusers import UniPCMultistepScheduler

    model, inputs = tiny_wan(frames=2, height=4, width=4)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)
    sched.set_timesteps(100)
    sched.set_begin_index(0)

    class Pipe:  # the pieces of a pipeline a custom loop uses
        transformer = model
        scheduler = sched

    rec = Recorder()
    latents = torch.randn(1, 4, 2, 4, 4)
    with da.apply(Pipe(), rec) as handle:
        for t in sched.timesteps[:5]:
            for _ in range(2):  # CFG: two calls, no context
                run(model, {**inputs, "timestep": t.reshape(1).float()})
            latents = sched.step(torch.zeros_like(latents), t, latents).prev_sample
        assert handle.step == 4
    assert rec.steps() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_pipeline_end_starts_a_new_generation_and_handle_step_follows():
    pipe = tiny_wan_pipeline()
    rec = Recorder()
    lite = da.LiteAttention(threshold=-0.05, block_size=16)
    with da.apply(pipe, lite, rec) as handle:
        pipe(**wan_pipeline_inputs(pipe, steps=3))
        assert handle.step == 0 and handle.clock.fresh  # diffusers reset the stateful hooks at the end
        assert not any(handle.runtimes[0].branch_states().values())  # skip sets cleared
        pipe(**wan_pipeline_inputs(pipe, steps=2))
    assert rec.steps() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1]


def test_step_clock_unit_rules():
    """The clock's rules on plain values (no model): context step index, branch repeats, rising timesteps."""
    from diffusers.hooks.hooks import CacheContext

    clock = StepClock()
    seen = []
    for t, branch in [(9.0, "cond"), (9.0, "uncond"), (9.0, "cond"), (8.0, "cond"), (8.0, None), (9.5, "cond")]:
        clock.observe(branch, None, lambda t=t: t)
        seen.append(clock.step)
    assert seen == [0, 0, 1, 2, 2, 0]
    clock.observe("cond", CacheContext("cond", step_index=5, num_inference_steps=20), lambda: 1 / 0)  # not read
    assert clock.step == 5 and clock.num_steps == 20
    clock.observe("cond", CacheContext("cond", step_index=0), lambda: 1 / 0)  # index went back: new generation
    assert clock.step == 0 and clock.generation == 2
    with pytest.raises(ValueError, match="step_source"):
        StepClock("timestep")

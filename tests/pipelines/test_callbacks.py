"""`callback_on_step_end` helpers driven by a real tiny WanPipeline run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusion_attn
from attn_pipelines.callbacks import AttnStepCallback, CallbackList, StepTimer


class _SpyHandle:
    def __init__(self) -> None:
        self.step = 0
        self.log: list[tuple[str, int]] = []

    def set_step(self, i: int) -> None:
        self.step = i
        self.log.append(("set_step", i))

    def reset(self) -> None:
        self.step = 0
        self.log.append(("reset", 0))


@pytest.fixture(scope="module")
def pipe(tiny_wan_dir):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(str(tiny_wan_dir))
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, callback, steps=3, seed=0):
    return pipe(
        "a fox",
        height=32,
        width=32,
        num_frames=1,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=callback,
    ).frames[0]


def test_attn_step_callback_sets_next_step_and_resets_at_the_end(pipe):
    handle = _SpyHandle()
    seen = []

    def spy(p, i, t, kw):
        seen.append((i, handle.step))
        return kw

    timer = StepTimer()
    timer.attach(pipe.transformer)
    try:
        _run(pipe, CallbackList(AttnStepCallback(handle), timer, spy), steps=3)
    finally:
        timer.detach()
    assert handle.log == [("set_step", 1), ("set_step", 2), ("reset", 0)]
    assert seen == [(0, 1), (1, 2), (2, 0)]
    assert len(timer.step_times) == 3 and all(t > 0 for t in timer.step_times)
    assert timer.mean_step_s == pytest.approx(timer.total_s / 3)
    assert timer._hook is None and not pipe.transformer._forward_pre_hooks  # detach() removed the hook


def test_callback_list_threads_callback_kwargs_back_into_the_pipeline(pipe):
    plain = _run(pipe, StepTimer(), steps=2)

    def scale_latents(p, i, t, kw):
        return {**kw, "latents": kw["latents"] * 0.0 + 1.0}  # replaces the latents the loop continues with

    changed = _run(pipe, CallbackList(StepTimer(), scale_latents), steps=2)
    assert not np.allclose(plain, changed)
    again = _run(pipe, CallbackList(StepTimer(), lambda p, i, t, kw: kw), steps=2)
    np.testing.assert_array_equal(plain, again)


def test_callbacks_reject_bad_input(pipe):
    with pytest.raises(TypeError, match="set_step"):
        AttnStepCallback(object())
    with pytest.raises(TypeError, match=r"callbacks\[1\] must be callable"):
        CallbackList(StepTimer(), 3)
    with pytest.raises(TypeError, match="must return callback_kwargs"):
        _run(pipe, CallbackList(lambda p, i, t, kw: None), steps=1)


def test_attn_step_callback_with_a_real_handle(pipe):
    apply = getattr(diffusion_attn, "apply", None)
    if not callable(apply):
        pytest.skip("diffusion_attn.apply not available yet")
    from attn_pipelines.config import variant_registry

    handle = apply(pipe, variant_registry()["radial"]())
    try:
        steps = []
        _run(pipe, CallbackList(AttnStepCallback(handle), lambda p, i, t, kw: steps.append(handle.step) or kw))
        assert steps == [1, 2, 0]
    finally:
        handle.remove()


def test_step_timer_hook_does_not_break_a_fullgraph_compile():
    """The timer's pre-hook is inside a module compiled as a whole: it must trace to nothing."""
    import torch._dynamo

    torch._dynamo.reset()
    lin = torch.nn.Linear(4, 4)
    timer = StepTimer()
    timer.attach(lin)
    compiled = torch.compile(lin, fullgraph=True, backend="eager")  # a graph break would raise
    timer.start()
    x = torch.randn(2, 4)
    assert torch.equal(compiled(x), lin(x))  # the eager call runs the hook: step 0 starts there
    assert timer._last is not None
    timer.detach()
    timer2 = StepTimer()
    timer2.attach(lin)
    compiled(x)  # compiled: the hook traced to nothing, nothing recorded inside compiled code
    assert timer2._last is None

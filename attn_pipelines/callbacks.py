"""diffusers `callback_on_step_end` helpers, for users who prefer callbacks to forward hooks.

diffusers calls `callback(pipe, step_index, timestep, callback_kwargs)` at the end of every
denoising step and expects the (possibly updated) `callback_kwargs` dict back. Every helper here
returns it unchanged.

    handle = diffusion_attn.apply(pipe, diffusion_attn.Radial())
    timer = StepTimer()
    out = pipe(prompt, callback_on_step_end=CallbackList(AttnStepCallback(handle), timer))
    print(timer.mean_step_s)
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["AttnStepCallback", "StepTimer", "CallbackList", "num_steps_of"]

StepCallback = Callable[[Any, int, Any, dict], dict]


def num_steps_of(pipe: Any) -> int | None:
    """Number of denoising steps of the generation in progress (pipeline property or scheduler)."""
    n = getattr(pipe, "_num_timesteps", None)
    if isinstance(n, int):
        return n
    sched = getattr(pipe, "scheduler", None)
    ts = getattr(sched, "timesteps", None)
    return len(ts) if ts is not None else None


class AttnStepCallback:
    """Drive a `diffusion_attn` handle's step counter from `callback_on_step_end`.

    After step i it calls `handle.set_step(i + 1)` (the step the next transformer call belongs
    to; with `num_steps=` when the handle accepts it); after the last step it calls
    `handle.reset()` so the next generation starts at step 0 with fresh variant state (e.g.
    LiteAttention's skip lists). Call `start()` before a generation that follows an interrupted
    one. Note: a diffusion_attn handle is switched to `step_source = "callback"` when this
    callback is made: it stops reading the step from the timestep (its default) and relies on
    this callback; that is exact even for pipelines whose timesteps repeat or that call the
    transformer several times per step, and the transformer's forwards then read no tensor value
    on the host (no sync per step; what CUDA graphs and `torch.compile(fullgraph=True)` need).
    """

    def __init__(self, handle: Any) -> None:
        for meth in ("set_step", "reset"):
            if not callable(getattr(handle, meth, None)):
                raise TypeError(f"handle must have a callable `{meth}` (a diffusion_attn handle), got {handle!r}")
        self.handle = handle
        self.calls = 0
        try:
            self._pass_num_steps = "num_steps" in inspect.signature(handle.set_step).parameters
        except (TypeError, ValueError):  # builtins / C callables without a signature
            self._pass_num_steps = False
        if hasattr(handle, "step_source"):  # from the first forward on, not only after step 0
            handle.step_source = "callback"

    def start(self) -> None:
        """Reset the handle to step 0 (start of a new generation)."""
        self.handle.reset()

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.calls += 1
        total = num_steps_of(pipe)
        if total is not None and step + 1 >= total:
            self.handle.reset()
        elif self._pass_num_steps and total is not None:
            self.handle.set_step(step + 1, num_steps=total)
        else:
            self.handle.set_step(step + 1)
        return callback_kwargs


class StepTimer:
    """Wall time of each denoising step, measured at `callback_on_step_end`.

    Step 0 is timed from the first transformer call when `attach(transformer)` was used
    (so prompt encoding is excluded), else from `start()`. On CUDA the device is synchronised
    before each reading so times are real, not launch times (disable with `sync=False`).
    Timing happens outside compiled code: the hook does nothing while torch.compile traces (no
    graph break; a transformer compiled as a whole is then timed from `start()`), and
    `callback_on_step_end` runs between steps, outside the transformer.
    """

    def __init__(self, sync: bool = True) -> None:
        self.sync = sync
        self.step_times: list[float] = []
        self._t0: float | None = None
        self._last: float | None = None
        self._hook: Any = None

    def _now(self) -> float:
        if self.sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        """Start a new generation (clears previous step times)."""
        self.step_times = []
        self._t0 = self._now()
        self._last = None

    def attach(self, module: torch.nn.Module) -> Any:
        """Time step 0 from the first forward of `module` (the transformer); returns the hook handle."""

        def pre_hook(mod: torch.nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():  # traced as a constant: no graph break, nothing timed inside
                return
            if self._last is None and not self.step_times:
                self._last = self._now()

        self._hook = module.register_forward_pre_hook(pre_hook)
        return self._hook

    def detach(self) -> None:
        """Remove the hook installed by `attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        now = self._now()
        ref = self._last if self._last is not None else self._t0
        if ref is None:
            ref = now
        self.step_times.append(now - ref)
        self._last = now
        return callback_kwargs

    @property
    def total_s(self) -> float:
        """Sum of the step times (the denoising loop)."""
        return float(sum(self.step_times))

    @property
    def mean_step_s(self) -> float:
        """Mean step time (0.0 before any step)."""
        return self.total_s / len(self.step_times) if self.step_times else 0.0


class CallbackList:
    """Run several step callbacks in order, threading `callback_kwargs` through them."""

    def __init__(self, *callbacks: StepCallback) -> None:
        for i, cb in enumerate(callbacks):
            if not callable(cb):
                raise TypeError(f"callbacks[{i}] must be callable, got {cb!r}")
        self.callbacks = list(callbacks)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        for cb in self.callbacks:
            out = cb(pipe, step, timestep, callback_kwargs)
            if not isinstance(out, dict):
                raise TypeError(f"step callback {cb!r} returned {type(out).__name__}; it must return callback_kwargs")
            callback_kwargs = out
        return callback_kwargs

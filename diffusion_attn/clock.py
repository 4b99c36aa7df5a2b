"""One denoising-step clock per `apply` handle, shared by every denoiser of the pipeline.

Wan2.2-A14B runs `transformer` for the high-noise steps and `transformer_2` for the rest: both
hooks feed the same clock, so the low-noise expert continues at the pipeline's step instead of
restarting at 0 (dense warm-up and `dense_last_steps` then fire at the pipeline's steps).

Where the step comes from, in order (`step_source="hook"`, the default):

1. the step index diffusers' pipeline puts in its cache context
   (`transformer.cache_context("cond", step_index=i, num_inference_steps=n)`: `WanPipeline`):
   exact, and nothing is read on the host;
2. otherwise the timestep of the forward, read once on the host (`float`), at the position the
   family's forward signature gives it (keyword or positional). Per-token timesteps (`[B, N]`:
   Wan `expand_timesteps`, LTX image-to-video) are reduced with `max`, so the conditioning
   frame's 0 is not taken for the step. A smaller timestep is the next step, a larger one a new
   generation. An equal timestep is a second call of the same step (CFG) unless the same cache
   branch (`"cond"`, `"uncond"`, `"cond_uncond"`) was already called at this step, or the
   pipeline's scheduler has stepped since the last forward (`scheduler.step_index`, when
   `apply` was given the pipeline): then it is a new step whose timestep repeats (UniPC with a
   large `flow_shift`, Karras sigmas). Without either signal a repeated timestep is taken for a
   CFG call (custom loops: use `cache_context` names or `step_source="callback"`).

Under `torch.compile` (the step hook traced into the graph) nothing is read on the host either:
the step comes from the cache context's `step_index`, else from the pipeline's scheduler
(`scheduler.step_index - begin_index`, a Python int; None before its first `step()` = step 0),
see `StepClock.observe_compiled`; a bare transformer without either needs `step_source="callback"`.

`step_source="callback"`: the step is set from outside (`handle.set_step`) and forwards read
nothing. Diffusers pipelines reset stateful hooks at the end of a call; that starts a new
generation here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["STEP_SOURCES", "StepClock", "timestep_value"]

STEP_SOURCES = ("hook", "callback")


def timestep_value(t: Any) -> float | None:
    """The denoising timestep of a forward as a float (one host read for a tensor).

    Per-token timesteps (`[B, N]`, conditioning tokens at 0) and per-sample ones give their
    maximum: the noise level of the tokens being denoised."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            return None
        return float(t.max()) if t.numel() > 1 else float(t.reshape(()))
    return float(t)


class StepClock:
    """Step, generation and number of steps of one handle (all denoisers of a pipeline)."""

    def __init__(self, source: str = "hook", num_steps: int | None = None, pipe: Any = None) -> None:
        if source not in STEP_SOURCES:
            raise ValueError(f"step_source must be one of {STEP_SOURCES}, got {source!r}")
        self.source = source
        self.step = 0
        self.timestep: float | None = None
        self.fixed_num_steps = num_steps  # from apply(num_steps=...)
        self.run_num_steps: int | None = None  # from the pipeline / cache context of this generation
        self.pipe = pipe  # the pipeline given to apply(): its step count and scheduler (None for a model)
        self._branches: set = set()
        self._sched_index: Any = None
        self.fresh = True  # no forward seen since the last reset
        self.generation = 0
        self._on_reset: list[Callable[[], None]] = []

    # -- generation -------------------------------------------------------------------------
    @property
    def num_steps(self) -> int | None:
        """Denoising steps of the generation: apply(num_steps=) if given, else what the pipeline said."""
        return self.fixed_num_steps if self.fixed_num_steps is not None else self.run_num_steps

    def on_reset(self, fn: Callable[[], None]) -> None:
        """Call `fn` at every reset (runtimes clear their variant state)."""
        self._on_reset.append(fn)

    def reset(self) -> None:
        """New generation: step 0, branch history and variant state cleared."""
        self.step = 0
        self.timestep = None
        self.run_num_steps = None
        self._branches = set()
        self._sched_index = None
        self.fresh = True
        self.generation += 1
        for fn in self._on_reset:
            fn()

    def begin_generation(self, context: Any) -> None:
        """First forward after a reset: learn the number of steps from the cache context or pipeline."""
        self.fresh = False
        n = getattr(context, "num_inference_steps", None)
        if n is None:
            pipe = self.pipe
            n = getattr(pipe, "_num_timesteps", None) if pipe is not None else None
        self.run_num_steps = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    # -- per forward --------------------------------------------------------------------------
    def _scheduler_index(self) -> Any:
        pipe = self.pipe
        sched = getattr(pipe, "scheduler", None) if pipe is not None else None
        return getattr(sched, "step_index", None) if sched is not None else None

    def observe_compiled(self, branch: str | None, context: Any) -> bool:
        """Advance the clock while torch.compile traces the forward: no tensor is read (a host read would be a
        graph break). The step is the cache context's `step_index`, else the pipeline scheduler's step index
        (Python ints). Returns False when neither exists (a bare transformer: use step_source="callback")."""
        if self.source != "hook":
            return True
        index = getattr(context, "step_index", None)
        if isinstance(index, int) and not isinstance(index, bool):
            self.begin_generation(context)  # idempotent: no branch on `fresh` (a guard, another graph)
            self.step = index
            return True
        pipe = self.pipe
        sched = getattr(pipe, "scheduler", None) if pipe is not None else None
        if sched is None or not hasattr(sched, "step_index"):
            return False
        index = sched.step_index
        begin = getattr(sched, "begin_index", None) or 0
        self.begin_generation(context)
        self.step = 0 if index is None else max(0, int(index) - int(begin))
        self._sched_index = index
        return True

    def observe(self, branch: str | None, context: Any, read_timestep: Callable[[], float | None]) -> None:
        """Advance the clock for one denoiser forward (step_source "hook"; see the module docstring).

        branch: the cache-context name (None without a context); context: diffusers' CacheContext
        or None; read_timestep: reads the forward's timestep (called only when needed)."""
        if self.source != "hook":
            return
        index = getattr(context, "step_index", None)
        if isinstance(index, int) and not isinstance(index, bool):
            if not self.fresh and index < self.step:  # the pipeline started over
                self.reset()
            if self.fresh:
                self.begin_generation(context)
            n = getattr(context, "num_inference_steps", None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self.run_num_steps = n
            self.step = index
            ts = getattr(context, "timestep", None)
            self.timestep = ts if isinstance(ts, float) else None
            return
        t = read_timestep()
        if t is None:
            if self.fresh:
                self.begin_generation(context)
            return
        sched = self._scheduler_index()
        if not self.fresh and self.timestep is not None:
            if t > self.timestep:  # timesteps only decrease within a generation
                self.reset()
            elif t < self.timestep:
                self.step += 1
                self._branches = set()
            elif (branch is not None and branch in self._branches) or (
                sched is not None and sched != self._sched_index
            ):
                self.step += 1  # a repeated timestep: same branch again, or the scheduler stepped
                self._branches = set()
        if self.fresh:
            self.begin_generation(context)
        self.timestep = t
        self._sched_index = sched
        self._branches.add(branch)

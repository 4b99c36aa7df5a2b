"""`apply(pipe_or_model, *variants) -> AttnHandle`: hook attnplug's variants into a diffusers
transformer with the library's own mechanisms, and undo it exactly.

* Attention modules get an adapter processor through `module.set_processor` (the originals are
  kept and restored by `remove()`); modules not hooked keep theirs.
* A diffusers `ModelHook` on the transformer's forward reads the token grid (from shapes) and
  clears the runtime's per-forward caches. CFG calls at the same timestep share a step.

Where the step comes from (`step_source`):

* "hook" (default): the hook reads the timestep of every forward (`float(timestep)`: one
  device->host sync per forward, and a graph break if the forward is compiled); the step advances
  when it decreases and a new generation starts when it increases. Works in any loop.
* "callback": the step is set from outside with `handle.set_step(i)` (or
  `attn_pipelines.callbacks.AttnStepCallback` as `callback_on_step_end`), and the forward reads no
  tensor value on the host: with Radial / GNA / LiteAttention a steady-state forward does no host
  sync, which is what `torch.cuda.CUDAGraph` capture and `torch.compile(fullgraph=True)` need.
  `set_step` switches a handle to this mode; `apply(..., step_source="callback")` starts in it.

Warm-up for compile / CUDA graphs: layouts (Radial, GNA, the never-skip part of LiteAttention)
are built on the host at the first call of each (token layout, device) and cached; a traced or
captured forward must only look them up. `handle.prepare(**forward_inputs)` runs one eager forward
per phase of the variants (dense warm-up, sparse, ...) and then starts a fresh generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from .adapters.base import STEP_SOURCES, Adapter, AttnRuntime, find_adapter
from .variants.base import Variant

__all__ = ["AttnHandle", "apply", "HOOK_NAME"]

HOOK_NAME = "attnplug_step"


def _step_hook_cls():
    from diffusers.hooks import ModelHook

    class AttnStepHook(ModelHook):
        """Token grid, per-forward caches and (step_source "hook") the timestep of every forward."""

        _is_stateful = True

        def __init__(self, runtime: AttnRuntime, adapter: Adapter) -> None:
            super().__init__()
            self.runtime = runtime
            self.adapter = adapter

        def pre_forward(self, module, *args, **kwargs):
            rt = self.runtime
            rt.begin_forward()
            rt.grid = self.adapter.grid(module, args, kwargs)
            if rt.step_source == "hook":  # "callback": the forward reads no tensor value
                rt.observe_timestep(self.adapter.timestep(args, kwargs))
            return args, kwargs

        def reset_state(self, module):
            self.runtime.reset()
            return module

    return AttnStepHook


def _transformers_of(obj: Any) -> list[nn.Module]:
    """The denoiser(s) of a pipeline (transformer, transformer_2, unet) or the model itself."""
    if isinstance(obj, nn.Module):
        return [obj]
    found = [
        getattr(obj, name) for name in ("transformer", "transformer_2", "unet") if getattr(obj, name, None) is not None
    ]
    if not found:
        raise TypeError(
            f"apply(): expected a diffusers pipeline (with .transformer or .unet) or a transformer model, "
            f"got {type(obj).__name__}"
        )
    return found


def _check_variants(variants: tuple, adapter: Adapter) -> None:
    if not variants:
        raise ValueError("apply(): give at least one variant, e.g. diffusion_attn.Radial()")
    for v in variants:
        if not isinstance(v, Variant):
            raise TypeError(f"apply(): {v!r} is not a diffusion_attn variant")
        if v.families is not None and adapter.name not in v.families:
            raise ValueError(
                f"apply(): variant {v.name!r} does not support model family {adapter.name!r}; "
                f"it supports: {', '.join(v.families)}"
            )
    sparsity = [v.name for v in variants if v.role == "sparsity"]
    if len(sparsity) > 1:
        raise ValueError(
            f"apply(): variants {sparsity} each choose which blocks to compute; combine at most one sparsity "
            "variant with modifiers/guidance variants"
        )
    names = [v.name for v in variants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"apply(): variant(s) {sorted(dup)} given more than once")


class AttnHandle:
    """Undo handle of `apply`; also the place where the step can be set from a callback."""

    def __init__(self) -> None:
        self.runtimes: list[AttnRuntime] = []
        self._patched: list[tuple[nn.Module, Any]] = []  # (attention module, original processor)
        self._hooked: list[nn.Module] = []
        self.adapters: list[Adapter] = []
        self.variants: tuple[Variant, ...] = ()
        self.removed = False

    @property
    def adapter(self) -> Adapter:
        return self.adapters[0]

    @property
    def step(self) -> int:
        return self.runtimes[0].step

    @property
    def step_source(self) -> str:
        """Where the step comes from: "hook" (the timestep, one host read per forward) or
        "callback" (`set_step`; forwards read no tensor value). See the module docstring."""
        return self.runtimes[0].step_source

    @step_source.setter
    def step_source(self, value: str) -> None:
        if value not in STEP_SOURCES:
            raise ValueError(f"step_source must be one of {STEP_SOURCES}, got {value!r}")
        for rt in self.runtimes:
            rt.step_source = value

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """Set the denoising step from outside (callback_on_step_end); switches the handle to
        step_source "callback" (timestep tracking off: forwards read no tensor value)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"set_step(step=...) must be an int >= 0, got {step!r}")
        for rt in self.runtimes:
            rt.step_source = "callback"
            rt.step = step
            if num_steps is not None:
                rt.num_steps = num_steps

    def reset(self) -> None:
        """Start a new generation: step 0 and every variant's per-generation state cleared."""
        for rt in self.runtimes:
            rt.reset()

    def phase_steps(self) -> tuple[int, ...]:
        """One step per phase of the applied variants (see `Variant.phase_steps`), ascending."""
        steps: set[int] = set()
        for rt in self.runtimes:
            for v in self.variants:
                steps.update(v.phase_steps(rt.family, rt.num_steps))
        return tuple(sorted(steps))

    def prepare(self, *args: Any, steps: Iterable[int] | None = None, **kwargs: Any) -> tuple[int, ...]:
        """Build every phase's layouts now, for the shapes of these transformer inputs.

        `args` / `kwargs` are what the transformer's forward will be called with (same shapes,
        batch, dtype and device as the calls to come). Runs one eager forward without grad per
        step of `steps` (default `phase_steps()`: e.g. Radial's dense warm-up and first sparse step)
        on every hooked transformer, then starts a fresh generation (`reset()`, step 0) and restores
        `step_source`. Afterwards a forward of these shapes only looks layouts up: compile it or
        capture it in a CUDA graph (with step_source "callback"). Returns the steps it ran.
        """
        import torch

        steps = tuple(self.phase_steps() if steps is None else steps)
        saved = [(rt.step_source, rt.step, rt.num_steps) for rt in self.runtimes]
        try:
            with torch.no_grad():
                for step in steps:
                    for rt in self.runtimes:
                        rt.step_source, rt.step = "callback", int(step)
                    for model in self._hooked:
                        model(*args, **kwargs)
        finally:
            for rt, (source, _, num_steps) in zip(self.runtimes, saved):
                rt.reset()
                rt.step_source, rt.num_steps = source, num_steps
        return steps

    @property
    def attention_calls(self) -> int:
        """Attention calls executed through attnplug's kernel (dense calls via the model's backend excluded)."""
        return sum(rt.calls for rt in self.runtimes)

    def remove(self) -> None:
        """Restore every processor and remove the step hook. A second call is a no-op."""
        if self.removed:
            return
        for module, original in reversed(self._patched):
            module.set_processor(original)
        for model in self._hooked:
            registry = getattr(model, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(HOOK_NAME, recurse=False)
                if not registry.hooks:
                    del model._diffusers_hook
                    fwd = model.__dict__.get("forward")
                    if getattr(fwd, "__func__", None) is type(model).forward:
                        del model.__dict__["forward"]  # back to the class's forward
            model._attnplug_handle = None
            del model._attnplug_handle
        self._patched.clear()
        self._hooked.clear()
        self.removed = True

    def __enter__(self) -> AttnHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._patched)} attention modules"
        return f"AttnHandle(variants={[v.name for v in self.variants]}, {state})"


def apply(
    pipe_or_model: Any,
    *variants: Variant,
    num_steps: int | None = None,
    step_source: str = "hook",
    kernel_backend: str = "auto",
) -> AttnHandle:
    """Hook `variants` into a diffusers pipeline's transformer(s) or a transformer model.

    Everything is validated before anything is patched; a model already patched by attnplug is
    refused (remove the first handle, or pass all variants in one call). `num_steps` is the
    number of denoising steps, needed only by options that count from the end (e.g. dense last
    steps). `step_source`: "hook" (step from the timestep) or "callback" (step from
    `handle.set_step`; no host read per forward), see the module docstring. `kernel_backend`:
    the `attn_kernels.attention` backend of sparse calls ("auto": Triton on CUDA, the PyTorch
    reference on CPU). Returns an `AttnHandle`; `handle.remove()` restores the model exactly.
    """
    if step_source not in STEP_SOURCES:
        raise ValueError(f"apply(): step_source must be one of {STEP_SOURCES}, got {step_source!r}")
    from attn_kernels import BACKENDS

    if kernel_backend not in BACKENDS:
        raise ValueError(f"apply(): kernel_backend must be one of {BACKENDS}, got {kernel_backend!r}")
    models = _transformers_of(pipe_or_model)
    plan: list[tuple[nn.Module, Adapter]] = []
    for model in models:
        if getattr(model, "_attnplug_handle", None) is not None:
            raise RuntimeError(
                f"apply(): {type(model).__name__} already has attnplug variants applied; call handle.remove() "
                "first or pass all variants to one apply() call"
            )
        adapter = find_adapter(model)
        _check_variants(variants, adapter)
        mods = adapter.attention_modules(model)
        bad = [n for n, m in mods if not hasattr(m, "set_processor")]
        if bad:
            raise RuntimeError(f"apply(): modules {bad[:3]} of {type(model).__name__} have no set_processor()")
        plan.append((model, adapter))

    handle = AttnHandle()
    handle.variants = tuple(variants)
    hook_cls = _step_hook_cls()
    try:
        from diffusers.hooks import HookRegistry

        for model, adapter in plan:
            mods = adapter.attention_modules(model)
            runtime = AttnRuntime(
                family=adapter.name,
                variants=tuple(variants),
                num_layers=len(mods),
                num_steps=num_steps,
                step_source=step_source,
                kernel_backend=kernel_backend,
            )
            for layer, (_, module) in enumerate(mods):
                original = module.processor
                module.set_processor(adapter.make_processor(runtime, layer, module))
                handle._patched.append((module, original))
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.register_hook(hook_cls(runtime, adapter), HOOK_NAME)
            handle._hooked.append(model)
            model._attnplug_handle = handle
            handle.runtimes.append(runtime)
            handle.adapters.append(adapter)
    except BaseException:
        handle.remove()
        raise
    return handle


def iter_handles(models: Iterable[nn.Module]) -> list[AttnHandle]:
    """Handles currently applied to `models` (for tools and tests)."""
    return [m._attnplug_handle for m in models if getattr(m, "_attnplug_handle", None) is not None]

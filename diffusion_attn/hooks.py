"""`apply(pipe_or_model, *variants) -> AttnHandle`: hook attnplug's variants into a diffusers
transformer with the library's own mechanisms, and undo it exactly.

* Attention modules get an adapter processor through `module.set_processor` (the originals are
  kept and restored by `remove()`); modules not hooked keep theirs.
* A diffusers `ModelHook` on the transformer's forward reads the timestep (-> denoising step,
  new generation when it increases) and the token grid, so step-dependent variants work in any
  pipeline or custom loop. CFG calls at the same timestep share a step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from .adapters.base import Adapter, AttnRuntime, find_adapter
from .variants.base import Variant

__all__ = ["AttnHandle", "apply", "HOOK_NAME"]

HOOK_NAME = "attnplug_step"


def _step_hook_cls():
    from diffusers.hooks import ModelHook

    class AttnStepHook(ModelHook):
        """Reads the timestep and the token grid on every transformer forward."""

        _is_stateful = True

        def __init__(self, runtime: AttnRuntime, adapter: Adapter) -> None:
            super().__init__()
            self.runtime = runtime
            self.adapter = adapter

        def pre_forward(self, module, *args, **kwargs):
            self.runtime.grid = self.adapter.grid(module, args, kwargs)
            self.runtime.observe_timestep(self.adapter.timestep(args, kwargs))
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

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """Set the denoising step from outside (callback_on_step_end); disables timestep tracking."""
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


def apply(pipe_or_model: Any, *variants: Variant, num_steps: int | None = None) -> AttnHandle:
    """Hook `variants` into a diffusers pipeline's transformer(s) or a transformer model.

    Everything is validated before anything is patched; a model already patched by attnplug is
    refused (remove the first handle, or pass all variants in one call). `num_steps` is the
    number of denoising steps, needed only by options that count from the end (e.g. dense last
    steps). Returns an `AttnHandle`; `handle.remove()` restores the model exactly.
    """
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
                family=adapter.name, variants=tuple(variants), num_layers=len(mods), num_steps=num_steps
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

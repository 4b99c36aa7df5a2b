"""`apply(pipe_or_model, *variants) -> AttnHandle`: hook attnplug's variants into a diffusers
pipeline's denoiser(s) with the library's own mechanisms, and undo it exactly.

* Attention modules get an adapter processor through `module.set_processor`; modules not hooked
  keep theirs. A processor the adapter does not reproduce exactly (fused projections, PAG, custom
  processors, ...) is refused before anything is patched, naming the module and the class.
* A stateful diffusers `ModelHook` on every denoiser's forward advances the handle's one
  `StepClock` (see `diffusion_attn.clock`), reads the token grid (from shapes) and selects the
  variant state of the current cache-context branch: pipelines wrap their calls in
  `transformer.cache_context("cond" / "uncond")`, diffusers hands the context to the hook's
  `StateManager`, and each branch keeps its own state (LiteAttention's skip sets). Diffusers'
  end-of-call `_reset_stateful_cache` starts a new generation.
* A dense plan runs the model's own processor; the processor's `_attention_backend` and
  `_parallel_config` are read and written through to it, so `set_attention_backend` /
  `enable_parallelism` called while applied take effect at once and stay after `remove()`.

`remove()` restores every processor attnplug installed; a processor the user replaced while
applied (`set_attn_processor`) is left as the user set it, and a warning at the next generation
names the modules where attnplug no longer runs.

Context parallelism (diffusers `ContextParallelConfig(ulysses_degree=N)`, `enable_parallelism`):
call `enable_parallelism` before `apply` when the model's context-parallel plan shards inputs
of the top-level forward (FLUX, LTX-Video); Wan works in either order. Dense calls are diffusers'
own; sparse calls run inside diffusers' Ulysses all-to-all on the whole sequence and this rank's
heads. Ring attention (`ring_degree > 1`, also with Ulysses) runs every rank's key chunk through the
kernel and merges the chunks by log-sum-exp (`diffusion_attn.adapters.ring`; inference only).

Steps: `step_source="hook"` (default) or "callback" (`handle.set_step`; forwards read nothing on
the host), see `diffusion_attn.clock`. Warm-up for compile / CUDA graphs: `handle.prepare(**inputs)`
runs one eager forward per phase of the variants and then starts a fresh generation.

Logging goes through diffusers' logger (`diffusers.attnplug`): what was patched (INFO), the plan
of every layer whenever it changes (INFO, once per phase and branch), and a warning when a variant
will do nothing (e.g. `dense_steps` >= the number of steps).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from .adapters.base import Adapter, AttnRuntime, SparseProcessor, find_adapter, logger
from .clock import STEP_SOURCES, StepClock, timestep_value
from .variants.base import Variant

__all__ = ["AttnHandle", "apply", "HOOK_NAME"]

HOOK_NAME = "attnplug_step"
_CP_INPUT = "cp_input---"


def _step_hook_cls():
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class BranchState(BaseState):
        """Variant state of one cache-context branch ({(variant index, layer): dict})."""

        def __init__(self) -> None:
            self.states: dict = {}

        def reset(self, *args, **kwargs) -> None:
            self.states.clear()

    class AttnStepHook(ModelHook):
        """Step clock, token grid, per-branch state and per-forward caches of one denoiser."""

        _is_stateful = True

        def __init__(self, handle: AttnHandle, runtime: AttnRuntime, adapter: Adapter) -> None:
            super().__init__()
            self.handle = handle
            self.runtime = runtime
            self.adapter = adapter
            self.branches = StateManager(BranchState)  # diffusers sets its context in cache_context()
            self._generation = -1
            self._perturbed: dict = {}  # variant state of guidance passes, per branch

        def pre_forward(self, module, *args, **kwargs):
            rt, clock = self.runtime, self.runtime.clock
            context = self.branches._context
            branch = None if context is None else context.name
            if rt.perturbed:  # a guidance variant's extra pass (SoftPAG): same step, its own variant state
                name = f"{branch}:perturbed"
                rt.begin_forward(name, self._perturbed.setdefault(name, {}))
                rt.grid = self.adapter.grid(module, args, kwargs)
                return args, kwargs
            if clock.source == "hook":
                adapter = self.adapter
                clock.observe(
                    branch, context, lambda: timestep_value(adapter.timestep(module, args, kwargs))
                )  # fmt: skip
            elif clock.fresh:
                clock.begin_generation(context)
            if self._generation != clock.generation:  # first forward of a generation
                self._generation = clock.generation
                self.handle._start_generation(module, rt, self.adapter)
            rt.begin_forward(branch, None if context is None else self.branches.get_state().states)
            rt.grid = self.adapter.grid(module, args, kwargs)
            return args, kwargs

        def post_forward(self, module, output):
            self.runtime.end_forward()
            return output

        def reset_state(self, module):
            self.runtime.clock.reset()  # diffusers pipelines call this at the end of a generation
            return module

    return AttnStepHook


def _transformers_of(obj: Any) -> tuple[list[tuple[str, nn.Module]], Any]:
    """(name, denoiser) pairs of a pipeline (transformer, transformer_2, unet) or the model itself,
    and the pipeline (None for a model)."""
    if isinstance(obj, nn.Module):
        return [(type(obj).__name__, obj)], None
    found = [
        (name, getattr(obj, name))
        for name in ("transformer", "transformer_2", "unet")
        if getattr(obj, name, None) is not None
    ]
    if not found:
        raise TypeError(
            f"apply(): expected a diffusers pipeline (with .transformer or .unet) or a transformer model, "
            f"got {type(obj).__name__}"
        )
    return found, obj


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


def _check_parallel(model: nn.Module, adapter: Adapter) -> None:
    """Refuse context-parallel settings the sparse path cannot run."""
    pc = getattr(model, "_parallel_config", None)
    cp = getattr(pc, "context_parallel_config", None)
    if cp is None:
        return
    if getattr(cp, "ring_anything", False):
        raise ValueError(
            f"apply(): {type(model).__name__} runs diffusers' ring_anything (uneven shards), which attnplug's "
            "sparse variants do not support; use equal shards (ring_degree=N); nothing was patched"
        )
    if cp.ulysses_anything:
        raise ValueError(
            f"apply(): {type(model).__name__} runs diffusers' ulysses_anything (uneven shards), which attnplug's "
            "sparse variants do not support; use equal shards; nothing was patched"
        )


def _outer_cp_hooks(model: nn.Module, adapter: Adapter) -> list[str]:
    """Inputs the adapter reads that diffusers' context-parallel hooks shard before our hook sees them."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or HOOK_NAME not in registry._hook_order:
        return []
    after = registry._hook_order[registry._hook_order.index(HOOK_NAME) + 1 :]
    sharded: list[str] = []
    for name in after:
        if name.startswith(_CP_INPUT):
            meta = getattr(registry.hooks[name], "metadata", {}) or {}
            sharded += [k for k in meta if k in adapter.grid_inputs]
    return sharded


class AttnHandle:
    """Undo handle of `apply`; also the place where the step can be set from a callback."""

    def __init__(self, clock: StepClock | None = None) -> None:
        self.clock = clock if clock is not None else StepClock()
        self.runtimes: list[AttnRuntime] = []
        self._patched: list[tuple[nn.Module, Any, SparseProcessor, str]] = []  # (module, original, ours, name)
        self._hooked: list[nn.Module] = []
        self._variant_hooks: list[tuple[nn.Module, str]] = []  # (model, hook name) of Variant.model_hook
        self._undo: list = []  # callables undoing adapters' extra hooks (Adapter.install)
        self.adapters: list[Adapter] = []
        self.variants: tuple[Variant, ...] = ()
        self.removed = False
        self._warned: set[str] = set()
        self.clock.on_reset(self._clear_states)

    def _clear_states(self) -> None:
        for rt in self.runtimes:
            rt.clear_states()
        for v in self.variants:
            v.reset()

    @property
    def adapter(self) -> Adapter:
        return self.adapters[0]

    @property
    def step(self) -> int:
        """The pipeline's denoising step (one clock for every denoiser of the pipeline)."""
        return self.clock.step

    @property
    def num_steps(self) -> int | None:
        """The generation's number of denoising steps when known (apply(num_steps=) or the pipeline)."""
        return self.clock.num_steps

    @property
    def step_source(self) -> str:
        """Where the step comes from: "hook" (cache context / timestep) or "callback" (`set_step`)."""
        return self.clock.source

    @step_source.setter
    def step_source(self, value: str) -> None:
        if value not in STEP_SOURCES:
            raise ValueError(f"step_source must be one of {STEP_SOURCES}, got {value!r}")
        self.clock.source = value

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """Set the denoising step from outside (callback_on_step_end); switches the handle to
        step_source "callback" (forwards read no tensor value)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"set_step(step=...) must be an int >= 0, got {step!r}")
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
            raise ValueError(f"set_step(num_steps=...) must be an int >= 1, got {num_steps!r}")
        self.clock.source = "callback"
        self.clock.step = step
        if num_steps is not None:
            self.clock.run_num_steps = num_steps

    def reset(self) -> None:
        """Start a new generation: step 0 and every variant's per-generation state cleared."""
        self.clock.reset()

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
        clock = self.clock
        source = clock.source
        try:
            with torch.no_grad():
                for step in steps:
                    clock.source, clock.step = "callback", int(step)
                    for model in self._hooked:
                        model(*args, **kwargs)
        finally:
            clock.reset()
            clock.source = source
        return steps

    @property
    def attention_calls(self) -> int:
        """Attention calls executed through attnplug's kernel (dense calls via the model's processor excluded)."""
        return sum(rt.calls for rt in self.runtimes)

    # -- generation start (called by the step hooks) ---------------------------------------------
    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            logger.warning(msg)

    def _start_generation(self, model: nn.Module, rt: AttnRuntime, adapter: Adapter) -> None:
        """Checks at the first forward of a generation (skipped while torch.compile traces)."""
        import torch

        if torch.compiler.is_compiling():
            return
        sharded = _outer_cp_hooks(model, adapter)
        if sharded:
            raise RuntimeError(
                f"attnplug[{adapter.name}]: diffusers' context parallelism was enabled on {type(model).__name__} after "
                f"diffusion_attn.apply(): its hooks shard {sorted(set(sharded))} before attnplug reads the token grid. "
                "Call model.enable_parallelism(...) first, then apply() (handle.remove() and apply() again)"
            )
        bypassed = [name for module, _, ours, name in self._patched if module.processor is not ours]
        if bypassed:
            self._warn_once(
                f"attnplug: {len(bypassed)} attention module(s) no longer use attnplug's processor (replaced with "
                f"set_attn_processor while applied): {', '.join(bypassed[:4])}{' ...' if len(bypassed) > 4 else ''}; "
                "they run the processor that was set, and remove() leaves it in place"
            )
        for v in self.variants:
            missing = v.missing_num_steps(rt.num_steps)
            if missing:  # fail at the first forward, not after a dense warm-up
                raise ValueError(missing)
            reason = v.inactive_reason(rt.family, rt.num_steps, rt.num_layers)
            if reason:
                self._warn_once(f"attnplug[{rt.family}] {rt.model_name}: {reason}")

    def remove(self) -> None:
        """Restore every processor attnplug installed (processors the user replaced while applied stay)
        and remove the step hooks. A second call is a no-op."""
        if self.removed:
            return
        kept = []
        for module, original, ours, name in reversed(self._patched):
            if module.processor is ours:
                module.set_processor(original)
            else:
                kept.append(name)
        if kept:
            logger.info(f"attnplug: remove() kept the processors set while applied on {', '.join(reversed(kept))}")
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        for model, name in reversed(self._variant_hooks):
            registry = getattr(model, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(name, recurse=False)
        self._variant_hooks.clear()
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
        logger.info(f"attnplug: removed {[v.name for v in self.variants]}")

    def __enter__(self) -> AttnHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._patched)} attention modules"
        return f"AttnHandle(variants={[v.name for v in self.variants]}, step={self.step}, {state})"


def apply(
    pipe_or_model: Any,
    *variants: Variant,
    num_steps: int | None = None,
    step_source: str = "hook",
    kernel_backend: str = "auto",
) -> AttnHandle:
    """Hook `variants` into a diffusers pipeline's denoiser(s) or a transformer model.

    Everything is validated before anything is patched: the variants, every hooked module's
    processor (one the adapter does not reproduce exactly is refused, naming it), context-parallel
    settings; a model already patched by attnplug is refused (remove the first handle, or pass all
    variants in one call). All denoisers of a pipeline (Wan2.2's `transformer` and `transformer_2`)
    share one step clock. `num_steps`: the number of denoising steps, for options that count from
    the end (e.g. `Radial(dense_last_steps=...)`); by default the pipeline's own count is used when
    a pipeline runs. `step_source`: "hook" or "callback" (see `diffusion_attn.clock`).
    `kernel_backend`: the `attn_kernels.attention` backend of sparse calls ("auto": Triton on CUDA,
    the PyTorch reference on CPU). Returns an `AttnHandle`; `handle.remove()` restores the model.
    """
    if step_source not in STEP_SOURCES:
        raise ValueError(f"apply(): step_source must be one of {STEP_SOURCES}, got {step_source!r}")
    from attn_kernels import BACKENDS

    if kernel_backend not in BACKENDS:
        raise ValueError(f"apply(): kernel_backend must be one of {BACKENDS}, got {kernel_backend!r}")
    if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
        raise ValueError(f"apply(): num_steps must be an int >= 1 (the number of denoising steps), got {num_steps!r}")
    models, pipe = _transformers_of(pipe_or_model)
    plan: list[tuple[str, nn.Module, Adapter, list]] = []
    crosses: dict[int, list] = {}  # id(model) -> cross-attention modules (hooked for Variant.cross_attention)
    for label, model in models:
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
        for name, module in mods:
            adapter.check_processor(name, module, model)
        if any(v.cross_attention for v in variants):
            crosses[id(model)] = adapter.cross_attention_modules(model)
            for name, module in crosses[id(model)]:
                adapter.check_processor(name, module, model, cross=True)
        for v in variants:
            v.check_apply(adapter.name, mods, tuple(variants))
        _check_parallel(model, adapter)
        plan.append((label, model, adapter, mods))

    handle = AttnHandle(StepClock(step_source, num_steps, pipe))
    handle.variants = tuple(variants)
    hook_cls = _step_hook_cls()
    try:
        from diffusers.hooks import HookRegistry

        for label, model, adapter, mods in plan:
            runtime = AttnRuntime(
                family=adapter.name,
                variants=tuple(variants),
                num_layers=len(mods),
                clock=handle.clock,
                kernel_backend=kernel_backend,
                model_name=label,
                layer_names=tuple(n for n, _ in mods),
            )
            handle.runtimes.append(runtime)
            handle.adapters.append(adapter)
            for layer, (name, module) in enumerate(mods):
                original = module.processor
                ours = adapter.make_processor(runtime, layer, module)
                module.set_processor(ours)
                handle._patched.append((module, original, ours, f"{label}.{name}"))
            for j, (name, module) in enumerate(crosses.get(id(model), ())):  # layers len(mods) + j
                original = module.processor
                ours = adapter.make_processor(runtime, len(mods) + j, module, cross=True)
                module.set_processor(ours)
                handle._patched.append((module, original, ours, f"{label}.{name}"))
            handle._undo += adapter.install(model, runtime)
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.register_hook(hook_cls(handle, runtime, adapter), HOOK_NAME)
            handle._hooked.append(model)
            for v in variants:
                extra = v.model_hook(runtime)
                if extra is not None:  # wraps the step hook (SoftPAG's perturbed pass, RIFLEx's RoPE)
                    registry.register_hook(extra, f"{HOOK_NAME}_{v.name}")
                    handle._variant_hooks.append((model, f"{HOOK_NAME}_{v.name}"))
            registry.invalidate_child_registries_cache()
            model._attnplug_handle = handle
            logger.info(
                f"attnplug: patched {len(mods)} attention modules of {type(model).__name__} ({label}) with "
                f"{', '.join(repr(v) for v in variants)}: {mods[0][0]} ... {mods[-1][0]}; "
                f"step source {step_source!r}, kernel backend {kernel_backend!r}"
            )
        for rt in handle.runtimes:
            for v in variants:
                reason = v.inactive_reason(rt.family, handle.clock.num_steps, rt.num_layers)
                if reason:
                    handle._warn_once(f"attnplug[{rt.family}] {rt.model_name}: {reason}")
    except BaseException:
        handle.remove()
        raise
    return handle


def iter_handles(models: Iterable[nn.Module]) -> list[AttnHandle]:
    """Handles currently applied to `models` (for tools and tests)."""
    return [m._attnplug_handle for m in models if getattr(m, "_attnplug_handle", None) is not None]

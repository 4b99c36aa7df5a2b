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
kernel and merges the chunks by log-sum-exp (`diffusion_attn.runtime.ring`; inference only).

Steps: `step_source="hook"` (default) or "callback" (`handle.set_step`; forwards read nothing on
the host), see `diffusion_attn.clock`. Warm-up for compile / CUDA graphs: `handle.prepare(**inputs)`
runs one eager forward per phase of the variants and then starts a fresh generation.

Logging goes through diffusers' logger (`diffusers.attnplug`): what was patched (INFO), the plan
of every layer whenever it changes (INFO, once per phase and branch), and a warning when a variant
will do nothing (e.g. `dense_steps` >= the number of steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from attn_kernels import BACKENDS
from attn_spec import Spec, SpecError, build, parse_spec

from .adapters import find_adapter
from .adapters.base import Adapter, SparseProcessor, logger
from .caches import HOOK_NAME, find_caches
from .clock import STEP_SOURCES, StepClock, timestep_value
from .runtime import AttnRuntime
from .variants import VARIANTS
from .variants.base import Variant

__all__ = ["AttnHandle", "apply", "apply_pretrained", "load_config", "find_caches", "CONFIG_NAME", "HOOK_NAME"]

_CP_INPUT = "cp_input---"
#: file `handle.save_pretrained` (and `save_pretrained` of a model / pipeline while applied) writes
CONFIG_NAME = "attnplug_config.json"
CONFIG_FORMAT = "attnplug-config"
#: marks the error a traced forward raises for a (shapes, phase) never run eagerly; the compile entries
#: attnplug installs catch it and run that call once eagerly (torch.compiler.set_stance("force_eager"))
WARMUP_MARK = "attnplug: compile warm-up needed"


def _cache_conflict(variant: Variant, caches: dict[str, bool]) -> str | None:
    """Why `variant` cannot run under these caches (None: it cooperates). A variant says so with
    `cache_conflict(caches)`; a guidance variant without it refuses caches with shared state (its extra
    forwards would read the branch's cached attention)."""
    fn = getattr(variant, "cache_conflict", None)
    if callable(fn):
        return fn(caches)
    shared = sorted(c for c, per_context in caches.items() if not per_context)
    if variant.role == "guidance" and shared:
        return (
            f"{type(variant).__name__} runs extra forwards whose attention {', '.join(shared)} would serve from the "
            "cache of the pipeline's own calls (one cache per attention module, not per branch)"
        )
    return None


def _check_caches(model: nn.Module, variants: tuple, where: str) -> None:
    caches = find_caches(model)
    if not caches:
        return
    for v in variants:
        reason = _cache_conflict(v, caches)
        if reason:
            raise ValueError(
                f"{where}: {v.name} cannot run with diffusers' {', '.join(sorted(caches))} on {type(model).__name__}: "
                f"{reason}. Disable the cache (model.disable_cache()) or drop {v.name}"
            )


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
        self._phases: tuple[int, ...] = handle.phase_steps()
        self._warm: set = set()  # (input shapes, phase, perturbed) run eagerly: their layouts exist

    def _warm_key(self, args: tuple, kwargs: dict) -> tuple:
        step = self.runtime.clock.step
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        shapes += tuple((k, tuple(kwargs[k].shape)) for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor))
        return shapes, sum(1 for s in self._phases if s <= step), self.runtime.perturbed

    def _check_warm(self, compiling: bool, args: tuple, kwargs: dict) -> None:
        """Eager forwards record their (shapes, phase); a traced one whose layouts were never built
        (they are built on the host at the first call of a phase) stops with an error naming the fix."""
        key = self._warm_key(args, kwargs)
        if not compiling:
            self._warm.add(key)
        elif key not in self._warm:
            raise RuntimeError(
                f"{WARMUP_MARK}: torch.compile traced step {self.runtime.clock.step} for inputs never run "
                "eagerly, whose block layouts do not exist yet; call handle.prepare(**transformer_inputs) once "
                "before the first compiled call, or compile in place after apply() (transformer.compile() or "
                "compile_repeated_blocks(), which attnplug warms up by itself)"
            )

    def _pre_forward_traced(self, module, args: tuple, kwargs: dict, context: Any, branch: str | None) -> None:
        """pre_forward while torch.compile traces it: no host read and no branch on per-generation flags
        (each would be a guard, i.e. another graph): the step from the cache context or the scheduler."""
        rt, clock = self.runtime, self.runtime.clock
        if clock.source == "hook":
            if not clock.observe_compiled(branch, context):
                raise RuntimeError(
                    "attnplug: torch.compile traces the step hook of a transformer used without a pipeline "
                    "or cache context, so the denoising step could only come from reading the timestep on "
                    "the host (a graph break); apply(model, ..., step_source='callback') and call "
                    "handle.set_step(i) every step, or apply() to the pipeline"
                )
        else:
            clock.begin_generation(context)
        rt.begin_forward(branch, None if context is None else self.branches.get_state().states)
        rt.grid = self.adapter.grid(module, args, kwargs)
        self._check_warm(True, args, kwargs)

    def pre_forward(self, module, *args, **kwargs):
        rt, clock = self.runtime, self.runtime.clock
        context = self.branches._context
        branch = None if context is None else context.name
        compiling = torch.compiler.is_compiling()
        if compiling and not rt.perturbed:
            self._pre_forward_traced(module, args, kwargs, context, branch)
            return args, kwargs
        if rt.perturbed:  # a guidance variant's extra pass (SoftPAG): same step, its own variant state
            name = f"{branch}:perturbed"
            rt.begin_forward(name, self._perturbed.setdefault(name, {}))
            rt.grid = self.adapter.grid(module, args, kwargs)
            self._check_warm(compiling, args, kwargs)
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
            self._phases = self.handle.phase_steps()
        rt.begin_forward(branch, None if context is None else self.branches.get_state().states)
        rt.grid = self.adapter.grid(module, args, kwargs)
        self._check_warm(False, args, kwargs)
        if getattr(module, "is_gradient_checkpointing", False) and torch.is_grad_enabled():
            self.handle._wrap_checkpointing(module, rt)
        return args, kwargs

    def post_forward(self, module, output):
        self.runtime.end_forward()
        return output

    def reset_state(self, module):
        self.runtime.clock.reset()  # diffusers pipelines call this at the end of a generation
        return module


def _unwrap(model: Any) -> tuple[Any, Any]:
    """(the module, its `torch.compile` wrapper or None): apply() patches the module an `OptimizedModule` wraps."""
    orig = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
    return (orig, model) if isinstance(orig, nn.Module) else (model, None)


def _transformers_of(obj: Any) -> tuple[list[tuple[str, nn.Module, Any]], Any]:
    """(name, denoiser, its torch.compile wrapper or None) of a pipeline (transformer, transformer_2, unet)
    or of the model itself, and the pipeline (None for a model)."""
    if isinstance(obj, nn.Module):
        model, compiled = _unwrap(obj)
        return [(type(model).__name__, model, compiled)], None
    found = [
        (name, *_unwrap(getattr(obj, name)))
        for name in ("transformer", "transformer_2", "unet")
        if getattr(obj, name, None) is not None
    ]
    if not found:
        raise TypeError(
            f"apply(): expected a diffusers pipeline (with .transformer or .unet) or a transformer model, "
            f"got {type(obj).__name__}"
        )
    return found, obj


# -- gradient checkpointing ------------------------------------------------------------------------------------
def _snapshot(rt: AttnRuntime) -> tuple:
    """What an attention call's plan depends on besides its inputs (perturbed pass, grid, branch state, step)."""
    return rt.perturbed, rt.grid, rt.branches.current, rt.branch, rt.clock.step, rt.clock.timestep


def _restore(rt: AttnRuntime, snap: tuple) -> None:
    rt.perturbed, rt.grid, rt.branches.current, rt.branch, rt.clock.step, rt.clock.timestep = snap


@contextlib.contextmanager
def _replay(rt: AttnRuntime, snap: tuple):
    """During a checkpointed block's recomputation (in backward, after the forward moved on): the runtime as it
    was when the block ran, so the recomputed attention takes the same path (SoftPAG's perturbed pass)."""
    saved = _snapshot(rt)
    _restore(rt, snap)
    try:
        yield
    finally:
        _restore(rt, saved)


def _is_default_checkpointing(fn: Any) -> bool:
    name = getattr(fn, "__qualname__", "")
    return name.endswith("enable_gradient_checkpointing.<locals>._gradient_checkpointing_func")


def _checkpointing(rt: AttnRuntime) -> Callable[..., Any]:
    """diffusers' default `_gradient_checkpointing_func` (non-reentrant torch checkpoint) with a `context_fn`
    that replays the runtime's state while the block is recomputed."""

    def checkpointed(module: nn.Module, *args: Any) -> Any:
        import torch.utils.checkpoint

        snap = _snapshot(rt)
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _replay(rt, snap)),
        )  # fmt: skip

    checkpointed._attnplug = True  # type: ignore[attr-defined]
    return checkpointed


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
        self._guards: list[tuple[Any, str, Any]] = []  # (object, attribute, our function) set in its __dict__
        self._entries: list[tuple[Any, str, Any, Any]] = []  # (object, attribute, previous, our compile entry)
        self.target: Any = None  # what apply() was given (pipeline or model), for save_pretrained
        self.apply_kwargs: dict[str, Any] = {}
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
        _check_caches(model, self.variants, "attnplug")  # a cache enabled after apply() without enable_cache()
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
        for obj, name, previous, ours in reversed(self._entries):
            if obj.__dict__.get(name) is ours:
                obj.__dict__[name] = previous
        self._entries.clear()
        for obj, name, ours in reversed(self._guards):
            if obj.__dict__.get(name) is ours:
                del obj.__dict__[name]
        self._guards.clear()
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

    # -- guards on the user's objects (undone by remove) -------------------------------------------
    def _guard(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        """Set `obj.<name>` to `fn` in its instance dict (shadowing the class's method) until remove()."""
        if name in obj.__dict__:
            return
        obj.__dict__[name] = fn
        self._guards.append((obj, name, fn))

    def _entry(self, obj: Any, name: str) -> None:
        """Wrap the compiled callable `obj.<name>` (an `OptimizedModule`'s forward, a module's
        `_compiled_call_impl`) so that a call whose layouts do not exist yet runs once eagerly."""
        call = obj.__dict__.get(name)
        if call is None or getattr(call, "_attnplug_entry", False):
            return

        def entry(*args: Any, **kwargs: Any) -> Any:
            try:
                return call(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (Dynamo wraps the traced error; ours carries WARMUP_MARK)
                if WARMUP_MARK not in str(e):
                    raise
            with torch.compiler.set_stance("force_eager"):  # builds this phase's layouts; later calls compile
                return call(*args, **kwargs)

        entry._attnplug_entry = True  # type: ignore[attr-defined]
        obj.__dict__[name] = entry
        self._entries.append((obj, name, call, entry))

    def _install_guards(self, model: nn.Module, pipe: Any, compiled: Any) -> None:
        """What users stack on a model while it is applied: fused QKV refused, caches checked, in-place
        compilation warmed up, save_pretrained writing the attnplug config beside the weights."""
        handle = self
        where = type(model).__name__

        def refuse_fuse(*args: Any, **kwargs: Any) -> None:
            raise ValueError(
                f"{where}.fuse_qkv_projections(): attnplug variants are applied and attnplug does not reproduce "
                "diffusers' fused QKV processors; nothing was fused. Call handle.remove() first (or fuse before "
                "apply(), which then refuses the fused processors by name)"
            )

        for obj in (model, pipe):
            if obj is not None and callable(getattr(obj, "fuse_qkv_projections", None)):
                self._guard(obj, "fuse_qkv_projections", refuse_fuse)

        enable_cache = getattr(model, "enable_cache", None)
        if callable(enable_cache):

            def enable_cache_checked(config: Any) -> None:
                enable_cache(config)
                try:
                    _check_caches(model, handle.variants, f"{where}.enable_cache()")
                except ValueError as e:
                    model.disable_cache()
                    raise ValueError(f"{e} (the cache was not enabled)") from None

            self._guard(model, "enable_cache", enable_cache_checked)

        compile_ = model.compile

        def compile_in_place(*args: Any, **kwargs: Any) -> None:
            compile_(*args, **kwargs)
            handle._entry(model, "_compiled_call_impl")

        self._guard(model, "compile", compile_in_place)
        if callable(getattr(model, "compile_repeated_blocks", None)):

            def compile_whole(*args: Any, **kwargs: Any) -> None:
                logger.info(
                    f"attnplug: {where}.compile_repeated_blocks() while attnplug is applied compiles the whole "
                    "transformer in place (one graph per variant phase): each layer keeps its own variant state, "
                    "so one graph per repeated block would recompile for every layer"
                )
                model.compile(*args, **kwargs)

            self._guard(model, "compile_repeated_blocks", compile_whole)
        if getattr(model, "_compiled_call_impl", None) is not None:  # compiled in place before apply()
            self._entry(model, "_compiled_call_impl")
        if compiled is not None:  # apply() was given torch.compile(model)
            self._entry(compiled, "forward")

        save = getattr(model, "save_pretrained", None)
        if callable(save):

            def save_with_config(save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
                out = save(save_directory, *args, **kwargs)
                if kwargs.get("is_main_process", True):
                    handle._write_config(save_directory)
                return out

            self._guard(model, "save_pretrained", save_with_config)
        psave = getattr(pipe, "save_pretrained", None) if pipe is not None else None
        if callable(psave):

            def pipe_save_with_config(save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
                out = psave(save_directory, *args, **kwargs)
                handle._write_config(save_directory)
                return out

            self._guard(pipe, "save_pretrained", pipe_save_with_config)

    def _wrap_checkpointing(self, model: nn.Module, rt: AttnRuntime) -> None:
        """Blocks checkpointed with diffusers' default function get ours (same checkpoint, plus the replay of
        the runtime's state at recomputation); restored by remove()."""
        for m in model.modules():
            fn = m.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and _is_default_checkpointing(fn):
                ours = _checkpointing(rt)
                m.__dict__["_gradient_checkpointing_func"] = ours
                self._entries.append((m, "_gradient_checkpointing_func", fn, ours))

    # -- persistence ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The attnplug config of this handle: variants as `attn_spec` strings and apply()'s settings."""
        return {
            "format": CONFIG_FORMAT,
            "version": 1,
            "attn": [variant_spec(v) for v in self.variants],
            "families": {rt.model_name: rt.family for rt in self.runtimes},
            "apply": dict(self.apply_kwargs),
        }

    def _write_config(self, save_directory: str | os.PathLike) -> Path:
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.config(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Save what apply() was given (pipeline or model) with its own `save_pretrained(save_directory,
        **kwargs)` and the attnplug config (`attnplug_config.json`) beside its weights (a pipeline: at the
        top and in each denoiser's folder). `apply_pretrained` re-applies it after `from_pretrained`;
        `attnplug generate --config <dir>` reads the same file. Returns the config's path."""
        if self.removed:
            raise RuntimeError("save_pretrained(): this handle was removed; nothing is applied to save")
        self.config()  # refuse unsaveable options before writing anything
        self.target.save_pretrained(save_directory, **kwargs)
        return Path(save_directory) / CONFIG_NAME

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
    if kernel_backend not in BACKENDS:
        raise ValueError(f"apply(): kernel_backend must be one of {BACKENDS}, got {kernel_backend!r}")
    if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
        raise ValueError(f"apply(): num_steps must be an int >= 1 (the number of denoising steps), got {num_steps!r}")
    models, pipe = _transformers_of(pipe_or_model)
    plan: list[tuple[str, nn.Module, Adapter, list]] = []
    crosses: dict[int, list] = {}  # id(model) -> cross-attention modules (hooked for Variant.cross_attention)
    wrappers = {id(model): compiled for _, model, compiled in models}
    for label, model, _ in models:
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
        _check_caches(model, tuple(variants), "apply()")
        plan.append((label, model, adapter, mods))

    handle = AttnHandle(StepClock(step_source, num_steps, pipe))
    handle.variants = tuple(variants)
    handle.target = pipe if pipe is not None else models[0][1]
    handle.apply_kwargs = {"num_steps": num_steps, "step_source": step_source, "kernel_backend": kernel_backend}
    hook_cls = AttnStepHook
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
            handle._install_guards(model, pipe, wrappers.get(id(model)))
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


# -- persistence ------------------------------------------------------------------------------------------
def variant_spec(variant: Variant) -> str:
    """`name:option=value,...` of a variant (options that differ from the defaults), as `--attn` and
    presets write it; a ValueError names an option that has no literal form (e.g. a tensor mask)."""
    opts: dict[str, Any] = {}
    for f in dataclasses.fields(variant):  # type: ignore[arg-type]
        if not f.init or f.name.startswith("_"):
            continue
        value = getattr(variant, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        try:
            same = default is not dataclasses.MISSING and bool(value == default)
        except (RuntimeError, TypeError, ValueError):
            same = False
        if not same:
            opts[f.name] = value

    def literal(spec: Spec) -> bool:
        try:
            return parse_spec(str(spec), where="attnplug config") == spec
        except (SpecError, ValueError, SyntaxError):
            return False

    spec = Spec(variant.name, opts)
    if not literal(spec):
        bad = [k for k, v in opts.items() if not literal(Spec(variant.name, {k: v}))]
        raise ValueError(
            f"save_pretrained(): {variant.name} option(s) {bad or sorted(opts)} have no literal form to write to "
            f"{CONFIG_NAME}; save the settings in your own code and apply() them after loading"
        )
    return str(spec)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """An attnplug config (`attnplug_config.json`, or a directory holding one), checked: a ValueError names
    the file and the problem. Returns {"attn": [spec, ...], "apply": {...}, "path": Path, ...}."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CONFIG_NAME
    where = f"attnplug config {str(p)!r}"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file (written by handle.save_pretrained)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
        raise ValueError(f'{where}: not an attnplug config (expected "format": {CONFIG_FORMAT!r})')
    if data.get("version") != 1:
        raise ValueError(f"{where}: version {data.get('version')!r} is not supported (this attnplug reads 1)")
    attn = data.get("attn")
    if not isinstance(attn, list) or not attn or not all(isinstance(a, str) for a in attn):
        raise ValueError(f"{where}: 'attn' must be a non-empty list of variant specs")
    settings = data.get("apply") if isinstance(data.get("apply"), dict) else {}
    unknown = sorted(set(settings) - {"num_steps", "step_source", "kernel_backend"})
    if unknown:
        raise ValueError(f"{where}: unknown 'apply' settings {unknown}")
    return {**data, "apply": settings, "path": p}


def config_variants(config: dict[str, Any]) -> tuple[Variant, ...]:
    """The variants of a `load_config` result, built and validated (ValueError naming the option)."""
    where = f"attnplug config {str(config.get('path', ''))!r}"
    return tuple(build(parse_spec(a, where=where), VARIANTS, where=where) for a in config["attn"])


def _config_path(obj: Any, path: str | os.PathLike | None) -> Path:
    """The config file of `path`, else of the directory `obj` (pipeline or model) was loaded from."""
    if path is not None:
        return Path(path).expanduser()
    models, pipe = _transformers_of(obj)
    places = []
    root = getattr(getattr(pipe, "config", None), "_name_or_path", None) if pipe is not None else None
    if root:
        places.append(Path(root))
    for _, model, _ in models:
        src = getattr(getattr(model, "config", None), "_name_or_path", None)
        if src:
            places.append(Path(src))
    for place in places:
        if (place / CONFIG_NAME).is_file():
            return place / CONFIG_NAME
    raise ValueError(
        f"apply_pretrained(): no {CONFIG_NAME} beside the weights of {type(obj).__name__} (looked in "
        f"{', '.join(str(p) for p in places) or 'nothing: it was not loaded with from_pretrained'}); pass path="
    )


def apply_pretrained(pipe_or_model: Any, path: str | os.PathLike | None = None, **overrides: Any) -> AttnHandle:
    """Re-apply the variants saved with `handle.save_pretrained` (or a pipeline / model saved while
    applied): reads `attnplug_config.json` from `path` (a file or directory), by default from the
    directory `from_pretrained` loaded `pipe_or_model` from. `overrides`: apply() keyword arguments
    that replace the saved ones. Returns the handle."""
    config = load_config(_config_path(pipe_or_model, path))
    variants = config_variants(config)
    return apply(pipe_or_model, *variants, **{**config["apply"], **overrides})

"""SoftPAG (HeadHunter, cvlab-kaist): perturbed-attention guidance on selected attention heads.

On each selected (layer, head) the attention map is moved toward the identity, A' = (1 - u) A + u I,
so the head's output is (1 - u) * attn + u * V: attn_kernels' fused `OutputMix` (A is never
materialised). The perturbed prediction eps_pert is the conditional input run again with those heads
perturbed; the guided prediction is

    eps = eps_u + w_cfg (eps_c - eps_u) + w_p (eps_c - eps_pert)        (no CFG: eps_c + w_p (eps_c - eps_pert))

How the hook gets exactly this from a stock pipeline it does not control: after the conditional forward
it runs the perturbed pass on the conditional input and adds d = w_p (eps_c - eps_pert) to EVERY
prediction of that denoising step (cond, uncond, and extra ones such as SD3's skip-layer pass). Every
CFG rule of diffusers' pipelines is an affine combination of the step's predictions (weights summing
to 1: eps_u + w (eps_c - eps_u), FLUX true CFG, CogVideoX's dynamic scale, Wan2.2's second scale), so
the combination comes out shifted by exactly d, whatever w_cfg is and however CFG is run:

* sequential branches (`cache_context("cond")` then `"uncond"`: Wan, FLUX true CFG, HunyuanVideo):
  the perturbed pass follows the "cond" call, the "uncond" call gets the same shift;
* batched CFG (one call on [uncond, cond], diffusers' order: SD3, CogVideoX, LTX-Video): the perturbed
  pass runs on the second half, both halves are shifted;
* no CFG (FLUX.1-dev, guidance-distilled): eps_c + w_p (eps_c - eps_pert).

Whether a call without a branch name is batched comes from `batched_cfg`, else the pipeline given to
`apply` (`do_classifier_free_guidance`, else `guidance_scale > 1` read at the generation's first
forward), else the name "cond_uncond". A pipeline that post-processes the guided prediction
non-linearly (LTX-Video's `guidance_rescale > 0`) applies that to the SoftPAG-guided prediction.

The perturbed pass is a second forward of the transformer inside the same step: attnplug's step hook
does not advance the clock for it and gives it its own variant state (`AttnContext.perturbed`); layers
with selected heads run attnplug's kernel with `OutputMix` (also under a non-default
`set_attention_backend`), the others the model's own processor. `mode="guider"` leaves the extra pass
to `diffusion_attn.guidance.SoftPAGGuidance` (modular pipelines): the heads are perturbed exactly in
the forwards the guider marks.

Heads: `heads` ((layer, head) pairs), `layers` (every head of those layers) and/or `heads_file` (a
HeadHunter result, `diffusion_attn.headhunter`); layers are indices among the hooked attention layers
in the adapter's order (FLUX: dual-stream blocks, then single-stream). Schedule: `start` / `stop`
(fractions of the steps, like diffusers' guiders: steps int(start*n) <= i < int(stop*n)) or an
explicit `steps` tuple. `scale = 0` or `u = 0` runs nothing extra: bit-identical to no guidance.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from attn_kernels import OutputMix
from attn_spec import OneOf, Range, require

from ..caches import HOOK_NAME, find_caches
from .base import AttnContext, AttnPlan, Variant, check_options, register_variant

__all__ = ["SoftPAG", "HEADS_FORMAT", "load_heads_file"]

#: `format` field of a HeadHunter result file (written by diffusion_attn.headhunter)
HEADS_FORMAT = "attnplug-headhunter"
#: forward arguments that carry no batch dimension (never split for the batched perturbed pass)
_NO_BATCH = frozenset(
    {"img_ids", "txt_ids", "image_rotary_emb", "rotary_emb", "video_coords", "num_frames", "height", "width",
     "rope_interpolation_scale", "return_dict", "skip_layers"}
)  # fmt: skip


def load_heads_file(path: str | Path) -> tuple[tuple[tuple[int, int], ...], dict]:
    """(selected (layer, head) pairs, model signature) of a HeadHunter result JSON; ValueError naming the file."""
    p = Path(path).expanduser()
    where = f"SoftPAG.heads_file {str(path)!r}"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or data.get("format") != HEADS_FORMAT:
        raise ValueError(f'{where}: not a HeadHunter result (expected "format": {HEADS_FORMAT!r})')
    sel = data.get("selected")
    if not isinstance(sel, list) or not all(
        isinstance(x, list) and len(x) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
        for x in sel
    ):
        raise ValueError(f"{where}: 'selected' must be a list of [layer, head] int pairs")
    if not sel:
        raise ValueError(f"{where}: the search selected no head yet (resume it: attnplug headhunt ... --out {path})")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return tuple((int(a), int(b)) for a, b in sel), model


def _int_pairs(name: str, value: Any) -> tuple[tuple[int, int], ...]:
    """`value` as a tuple of (layer, head) int pairs (TypeError naming the option otherwise); their range is declared
    on the field (`SoftPAG.heads`) and checked by `check_options`."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a sequence of (layer, head) pairs, got {value!r}")
    out = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in pair
        ):
            raise TypeError(f"{name}[{i}] must be a (layer, head) pair of ints, got {pair!r}")
        out.append((int(pair[0]), int(pair[1])))
    return tuple(out)


@register_variant
@dataclass
class SoftPAG(Variant):
    """Head-level perturbed-attention guidance (HeadHunter's SoftPAG).

    scale: w_p >= 0 (0: no guidance); u: interpolation toward the identity map in [0, 1] (1 = PAG's
    identity attention); heads / layers / heads_file: the perturbed heads (at least one); start / stop:
    fractions of the denoising steps where the perturbation applies, or `steps`: explicit step indices;
    batched_cfg: whether an unnamed call is batched [uncond, cond] (None: from the pipeline);
    mode: "hook" (the transformer hook runs the perturbed pass and combines) or "guider" (perturb only
    the forwards `SoftPAGGuidance` marks).
    """

    name: ClassVar[str] = "softpag"
    role: ClassVar[str] = "guidance"
    families: ClassVar[tuple[str, ...] | None] = None

    scale: Annotated[float, Range(0.0, None, finite=True)] = 3.0
    u: Annotated[float, Range(0.0, 1.0)] = 0.5
    heads: Annotated[
        tuple[tuple[int, int], ...] | None,
        Range(0, None, message="{name}[{index}] = {item}: layer and head must be {bounds}"),
    ] = None
    layers: Annotated[tuple[int, ...] | None, Range(0, None)] = None
    heads_file: str | None = None
    start: Annotated[float, Range(0.0, 1.0)] = 0.0
    stop: Annotated[float, Range(0.0, 1.0)] = 1.0
    steps: Annotated[tuple[int, ...] | None, Range(0, None)] = None
    batched_cfg: bool | None = None
    mode: Annotated[str, OneOf("hook", "guider")] = "hook"

    def __post_init__(self) -> None:
        for f in ("steps", "layers"):  # sequences: their items' ranges are declared above
            if getattr(self, f) is not None and not isinstance(getattr(self, f), (tuple, list)):
                raise TypeError(f"SoftPAG.{f} must be a tuple of ints >= 0 or None, got {getattr(self, f)!r}")
        if self.heads is not None:  # types first: the pairs' range is declared above
            self.heads = _int_pairs("SoftPAG.heads", self.heads)
        check_options(self)  # the ranges declared on the fields above
        require(self.start < self.stop, "SoftPAG.start", f"< SoftPAG.stop ({self.stop})", self.start)
        if self.steps is not None:
            self.steps = tuple(sorted(set(self.steps)))
        if self.batched_cfg is not None and not isinstance(self.batched_cfg, bool):
            raise TypeError(f"SoftPAG.batched_cfg must be True, False or None, got {self.batched_cfg!r}")
        pairs = () if self.heads is None else self.heads
        whole: tuple[int, ...] = ()
        if self.layers is not None:
            whole = self.layers = tuple(self.layers)
        self._file_model: dict = {}
        if self.heads_file is not None:
            if not isinstance(self.heads_file, str) or not self.heads_file.strip():
                raise TypeError(f"SoftPAG.heads_file must be a path to a HeadHunter JSON, got {self.heads_file!r}")
            file_pairs, self._file_model = load_heads_file(self.heads_file)
            pairs = pairs + file_pairs
        if not pairs and not whole:
            raise ValueError(
                "SoftPAG needs the heads to perturb: heads=((layer, head), ...), layers=(layer, ...) or "
                "heads_file=<HeadHunter result JSON> (attnplug headhunt)"
            )
        self._pairs = frozenset(pairs)
        self._whole = frozenset(whole)
        self._mixes: dict = {}  # (layer, heads, head_offset) -> OutputMix | None (device tensors cached inside)

    # -- selection ---------------------------------------------------------------------------------------
    def selected(self, layer: int, heads: int) -> list[int]:
        """Global head indices of `layer` (which has `heads` heads) that are perturbed."""
        if layer in self._whole:
            return list(range(heads))
        return sorted(h for (lay, h) in self._pairs if lay == layer and h < heads)

    def _mix(self, ctx: AttnContext) -> Any:
        key = (ctx.layer, ctx.heads, ctx.head_offset)
        if key not in self._mixes:
            total = ctx.head_offset + ctx.heads
            chosen = [h - ctx.head_offset for h in self.selected(ctx.layer, total) if h >= ctx.head_offset]
            if chosen:
                u = torch.zeros(ctx.heads, dtype=torch.float32)
                u[chosen] = self.u
                self._mixes[key] = OutputMix(u)
            else:
                self._mixes[key] = None
        return self._mixes[key]

    def check_apply(self, family: str, modules: list, variants: tuple) -> None:
        n = len(modules)
        span = f"{family} has {n} hooked attention layers, 0 = {modules[0][0]} ... {n - 1} = {modules[-1][0]}"
        fm = self._file_model
        if fm:
            want = (fm.get("family"), fm.get("heads"))
            have = (family, [int(getattr(m, "heads", 0)) for _, m in modules])
            if want != have:
                raise ValueError(
                    f"SoftPAG.heads_file {self.heads_file!r} was searched on a {want[0]!r} model with "
                    f"{len(want[1] or ())} attention layers; this model is {family!r} with {n} layers "
                    "(or other head counts): search again on this model"
                )
        for i, layer in enumerate(self.layers or ()):
            if layer >= n:
                raise ValueError(f"SoftPAG.layers[{i}] = {layer}: layer must be in [0, {n - 1}] ({span})")
        for layer, head in sorted(self._pairs):
            if layer >= n:
                raise ValueError(
                    f"SoftPAG heads ({layer}, {head}): layer must be in [0, {n - 1}] ({span})"
                )  # fmt: skip
            heads = int(getattr(modules[layer][1], "heads", 0))
            if head >= heads:
                raise ValueError(
                    f"SoftPAG heads ({layer}, {head}): head must be in [0, {heads - 1}] "
                    f"(layer {layer} = {modules[layer][0]} has {heads} heads)"
                )

    # -- schedule ----------------------------------------------------------------------------------------
    def active(self, step: int, num_steps: int | None) -> bool:
        """Whether the perturbation applies at denoising step `step` of `num_steps`."""
        if self.steps is not None:
            return step in self.steps
        if self.start == 0.0 and self.stop == 1.0:
            return True
        if num_steps is None:
            return False
        return int(self.start * num_steps) <= step < int(self.stop * num_steps)

    def _first_active(self, num_steps: int | None) -> int | None:
        if self.steps is not None:
            return self.steps[0] if self.steps else None
        n = num_steps if num_steps is not None else 1
        lo = 0 if self.start == 0.0 else int(self.start * n)
        return lo if self.active(lo, num_steps) else None

    def missing_num_steps(self, num_steps: int | None) -> str | None:
        if self.mode == "guider":  # the guider's schedule decides
            return None
        if num_steps is None and self.steps is None and (self.start, self.stop) != (0.0, 1.0):
            return (
                f"SoftPAG(start={self.start}, stop={self.stop}) counts in fractions of the denoising steps, but the "
                "number of steps is unknown: pass apply(..., num_steps=N), run a diffusers pipeline, or give "
                "steps=(...)"
            )
        return None

    def phase_steps(self, family: str, num_steps: int | None = None) -> tuple[int, ...]:
        first = self._first_active(num_steps)
        return tuple(sorted({0} | ({first} if first is not None else set())))

    def inactive_reason(self, family: str, num_steps: int | None, num_layers: int) -> str | None:
        if self.mode == "guider":
            return None
        if self.scale == 0:
            return "SoftPAG.scale=0 adds no guidance (no perturbed pass runs)"
        if self.u == 0:
            return "SoftPAG.u=0 leaves attention unchanged (no perturbed pass runs)"
        if num_steps is not None and not any(self.active(s, num_steps) for s in range(num_steps)):
            return (
                f"SoftPAG's schedule (start={self.start}, stop={self.stop}, steps={self.steps}) covers none of the "
                f"{num_steps} steps"
            )
        return None

    # -- per call ----------------------------------------------------------------------------------------
    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        if not ctx.perturbed:
            return plan
        mix = self._mix(ctx)
        if mix is not None:
            plan.modifiers = (*plan.modifiers, mix)
        return plan

    def model_hook(self, runtime: Any) -> Any:
        return SoftPAGHook(self, runtime) if self.mode == "hook" else None

    def cache_conflict(self, caches: dict[str, bool]) -> str | None:
        """diffusers caches that would serve the perturbed pass the conditional pass's attention: those with one
        state per module (PyramidAttentionBroadcast, FasterCache). Caches with per-context state (FirstBlockCache,
        MagCache, TaylorSeer, ...) cooperate: the perturbed pass runs in its own cache context."""
        shared = sorted(c for c, per_context in caches.items() if not per_context)
        if not shared or self.scale == 0 or self.u == 0:
            return None
        return (
            f"its perturbed pass would be served the cached attention of the conditional pass ({', '.join(shared)} "
            "keeps one cache per attention module, not per branch), so the guidance would silently do nothing or "
            "mix batches; caches with per-context state (FirstBlockCache, MagCache, TaylorSeerCache) work"
        )


# -- the transformer hook -----------------------------------------------------------------------------------
def _sample(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample  # diffusers' Transformer2DModelOutput


def _with_sample(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    out.sample = new  # BaseOutput keeps its dict entry in sync
    return out


_PARAMS: dict[type, list[str]] = {}


def _param_names(model: Any) -> list[str]:
    cls = type(model)
    if cls not in _PARAMS:
        _PARAMS[cls] = list(inspect.signature(cls.forward).parameters)[1:]
    return _PARAMS[cls]


def _second_half(value: Any, total: int) -> Any:
    """The conditional half of a batched-CFG value: tensors (also inside dicts / lists) whose dim 0 is `total`."""
    if isinstance(value, torch.Tensor):
        return value[total // 2 :] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, dict):
        return {k: v if k in _NO_BATCH else _second_half(v, total) for k, v in value.items()}
    if isinstance(value, list):
        return [_second_half(v, total) for v in value]
    return value


def _cond_inputs(model: Any, args: tuple, kwargs: dict, total: int) -> tuple[tuple, dict]:
    names = _param_names(model)
    a = tuple(v if (i < len(names) and names[i] in _NO_BATCH) else _second_half(v, total) for i, v in enumerate(args))
    kw = {k: v if k in _NO_BATCH else _second_half(v, total) for k, v in kwargs.items()}
    return a, kw


def _cache_context(module: Any, branch: str | None) -> Any:
    """The pipeline's current diffusers CacheContext when a cache with per-context state is enabled (the
    perturbed pass then runs in a copy named "<branch>:perturbed"), else None."""
    if branch is None or torch.compiler.is_compiling():
        return None
    if not find_caches(module):
        return None
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.hooks.get(HOOK_NAME) if registry is not None else None
    context = getattr(getattr(hook, "branches", None), "_context", None)
    return context if dataclasses.is_dataclass(context) else None


def _set_cache_context(module: Any, context: Any) -> None:
    from diffusers.hooks.hooks import _set_cache_context as set_context

    set_context(module, context)


_COND = ("cond", "pred_cond")
_UNCOND = ("uncond", "pred_uncond")


class SoftPAGHook(ModelHook):
    """After the conditional forward: SoftPAG's perturbed pass, then every prediction of the step shifted by
    scale * (eps_c - eps_pert) (module docstring)."""

    def __init__(self, variant: SoftPAG, runtime: Any) -> None:
        super().__init__()
        self.variant = variant
        self.runtime = runtime
        self._delta: tuple | None = None  # ((generation, step), scale * (eps_c - eps_pert))
        self._cfg: tuple | None = None  # (generation, batched?) read from the pipeline

    def _batched(self, branch: str | None, generation: int) -> bool:
        v = self.variant
        if v.batched_cfg is not None:
            return v.batched_cfg
        if self._cfg is not None and self._cfg[0] == generation:
            return self._cfg[1]
        pipe = self.runtime.clock.pipe
        flag = branch == "cond_uncond"
        if pipe is not None and isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
            flag = bool(pipe.do_classifier_free_guidance)
        elif pipe is not None and branch == "cond_uncond":
            gs = getattr(pipe, "_guidance_scale", None)  # CogVideoX: the call's scale at its first forward
            if isinstance(gs, (int, float)) and not isinstance(gs, bool):
                flag = gs > 1
        self._cfg = (generation, flag)
        return flag

    def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        inner = self.fn_ref.original_forward
        out = inner(*args, **kwargs)
        rt, v = self.runtime, self.variant
        clock = rt.clock
        if rt.perturbed or v.scale == 0 or v.u == 0 or not v.active(clock.step, clock.num_steps):
            return out
        key = (clock.generation, clock.step)
        branch = rt.branch
        have = self._delta is not None and self._delta[0] == key
        sample = _sample(out)
        if branch in _UNCOND or (branch not in _COND and have):  # another prediction of this step
            if not have:
                raise RuntimeError(
                    f"attnplug SoftPAG: the {branch!r} prediction of step {clock.step} came before the conditional "
                    "one; SoftPAG's hook needs the conditional call first (diffusers' pipelines do so), or use "
                    "diffusion_attn.guidance.SoftPAGGuidance"
                )
            d = self._delta[1]
            if d.shape[0] != sample.shape[0]:
                if sample.shape[0] != 2 * d.shape[0]:
                    raise RuntimeError(
                        f"attnplug SoftPAG: a prediction of batch {sample.shape[0]} at step {clock.step} does not "
                        f"match the conditional batch {d.shape[0]}"
                    )
                d = torch.cat([d, d])
            return _with_sample(out, sample + d)
        batched = branch not in _COND and self._batched(branch, clock.generation)
        total = sample.shape[0]
        if batched and total % 2:
            raise RuntimeError(
                f"attnplug SoftPAG: a batched-CFG call needs an even batch [uncond, cond], got {total}; "
                "pass SoftPAG(batched_cfg=False) if this call has no unconditional half"
            )
        c_args, c_kwargs = _cond_inputs(module, args, kwargs, total) if batched else (args, kwargs)
        rt.perturbed = True
        context = _cache_context(module, branch)
        try:
            if context is not None:  # per-context caches (FirstBlockCache, ...): the pass keeps its own state
                _set_cache_context(module, dataclasses.replace(context, name=f"{branch}:perturbed"))
            pert = _sample(inner(*c_args, **c_kwargs))
        finally:
            rt.perturbed = False
            if context is not None:
                _set_cache_context(module, context)
        eps_c = sample[total // 2 :] if batched else sample
        d = v.scale * (eps_c - pert)
        self._delta = (key, d)
        return _with_sample(out, sample + (torch.cat([d, d]) if batched else d))

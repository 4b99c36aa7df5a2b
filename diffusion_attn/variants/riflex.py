"""RIFLEx (thu-ml/DiT-Extrapolation, UltraViCo's baseline): reduce the intrinsic temporal RoPE frequency so that
one period covers the extrapolated video.

The temporal RoPE axis has frequencies theta_j = base^(-2j / d_t). Its intrinsic component k (1-based; Wan
6, HunyuanVideo 4, CogVideoX 2, the official values) has the period N_k = round(2 pi / theta_{k-1}) that
makes content repeat past it; RIFLEx sets theta_{k-1} = factor * 2 pi / L for a video of L token frames
(factor 0.9, official), training-free, when L > N_k (`always=True`: at every length). Only that pair of
rotary columns changes; every other frequency is the model's own, bit for bit.

Where the RoPE lives is a fact of the family, read from its adapter (`rope_site`, `temporal_rope`,
`rope_frames`); no other attention change (the plan stays the model's own):
* `rope_site = "module"` (Wan, HunyuanVideo): a diffusers hook on the transformer's `rope` module rewrites the
  two temporal columns of its output;
* otherwise the site is a forward argument (CogVideoX's `image_rotary_emb`): a hook on the transformer
  rewrites its two temporal columns on the adapter's temporal grid (diffusers' own).
Rotary outputs are [.., N, .., D] with temporal columns first and each frequency repeated twice, tokens in
frame-major order. The new columns are computed once per (frames, tokens per frame, device) and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook

from attn_spec import Range

from ..registry import ADAPTERS
from .base import AttnContext, AttnPlan, FamiliesWhere, Variant, check_options, register_variant

__all__ = ["RIFLEx", "rope_axis"]


def _rope_adapter(family: str) -> Any:
    """The adapter class of `family`, which knows where its temporal RoPE lives; ValueError when it knows none."""
    adapter = ADAPTERS.get(family)
    if adapter is None or getattr(adapter, "temporal_rope", None) is None:
        known = [n for n, a in ADAPTERS.items() if getattr(a, "temporal_rope", None) is not None]
        raise ValueError(f"RIFLEx supports {', '.join(known)} (a temporal RoPE); got model family {family!r}")
    return adapter


def rope_axis(family: str, model: Any) -> tuple[int, float, torch.dtype]:
    """(temporal rotary dim d_t, base theta, dtype diffusers computes the frequencies in) of `model`, as its
    family's adapter reads them (`temporal_rope`)."""
    return _rope_adapter(family).temporal_rope(model)


@register_variant
@dataclass
class RIFLEx(Variant):
    """One intrinsic temporal RoPE frequency set to factor * 2 pi / L (L: the video's token frames).

    k: 1-based index of the intrinsic frequency (None: the family's, Wan 6 / HunyuanVideo 4 / CogVideoX 2);
    factor: in (0, 1] (official 0.9); frames: L (None: the generation's token frames); always: also when the
    video is not longer than the intrinsic period N_k (default: only beyond it, as the official code).
    """

    name: ClassVar[str] = "riflex"
    role: ClassVar[str] = "modifier"
    # the families whose adapter declares a temporal RoPE; their official k is the adapters'
    # official_defaults["riflex"] (a family without one must be given k=)
    families: ClassVar[tuple[str, ...] | None] = FamiliesWhere(
        lambda a: getattr(a, "temporal_rope", None) is not None, "temporal RoPE"
    )

    k: Annotated[int | None, Range(1, None, words=True, note="(1-based frequency index)")] = None
    factor: Annotated[float, Range(0, 1, lo_open=True, words=True)] = 0.9
    frames: Annotated[int | None, Range(1, None, words=True)] = None
    always: bool = False

    def __post_init__(self) -> None:
        check_options(self)  # the ranges declared on the fields above
        if not isinstance(self.always, bool):
            raise TypeError(f"RIFLEx.always must be True or False, got {self.always!r}")

    def resolved(self, family: str) -> dict[str, Any]:
        return self.family_values(family)

    def period(self, d_t: int, theta: float, family: str) -> int:
        """N_k: the intrinsic frequency's period in frames (RIFLEx's identify_k)."""
        k = self.resolved(family)["k"]
        return round(2 * math.pi / (1.0 / theta ** (2 * (k - 1) / d_t)))

    def check_apply(self, family: str, modules: list, variants: tuple) -> None:
        pass  # needs the model: checked in model_hook (before any forward, still inside apply's validation)

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        return plan  # RoPE only: the attention itself is the model's

    def model_hook(self, runtime: Any) -> Any:
        return RIFLExHook(self, runtime)

    def columns(
        self, frames: int, per_frame: int, d_t: int, theta: float, dtype: torch.dtype, family: str, grid: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) [frames * per_frame, 2] float32 of the replaced frequency, or None when RIFLEx does not apply."""
        length = self.frames if self.frames is not None else frames
        if not self.always and length <= self.period(d_t, theta, family):
            return None
        omega = torch.tensor(self.factor * 2 * math.pi / length, dtype=dtype)
        pos = torch.arange(frames, dtype=dtype) if grid is None else grid.to(dtype)
        ang = pos * omega
        cos, sin = ang.cos().float(), ang.sin().float()
        cos = cos.repeat_interleave(per_frame)[:, None].expand(-1, 2)
        sin = sin.repeat_interleave(per_frame)[:, None].expand(-1, 2)
        return cos.contiguous(), sin.contiguous()


def _replace(freqs: torch.Tensor, cols: torch.Tensor, col: int) -> torch.Tensor:
    """`freqs` ([N, D], or Wan's [1, N, 1, D]) with columns col, col + 1 replaced by `cols` [N, 2]."""
    out = freqs.clone()
    out.view(-1, out.shape[-1])[:, col : col + 2] = cols.to(out.device, out.dtype)
    return out


class RopeHook(ModelHook):
    """On the transformer's `rope` module (an adapter with `rope_site = "module"`): rewrite the intrinsic temporal
    columns of its output."""

    def __init__(self, owner: Any) -> None:
        super().__init__()
        self.owner = owner
        self._shape: tuple | None = None

    def pre_forward(self, module, *args, **kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        self._shape = tuple(hs.shape)
        return args, kwargs

    def post_forward(self, module, output):
        o = self.owner
        frames, per_frame, grid = o.adapter.rope_frames(module, self._shape)
        cols = o.cols(frames, per_frame, output[0].device, grid)
        if cols is None:
            return output
        return tuple(_replace(x, c, o.col) for x, c in zip(output, cols))


class RIFLExHook(ModelHook):
    """On the transformer: owns the rope-module hook, or rewrites the RoPE forward argument, as the family's
    adapter says (`rope_site`)."""

    def __init__(self, variant: RIFLEx, runtime: Any) -> None:
        super().__init__()
        self.variant, self.runtime = variant, runtime
        self.family = runtime.family
        self.adapter = _rope_adapter(self.family)
        self._cache: dict = {}
        self.col = 0

    def initialize_hook(self, module):
        v = self.variant
        self.d_t, self.theta, self.dtype = rope_axis(self.family, module)
        k = v.resolved(self.family)["k"]
        if not 1 <= k <= self.d_t // 2:
            raise ValueError(
                f"RIFLEx.k must be in [1, {self.d_t // 2}] ({self.family}'s temporal RoPE has {self.d_t // 2} "
                f"frequencies), got {k}"
            )
        self.col = 2 * (k - 1)
        if self.adapter.rope_site == "module":
            HookRegistry.check_if_exists_or_initialize(module.rope).register_hook(RopeHook(self), "attnplug_riflex")
        return module

    def deinitalize_hook(self, module):
        if self.adapter.rope_site == "module":
            registry = getattr(module.rope, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook("attnplug_riflex", recurse=False)
                if not registry.hooks:
                    del module.rope._diffusers_hook
                    fwd = module.rope.__dict__.get("forward")
                    if getattr(fwd, "__func__", None) is type(module.rope).forward:
                        del module.rope.__dict__["forward"]
        return module

    def cols(self, frames: int, per_frame: int, device: torch.device, grid: Any = None) -> Any:
        key = (frames, per_frame, str(device))
        if key not in self._cache:
            c = self.variant.columns(frames, per_frame, self.d_t, self.theta, self.dtype, self.family, grid)
            self._cache[key] = None if c is None else tuple(t.to(device) for t in c)
        return self._cache[key]

    def pre_forward(self, module, *args, **kwargs):
        site = self.adapter.rope_site
        if site == "module":
            return args, kwargs
        emb = self.adapter.forward_arg(module, args, kwargs, site)
        if emb is None:
            return args, kwargs
        hs = self.adapter.forward_arg(module, args, kwargs, "hidden_states")
        frames, per_frame, grid = self.adapter.rope_frames(module, tuple(hs.shape))
        cols = self.cols(frames, per_frame, emb[0].device, grid)
        if cols is None:
            return args, kwargs
        new = tuple(_replace(x, c, self.col) for x, c in zip(emb, cols))
        if site in kwargs:
            kwargs = {**kwargs, site: new}
        else:
            i = self.adapter._params[type(module)][site]
            args = (*args[:i], new, *args[i + 1 :])
        return args, kwargs

"""What every adapter shares: the per-handle runtime (step, grid, variant states), the base
attention processor that executes an `AttnPlan`, and the adapter registry.

An adapter knows one model family: which attention modules to hook, how to read the token
grid from the transformer's forward arguments, and a processor that computes q, k, v exactly
as the model's own processor does before handing them to `AttnRuntime.attend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..variants.base import AttnContext, AttnPlan, TokenLayout, Variant

__all__ = ["ADAPTERS", "Adapter", "AttnRuntime", "SparseProcessor", "STEP_SOURCES", "find_adapter", "register_adapter"]

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter to `ADAPTERS` under its `name`."""
    ADAPTERS[cls.name] = cls
    return cls


STEP_SOURCES = ("hook", "callback")


@dataclass
class AttnRuntime:
    """Mutable state shared by the step hook and the processors of one `apply` handle.

    Per transformer forward the step hook calls `begin_forward` (clears the per-forward caches),
    sets `grid` (from shapes) and, with `step_source="hook"`, `observe_timestep` (one host read of
    the timestep). With `step_source="callback"` the step is set by `handle.set_step` and the
    forward reads no tensor value on the host.

    Per attention call (`attend`): the variants' plans (dict lookups of cached layouts / perms
    for Radial and GNA; device ops for LiteAttention), then the kernel. What is cached where:
    layouts and (perm, inverse) per (token layout, device) in the variants; the key-padding mask
    (HunyuanVideo's text padding) is resolved once per forward: its "all valid?" check and the
    key-masked layouts are computed at the first layer and reused by the others, and across
    forwards while the mask's contents are unchanged (one comparison per forward).
    """

    family: str
    variants: tuple[Variant, ...]
    num_layers: int = 0
    step: int = 0
    timestep: float | None = None
    grid: tuple[int, int, int] | None = None
    num_steps: int | None = None
    step_source: str = "hook"  # "hook" (timestep changes) or "callback" (set_step)
    kernel_backend: str = "auto"  # attn_kernels.attention backend: "auto", "triton" or "reference"
    states: dict = field(default_factory=dict)
    calls: int = 0  # attention calls that went through a variant plan (for tests / stats)
    _layouts: dict = field(default_factory=dict, repr=False)  # TokenLayout per (grid, text_len, text_first)
    _fwd_masks: list = field(default_factory=list, repr=False)  # key masks resolved in this forward
    _fwd_sources: list = field(default_factory=list, repr=False)  # (model mask, key mask) of this forward
    _mask_entries: list = field(default_factory=list, repr=False)  # key masks seen lately (content, layouts)

    def reset(self) -> None:
        """New generation: step 0, variant states cleared (static layout caches are kept)."""
        self.step = 0
        self.timestep = None
        self.states.clear()
        for v in self.variants:
            v.reset()

    def begin_forward(self) -> None:
        """Called by the step hook at the start of every transformer forward."""
        if self._fwd_masks or self._fwd_sources:
            self._fwd_masks.clear()
            self._fwd_sources.clear()

    def observe_timestep(self, t: Any) -> None:
        """Called once per transformer forward with its timestep: advance / reset the step.

        In "hook" mode this reads the timestep on the host (`float(t)`: a device sync, and a graph
        break under torch.compile); in "callback" mode it returns without looking at `t`."""
        if self.step_source != "hook" or t is None:
            return
        val = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        if self.timestep is None:
            self.timestep = val
            return
        if val == self.timestep:  # CFG: a second call at the same step
            return
        if val > self.timestep:  # timesteps only decrease within a generation
            self.reset()
            self.timestep = val
            return
        self.step += 1
        self.timestep = val

    def layout(self, text_len: int, text_first: bool) -> TokenLayout:
        """The TokenLayout of a call (one object per (grid, text_len, text_first), reused)."""
        grid = self.grid
        if grid is None:
            raise RuntimeError(
                "attnplug: the token grid is unknown: the transformer's forward was not seen by the step hook "
                "(was the attention module called outside the transformer?)"
            )
        key = (grid, text_len, text_first)
        hit = self._layouts.get(key)
        if hit is None:
            hit = self._layouts[key] = TokenLayout(
                grid=grid, text_len=text_len, text_first=text_first, family=self.family
            )
        return hit

    def plan(self, layer: int, layout: TokenLayout, q: torch.Tensor) -> AttnPlan:
        """The variants' plan for one call of `layer` on q [B, N, H, D]."""
        B, _, H, D = q.shape
        plan = AttnPlan()
        for i, var in enumerate(self.variants):
            ctx = AttnContext(
                layer=layer,
                num_layers=self.num_layers,
                step=self.step,
                timestep=self.timestep,
                layout=layout,
                batch=B,
                heads=H,
                head_dim=D,
                device=q.device,
                dtype=q.dtype,
                state=self.states.setdefault((i, layer), {}),
            )
            ctx.num_steps = self.num_steps  # type: ignore[attr-defined]
            plan = var.plan(ctx, plan)
        return plan

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layer: int,
        layout: TokenLayout,
        backend: Any = None,
        key_mask: torch.Tensor | None = None,
        dense_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of one layer. q, k, v: [B, N, H, D] (diffusers' layout); returns [B, N, H, D].

        key_mask: bool [B, N] (False = padded key); pass the same tensor object to every layer of
        a forward (see `key_mask_of`) so it is resolved once. dense_mask: the model's own mask,
        used when the plan is dense (the model's dispatch then runs exactly as without attnplug).
        """
        N = q.shape[1]
        if layout.seq_len != N or k.shape[1] != N:
            raise RuntimeError(
                f"attnplug[{self.family}]: token layout {layout} has {layout.seq_len} tokens but the attention call "
                f"has {N} queries and {k.shape[1]} keys"
            )
        plan = self.plan(layer, layout, q)
        if plan.is_dense:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            return dispatch_attention_fn(q, k, v, attn_mask=dense_mask, dropout_p=0.0, is_causal=False, backend=backend)
        from attn_kernels import attention

        self.calls += 1
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        perm, inv = plan.perm, plan.inv
        if perm is not None:
            perm = perm.to(q.device)  # no-op for the variants here (cached on the call's device)
            inv = torch.argsort(perm) if inv is None else inv.to(q.device)  # argsort: uncached inverse
            qh, kh, vh = qh[:, :, perm], kh[:, :, perm], vh[:, :, perm]
        blayout = plan.layout
        if key_mask is not None:
            blayout = self._key_masked(blayout, key_mask, perm, N, q.device)
        out = attention(
            qh, kh, vh, blayout, modifiers=plan.modifiers, tile_stats=plan.tile_stats, backend=self.kernel_backend
        )
        for cb in plan.after:
            cb(out, plan)
        if inv is not None:
            out = out[:, :, inv]
        return out.transpose(1, 2)

    # -- key-padding masks ------------------------------------------------------------------
    def key_mask_of(self, mask: torch.Tensor, derive: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`derive(mask)` (the key mask [B, N] of a model's attention mask), computed once per forward
        for each model mask object, so every layer passes the same key-mask tensor to `attend`."""
        for src, km in self._fwd_sources:
            if src is mask:
                return km
        km = derive(mask)
        self._fwd_sources.append((mask, km))
        del self._fwd_sources[:-8]
        return km

    def _mask_entry(self, key_mask: torch.Tensor) -> dict:
        """The entry of a key mask: resolved at its first use in a forward, then by identity."""
        for km, entry in self._fwd_masks:
            if km is key_mask:
                return entry
        entry = None
        for e in self._mask_entries:  # same contents as a recent forward's mask: one comparison (sync)
            if e["mask"].shape == key_mask.shape and e["mask"].device == key_mask.device:
                if torch.equal(e["mask"], key_mask):
                    entry = e
                    break
        if entry is None:
            entry = {"mask": key_mask.clone(), "all": bool(key_mask.all()), "layouts": []}
            self._mask_entries.insert(0, entry)
            del self._mask_entries[4:]
        self._fwd_masks.append((key_mask, entry))
        del self._fwd_masks[:-8]
        return entry

    def _key_masked(self, blayout: Any, key_mask: torch.Tensor, perm: Any, n: int, device: torch.device) -> Any:
        """`blayout` restricted to the valid keys of `key_mask` (cached per mask contents, layout, perm)."""
        entry = self._mask_entry(key_mask)
        if entry["all"]:
            return blayout
        for base, p, masked in entry["layouts"]:
            if base is blayout and p is perm:
                return masked
        from attn_kernels import BlockLayout

        km = entry["mask"] if perm is None else entry["mask"][:, perm]
        base_layout = BlockLayout.dense(n, n, device=device) if blayout is None else blayout
        masked = base_layout.with_key_mask(km)
        entry["layouts"].append((blayout, perm, masked))
        del entry["layouts"][:-8]  # per-call layouts (LiteAttention) must not pile up
        return masked


class SparseProcessor:
    """Base of the adapters' processors: keeps the original processor and its backend choice."""

    def __init__(self, runtime: AttnRuntime, layer: int, original: Any) -> None:
        self.runtime = runtime
        self.layer = layer
        self.original = original
        # keep the user's `set_attention_backend` choice for dense calls
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def attend(self, q, k, v, *, text_len: int, text_first: bool, key_mask=None, dense_mask=None) -> torch.Tensor:
        layout = self.runtime.layout(text_len, text_first)
        return self.runtime.attend(
            q,
            k,
            v,
            layer=self.layer,
            layout=layout,
            backend=self._attention_backend,
            key_mask=key_mask,
            dense_mask=dense_mask,
        )


class Adapter:
    """One model family: which modules to hook and how to read the token grid."""

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    processor_cls: ClassVar[type[SparseProcessor]] = SparseProcessor

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, attention module) of every hooked layer, in execution order."""
        raise NotImplementedError

    def grid(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(frames, height, width) of visual tokens from the transformer's forward arguments."""
        raise NotImplementedError

    @staticmethod
    def timestep(args: tuple, kwargs: dict, position: int = 2) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[position] if len(args) > position else None

    def make_processor(self, runtime: AttnRuntime, layer: int, module: nn.Module) -> SparseProcessor:
        return self.processor_cls(runtime, layer, module.processor)


def hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hs, torch.Tensor):
        raise RuntimeError("attnplug: the transformer was called without a hidden_states tensor")
    return hs


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`'s class, or a ValueError listing the supported families."""
    from . import cogvideox, flux, hunyuan_video, ltx_video, sd3, wan  # noqa: F401  (register)

    for cls in ADAPTERS.values():
        if cls.matches(model):
            return cls()
    supported = ", ".join(f"{n} ({', '.join(c.model_classes)})" for n, c in ADAPTERS.items())
    raise ValueError(f"attnplug has no adapter for {type(model).__name__}; supported model families: {supported}")


ProcessorFactory = Callable[[AttnRuntime, int, Any], SparseProcessor]

"""Context parallelism (diffusers' `ContextParallelConfig`) for attnplug's sparse plans.

Owns the dispatch of a sparse plan when each rank holds a shard of the sequence: Ulysses (the kernel
runs inside diffusers' all-to-all on the whole sequence and this rank's heads), ring and Ulysses x ring
(every ring rank's key chunk through the kernel, merged by log-sum-exp: `runtime.ring`), and the
token order after the all-to-all (`GatherOrder`: canonical -> gathered index composed with a variant's
permutation, and the ring's host-built per-rank plans, all cached).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_dispatch import SeqAllToAllDim, TemplatedUlyssesAttention

from ..variants.base import AttnPlan, TokenLayout
from .layouts import LayoutCache
from .ring import build_ring_plan, ring_attention

if TYPE_CHECKING:  # annotations only
    from .attn_runtime import AttnRuntime

__all__ = ["GatherOrder", "canonical_to_gathered", "run_ring", "run_ulysses"]


def canonical_to_gathered(layout: TokenLayout, degree: int, device: torch.device) -> torch.Tensor | None:
    """Canonical -> gathered token index after Ulysses' all-to-all (None when they agree).

    Each rank holds an equal shard of every part of its local sequence ([text, visual] when
    text comes first, else [visual, text]); the all-to-all concatenates the ranks' sequences."""
    t, nv = layout.text_len, layout.num_visual
    if t == 0:
        return None
    parts = [("text", t), ("visual", nv)] if layout.text_first else [("visual", nv), ("text", t)]
    start = {"text": layout.text_slice.start, "visual": layout.visual_slice.start}
    g2c = []
    for r in range(degree):
        for name, size in parts:
            chunk = size // degree
            g2c.append(torch.arange(start[name] + r * chunk, start[name] + (r + 1) * chunk))
    return torch.argsort(torch.cat(g2c)).to(device)


class GatherOrder:
    """Token orders on the gathered sequence and the ring's per-rank plans, cached (no per-call host work)."""

    def __init__(self, layouts: LayoutCache) -> None:
        self.layouts = layouts
        self._perms: list = []  # (gather key, variant perm, combined, combined inverse)
        self.ring_plans: list = []  # (scalars, leaves, ring plan)

    def c2g(self, layout: TokenLayout, degree: int, device: torch.device) -> torch.Tensor | None:
        """`canonical_to_gathered`, built once per (layout, degree, device)."""
        return self.layouts.memo(
            ("c2g", layout, degree, str(device)), lambda: canonical_to_gathered(layout, degree, device)
        )

    def composed(self, gather: tuple, perm: Any, inv: Any) -> tuple[Any, Any]:
        """perm on the gathered sequence: the variant's perm of the canonical order, mapped through
        canonical -> gathered positions (cached per (gather key, perm object))."""
        gkey, c2g = gather
        if c2g is None:
            return perm, inv
        for key, p, combined, combined_inv in self._perms:
            if key == gkey and p is perm:
                return combined, combined_inv
        combined = c2g if perm is None else c2g[perm]
        combined_inv = torch.argsort(combined)
        self._perms.append((gkey, perm, combined, combined_inv))
        del self._perms[:-8]
        return combined, combined_inv


def _no_key_mask(rt: AttnRuntime, key_mask: torch.Tensor | None) -> None:
    if key_mask is not None:
        raise RuntimeError(
            f"attnplug[{rt.family}]: key-padding masks are not supported with context parallelism "
            "(diffusers has no context-parallel plan for this model family)"
        )


def _check_even(rt: AttnRuntime, layout: TokenLayout, world: int, what: str) -> None:
    for name, size in (("text", layout.text_len), ("visual", layout.num_visual)):
        if size % world:
            raise RuntimeError(f"attnplug[{rt.family}]: the {size} {name} tokens cannot be split evenly over {what}")


def run_ulysses(
    rt: AttnRuntime,
    plan: AttnPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    key_mask: torch.Tensor | None,
    parallel_config: Any,
) -> torch.Tensor:
    """Ulysses: the kernel (`rt._kernel`) inside diffusers' `TemplatedUlyssesAttention` (forward and backward)."""
    cp = parallel_config.context_parallel_config
    degree = cp.ulysses_degree
    n_local = q.shape[1]
    _no_key_mask(rt, key_mask)
    if n_local * degree != layout.seq_len or k.shape[1] != n_local:
        raise RuntimeError(
            f"attnplug[{rt.family}]: with ulysses_degree={degree} each rank must hold 1/{degree} of the "
            f"{layout.seq_len} tokens of {layout}, got {n_local} queries and {k.shape[1]} keys"
        )
    _check_even(rt, layout, degree, f"ulysses_degree={degree}")
    gather = ((layout, degree, str(q.device)), rt.parallel.c2g(layout, degree, q.device))

    def forward_op(
        ctx,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _save_ctx=True,
        _parallel_config=None,
    ):
        if return_lse:
            raise RuntimeError("attnplug: ring attention (LSE) is not supported for sparse variants")
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
        return rt._kernel(plan, query, key, value, None, gather)

    def backward_op(ctx, grad_out, *args, **kwargs):
        query, key, value = ctx.saved_tensors
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_(True) for t in (query, key, value)]
            out = rt._kernel(plan, *qkv, None, gather, run_after=False)
            return torch.autograd.grad(out, qkv, grad_out)

    return TemplatedUlyssesAttention.apply(
        q, k, v, None, 0.0, False, None, False, False, forward_op, backward_op, parallel_config
    )


def run_ring(
    rt: AttnRuntime,
    plan: AttnPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    key_mask: torch.Tensor | None,
    parallel_config: Any,
) -> torch.Tensor:
    """Ring (and Ulysses x ring): Ulysses' all-to-all inside each Ulysses group when ulysses_degree > 1,
    then every ring rank's key chunk through the kernel, merged by log-sum-exp (`runtime.ring`)."""
    cp = parallel_config.context_parallel_config
    ring, uly = cp.ring_degree, cp.ulysses_degree
    world = ring * uly
    _no_key_mask(rt, key_mask)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            f"attnplug[{rt.family}]: ring attention with sparse variants is inference only (no backward); "
            "train with ContextParallelConfig(ulysses_degree=N) or data parallelism"
        )
    if plan.after and plan.tile_stats is None:
        raise RuntimeError(f"attnplug[{rt.family}]: plans with `after` callbacks are not supported under ring")
    n_local = q.shape[1]
    if n_local * world != layout.seq_len or k.shape[1] != n_local:
        raise RuntimeError(
            f"attnplug[{rt.family}]: with ring_degree={ring} x ulysses_degree={uly} each rank must hold "
            f"1/{world} of the {layout.seq_len} tokens of {layout}, got {n_local} queries and {k.shape[1]} keys"
        )
    _check_even(rt, layout, world, f"ring_degree x ulysses_degree = {world}")
    rt.calls += 1
    perm, inv = plan.perm, plan.inv
    if perm is not None:
        perm = perm.to(q.device)
        inv = torch.argsort(perm) if inv is None else inv.to(q.device)
    order = rt.parallel
    gather = ((layout, world, str(q.device)), order.c2g(layout, world, q.device))
    combined, combined_inv = order.composed(gather, perm, inv)
    rank = cp._ring_local_rank
    leaves = [plan.layout, *plan.modifiers]
    for lay, mods in plan.extra:
        leaves += [lay, *mods]
    scalars = (plan.tile_stats is None, ring, rank, len(plan.modifiers), len(plan.extra), str(q.device))
    leaves.append(combined)
    rplan = None
    for sc, lv, hit in order.ring_plans:  # cached per (scalars, objects by identity): no per-call host work
        if sc == scalars and len(lv) == len(leaves) and all(a is b for a, b in zip(lv, leaves)):
            rplan = hit
            break
    if rplan is None:
        rplan = build_ring_plan(plan, layout.seq_len, combined_inv, ring, rank, q.device)
        order.ring_plans.append((scalars, leaves, rplan))
        del order.ring_plans[:-16]
    group = cp._ulysses_mesh.get_group() if uly > 1 else None
    if group is not None:
        q, k, v = (SeqAllToAllDim.apply(group, t, 2, 1) for t in (q, k, v))  # sequence gathered, heads split
    out = ring_attention(rt, plan, q, k, v, rplan, cp, combined)
    if group is not None:
        out = SeqAllToAllDim.apply(group, out, 1, 2)
    return out

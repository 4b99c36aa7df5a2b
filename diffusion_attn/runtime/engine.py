"""The kernel call of a sparse plan: one `attn_kernels.attention` launch per plan (plus `plan.extra`'s).

Owns the steps between a plan and the kernel on one process's whole sequence: heads-first transposes,
the variant's token permutation (composed with context parallelism's gather order when given), a
variant's own computation (`plan.compute`), key-padding restriction of the layout, `plan.extra`'s passes
merged by log-sum-exp, the `after` callbacks, and the inverse permutation. Device ops only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

import attn_kernels  # called as attn_kernels.attention: patching the package attribute reaches every call

from ..variants.base import AttnPlan

if TYPE_CHECKING:  # annotations only
    from .attn_runtime import AttnRuntime

__all__ = ["merge_extra", "run_kernel"]


def run_kernel(
    rt: AttnRuntime,
    plan: AttnPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    gather: tuple | None,
    *,
    run_after: bool = True,
) -> torch.Tensor:
    """The kernel on [B, N, H, D] inputs; `gather` = (key, canonical -> gathered index) under Ulysses.

    Uses `rt.kernel_backend`, `rt.key_masks`, `rt.parallel` (the gather order) and counts `rt.calls`."""
    rt.calls += 1
    n = q.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    perm, inv = plan.perm, plan.inv
    if perm is not None:
        perm = perm.to(q.device)  # no-op for the variants here (cached on the call's device)
        inv = torch.argsort(perm) if inv is None else inv.to(q.device)  # argsort: uncached inverse
    if gather is not None:
        perm, inv = rt.parallel.composed(gather, perm, inv)
    if perm is not None:
        qh, kh, vh = qh[:, :, perm], kh[:, :, perm], vh[:, :, perm]
    if plan.compute is not None:  # a variant's own computation replaces the kernel call (AgentSD, Boundary)
        if key_mask is not None:
            raise RuntimeError(f"attnplug[{rt.family}]: key-padding masks are not supported with plan.compute")
        out = plan.compute(qh, kh, vh, rt.kernel_backend)
        return (out if inv is None else out[:, :, inv]).transpose(1, 2)
    blayout = plan.layout
    if key_mask is not None:
        blayout = rt.key_masks.restrict(blayout, key_mask, perm, n, q.device)
    out = attn_kernels.attention(
        qh,
        kh,
        vh,
        blayout,
        modifiers=plan.modifiers,
        tile_stats=plan.tile_stats if run_after else None,
        backend=rt.kernel_backend,
        return_lse=bool(plan.extra),
    )
    if plan.extra:
        out = merge_extra(rt, plan, out, qh, kh, vh, key_mask, perm, n)
    if run_after:
        for cb in plan.after:
            cb(out, plan)
    if inv is not None:
        out = out[:, :, inv]
    return out.transpose(1, 2)


def merge_extra(
    rt: AttnRuntime,
    plan: AttnPlan,
    main: tuple[torch.Tensor, torch.Tensor],
    qh: torch.Tensor,
    kh: torch.Tensor,
    vh: torch.Tensor,
    key_mask: torch.Tensor | None,
    perm: Any,
    n: int,
) -> torch.Tensor:
    """The main pass and `plan.extra`'s passes (disjoint pairs) merged by log-sum-exp: exactly the softmax
    over the union of their pairs (device ops only)."""
    out, lse = main
    acc = out.float()
    for lay, mods in plan.extra:
        if key_mask is not None:
            lay = rt.key_masks.restrict(lay, key_mask, perm, n, qh.device)
        o2, l2 = attn_kernels.attention(qh, kh, vh, lay, modifiers=mods, backend=rt.kernel_backend, return_lse=True)
        m = torch.maximum(lse, l2)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows without any key: weights 0
        w1, w2 = torch.exp(lse - m), torch.exp(l2 - m)
        tot = w1 + w2
        acc = (acc * w1[..., None] + o2.float() * w2[..., None]) / tot.clamp_min(torch.finfo(tot.dtype).tiny)[..., None]
        lse = m + torch.log(tot)
    return acc.to(out.dtype)

"""Ring context parallelism (diffusers' `ContextParallelConfig(ring_degree=N)`, also Ulysses x ring) for
attnplug's sparse plans.

Each rank holds an equal shard of the sequence. Under ring attention the rank keeps its queries and
visits every rank's key chunk: one all-gather of (k, v) over the ring group per attention call (the
communication diffusers' own `TemplatedRingAttention` does, identical on every rank whatever the
layout), then, chunk by chunk, the kernel on (this rank's queries, chunk j's keys) with its log-sum-exp,
merged into the exact softmax over the union (`lse_merge`). A chunk whose sub-layout has no visible
pair is skipped (no kernel call; the collective is unchanged, so no rank can wait on another).

The plan describes the whole sequence in the variant's permuted order. The rank's queries and chunk
j's keys are sets of positions of that order; each is sorted (a local permutation of the shard) so the
sub-layout is the plan's layout restricted to those rows and columns, built once on the host per
(layout, permutation, degree, rank, chunk) with element masks wherever a block is cut, and cached:
the steady state is dict lookups, slicing and the kernel. `LogitDecay` positions are restricted the
same way, and `plan.extra` passes (UltraViCo's band) are merged like the chunks.

LiteAttention's tile statistics follow each row's running maximum over the whole key row in key
order, which separate chunk calls cannot reproduce; a plan with `tile_stats` therefore runs one
kernel call on the rank's queries and the all-gathered keys (the memory the all-gather already
holds), which needs the rank's queries to be whole blocks of the sequence. Inference only:
gradients through ring attention are refused (train with Ulysses or data parallelism).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed import _functional_collectives as funcol

from attn_kernels import BlockLayout, LogitDecay, OutputMix, TileStats, attention

__all__ = ["build_ring_plan", "lse_merge", "restrict_layout", "restrict_modifiers", "ring_attention", "ring_chunks"]


def lse_merge(
    acc: torch.Tensor | None, lse: torch.Tensor | None, out: torch.Tensor, out_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention over disjoint key sets: (acc [.., N, D] fp32, lse [.., N]) with (out, out_lse).

    Exactly the softmax over the union; rows that see no key in either part stay 0 with lse -inf."""
    if acc is None:
        return out.float(), out_lse
    m = torch.maximum(lse, out_lse)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows without any key so far: weights 0
    w1, w2 = torch.exp(lse - m), torch.exp(out_lse - m)
    tot = w1 + w2
    acc = (acc * w1[..., None] + out.float() * w2[..., None]) / tot.clamp_min(torch.finfo(tot.dtype).tiny)[..., None]
    return acc, m + torch.log(tot)


def restrict_layout(layout: Any, rows: torch.Tensor, cols: torch.Tensor) -> Any:
    """`layout` (a BlockLayout, or None = dense) restricted to query positions `rows` and key positions
    `cols` (sorted int64): a BlockLayout on len(rows) x len(cols) tokens with the same blocks, batch and
    heads; element masks where a block is cut. None stays None. Host work, meant to be cached."""
    if layout is None:
        return None
    dev = layout.device
    rows, cols = rows.to(dev), cols.to(dev)
    bq, bk = layout.block_q, layout.block_k
    bm = layout.to_block_mask()
    pidx = layout.partial_index() if layout.partial is not None else None
    elem = layout.elem_mask
    Bl, Hl = layout.batch, layout.heads

    def mask_mod(b, h, qi, ki):
        gq, gk = rows[qi], cols[ki]
        bb = b if Bl > 1 else torch.zeros_like(b)
        hh = h if Hl > 1 else torch.zeros_like(h)
        qb, kb = gq // bq, gk // bk
        vis = bm[bb, hh, qb, kb]
        if pidx is not None:
            p = pidx[bb, hh, qb, kb]
            word = elem[p.clamp(min=0).long(), gq % bq, (gk % bk) // 32]
            bit = ((word >> ((gk % bk) % 32).to(word.dtype)) & 1).bool()
            vis = vis & ((p < 0) | bit)
        return vis

    return BlockLayout.from_mask_mod(
        mask_mod, rows.numel(), cols.numel(), B=Bl, H=Hl, block_q=bq, block_k=bk, device=dev
    )


def restrict_modifiers(modifiers: tuple, n_q: int, n_k: int, rows: torch.Tensor, cols: torch.Tensor) -> tuple:
    """`LogitDecay` with its positions restricted to `rows` / `cols` (of an n_q x n_k call)."""
    out = []
    for m in modifiers:
        if isinstance(m, LogitDecay):
            qp, kp = m.positions(n_q, n_k, rows.device)
            out.append(LogitDecay(m.factor, m.threshold, q_pos=qp[rows].long(), k_pos=kp[cols].long()))
        elif isinstance(m, OutputMix):
            raise RuntimeError(
                "attnplug: OutputMix (SoftPAG) is not supported with ring context parallelism; use "
                "ContextParallelConfig(ulysses_degree=N)"
            )
        else:  # pragma: no cover - attn_kernels knows no other modifier
            raise TypeError(f"attnplug: unknown modifier {type(m).__name__}")
    return tuple(out)


class _RingPlan:
    """Everything host-side of one (plan layouts, permutation, degree, rank) on one device."""

    def __init__(self, passes: list, q_order: torch.Tensor, q_inv: torch.Tensor, k_orders: list, lite: Any) -> None:
        self.passes = passes  # [[(sub-layout or None, modifiers, empty) per chunk] per pass]
        self.q_order, self.q_inv, self.k_orders = q_order, q_inv, k_orders
        self.lite = lite  # (first query block, last query block) for plans with tile statistics


def _positions(combined_inv: torch.Tensor | None, start: int, length: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(start, start + length, device=device)
    return idx if combined_inv is None else combined_inv.to(device)[idx]


def build_ring_plan(
    plan: Any, n: int, combined_inv: torch.Tensor | None, ring: int, rank: int, device: torch.device
) -> _RingPlan:
    """Host work of one ring configuration (see the module docstring); n: the whole sequence length."""
    m = n // ring
    pos = [_positions(combined_inv, j * m, m, device) for j in range(ring)]
    orders = [torch.argsort(p) for p in pos]
    sorted_pos = [p[o] for p, o in zip(pos, orders)]
    rows = sorted_pos[rank]
    lite = None
    if plan.tile_stats is not None:
        lay = plan.layout
        bq = lay.block_q
        first = int(rows[0])
        if not torch.equal(rows.cpu(), torch.arange(first, first + m)) or first % bq or (m % bq and first + m != n):
            raise RuntimeError(
                f"attnplug: LiteAttention under ring attention needs each ring rank's {m} queries to be whole "
                f"blocks of {bq} tokens of the sequence (got a shard that cuts a block); use a sequence length "
                "whose per-rank shard is a multiple of the block size, or ContextParallelConfig(ulysses_degree=N)"
            )
        if lay.partial is not None:
            raise RuntimeError("attnplug: LiteAttention layouts with element masks are not supported under ring")
        lite = (first // bq, -(-(first + m) // bq))
    passes = []
    for lay, mods in ((plan.layout, plan.modifiers), *plan.extra):
        chunks = []
        for j in range(ring):
            cols = sorted_pos[j]
            if lite is not None:
                chunks.append((None, (), False))
                continue
            sub = restrict_layout(lay, rows, cols)
            empty = sub is not None and sub.nnz == 0
            chunks.append((sub, restrict_modifiers(tuple(mods), n, n, rows, cols), empty))
        passes.append(chunks)
    q_order = orders[rank]
    return _RingPlan(passes, q_order, torch.argsort(q_order), orders, lite)


def ring_attention(
    rt: Any,
    plan: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_plan: _RingPlan,
    cp: Any,
    combined: torch.Tensor | None,
) -> torch.Tensor:
    """Sparse attention of this rank's queries over every ring rank's keys. q, k, v: [B, m, H, D]
    (this ring rank's shard); returns [B, m, H, D]."""
    ring = cp.ring_degree
    group = cp._ring_mesh.get_group()
    kv = torch.cat([k.flatten(), v.flatten()]).contiguous()
    kv = funcol.all_gather_tensor(kv, gather_dim=0, group=group)
    if isinstance(kv, funcol.AsyncCollectiveTensor):
        kv = kv.wait()
    ks, vs = [], []
    for c in kv.chunk(ring):
        ks.append(c[: k.numel()].view_as(k))
        vs.append(c[k.numel() :].view_as(v))
    return ring_chunks(rt, plan, q, ks, vs, ring_plan, combined)


def ring_chunks(
    rt: Any,
    plan: Any,
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    ring_plan: _RingPlan,
    combined: torch.Tensor | None,
) -> torch.Tensor:
    """The compute of `ring_attention` once every ring rank's (k, v) chunk is here: q, ks[j], vs[j] [B, m, H, D]
    in the ranks' local orders; returns this rank's output [B, m, H, D]."""
    v = vs[0]
    qh = q.transpose(1, 2)[:, :, ring_plan.q_order]
    if ring_plan.lite is not None:  # one call over all keys in the plan's order (exact tile statistics)
        kh = torch.cat(ks, 1).transpose(1, 2)
        vh = torch.cat(vs, 1).transpose(1, 2)
        if combined is not None:
            kh, vh = kh[:, :, combined], vh[:, :, combined]
        lay = plan.layout
        a, b = ring_plan.lite
        block = lay.to_block_mask()
        sub = BlockLayout.from_device_block_mask(block[:, :, a:b], qh.shape[2], lay.k_len, lay.block_q, lay.block_k)
        stats = TileStats(plan.tile_stats.threshold)
        out = attention(qh, kh, vh, sub, modifiers=(), tile_stats=stats, backend=rt.kernel_backend)
        needed = torch.ones(
            *stats.needed.shape[:2], lay.num_q_blocks, lay.num_k_blocks, dtype=stats.needed.dtype, device=out.device
        )  # rows of other ranks: nothing new is skipped there (this rank never visits them)
        needed[:, :, a:b] = stats.needed
        plan.tile_stats.needed = needed
        for cb in plan.after:
            cb(out, plan)
        return out[:, :, ring_plan.q_inv].transpose(1, 2)
    acc = lse = None
    for chunks in ring_plan.passes:
        for j, (sub, mods, empty) in enumerate(chunks):
            if empty:
                rt.ring_skipped += 1
                continue  # nothing visible in this chunk: no kernel call (the all-gather above is unchanged)
            order = ring_plan.k_orders[j]
            kh, vh = ks[j].transpose(1, 2)[:, :, order], vs[j].transpose(1, 2)[:, :, order]
            o, l = attention(qh, kh, vh, sub, modifiers=mods, return_lse=True, backend=rt.kernel_backend)
            acc, lse = lse_merge(acc, lse, o, l)
    if acc is None:  # no pair visible at all: rows that see no key give 0
        acc = torch.zeros(*qh.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
    return acc.to(q.dtype)[:, :, ring_plan.q_inv].transpose(1, 2)


def shard_rows_attention(
    rt: Any, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
) -> torch.Tensor:
    """Cross-attention under context parallelism (Wan's text `attn2`: diffusers runs it without communication):
    this rank's queries are rows [start, start + Nq) of the plan's layout, the keys are all there. The layout is
    restricted to those rows once (cached in the runtime's layout cache). q [B, Nq, H, D], k, v [B, Nk, H, D]."""
    if plan.perm is not None or plan.extra or plan.tile_stats is not None or plan.after or plan.compute is not None:
        raise RuntimeError(f"attnplug[{rt.family}]: this cross-attention plan cannot run on a sequence shard")
    nq, nk = q.shape[1], k.shape[1]
    key = ("rows", plan.layout, tuple(plan.modifiers), start, nq, nk)  # layouts / modifiers hash by identity

    def build() -> tuple:
        rows = torch.arange(start, start + nq, device=q.device)
        cols = torch.arange(nk, device=q.device)
        full_q = plan.layout.q_len if plan.layout is not None else start + nq
        return (
            restrict_layout(plan.layout, rows, cols),
            restrict_modifiers(tuple(plan.modifiers), full_q, nk, rows, cols),
        )

    sub, sub_mods = rt.layouts.memo(key, build)
    rt.calls += 1
    out = attention(*(t.transpose(1, 2) for t in (q, k, v)), sub, modifiers=sub_mods, backend=rt.kernel_backend)
    return out.transpose(1, 2)

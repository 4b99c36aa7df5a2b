"""Exact PyTorch reference of the block-sparse attention kernel (every feature).

Runs on CPU (the "reference" backend) and is the oracle of the Triton kernel, so it must be exact
and fast enough to live with. It visits only the listed key blocks: each query block gets the
tokens of its key blocks gathered, and torch's fused attention runs on them, with an additive
mask only where element masks, ragged tails or padding need one. Query blocks are batched into a
few large calls (blocks with similar key counts are folded into the batch dimension; blocks with
identical keys share them), because per-call overhead, not arithmetic, dominates small calls; a
layout so dense that gathering would cost more than it saves runs as one masked dense call.
Everything derived from the layout is built once and cached on it: a repeated call does no host
work. LogitDecay and TileStats need the logits, so they use explicit fp32 math on the same
gathered keys. Computation in fp32; differentiable through autograd.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading

import torch
import torch.nn.functional as F

from .layout import BlockLayout
from .modifiers import TileStats, check_modifiers

__all__ = ["reference_attention"]

_LOG2E = 1.0 / math.log(2.0)
_NEG_INF = float("-inf")
# torch's fused CPU attention returning (out, logsumexp); autograd covers `out`
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_GATHER_BUDGET = 1 << 24  # elements of keys + values gathered at once
_SCORE_BUDGET = 1 << 22  # elements of one score tensor per explicit step
_CALL_COST = 0.01  # cost of one more fused call (and its output copy), as a fraction of a dense call
_FORCE_ORDER: str | None = None  # tests: force a "sorted" / "natural" plan, or "masked_dense" (fused path)
_DENSE_IF = (1.56, 34.0, 0.9)  # fused path: masked dense call when pd * (a + b / block_q) > c (see _plan)
_MASK_BUDGET = 1 << 24  # elements of a layout-wide mask for the masked dense call


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None = None,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
    return_lse: bool = False,
    tile_stats: TileStats | None = None,
    chunk: int = 256,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference of `attn_kernels.attention` (same arguments); rows with no key give 0 / lse -inf.

    ``chunk``: query rows per step of the explicit path without a layout. The lse is
    differentiable too: asking for it with grad enabled takes the explicit path."""
    B, H, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    decay, mix = check_modifiers(tuple(modifiers), nq, nk, H)
    if tile_stats is not None and layout is None:
        raise ValueError("tile_stats needs a BlockLayout (tiles are the layout's blocks)")
    qf, kf, vf = q.float(), k.float(), v.float()
    lse_grad = return_lse and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    explicit = decay is not None or tile_stats is not None or lse_grad or not _fused_ok(q)
    if layout is None or (tile_stats is None and layout.is_full):
        if explicit:
            out, lse = _dense_explicit(qf, kf, vf, scale, decay, max(1, chunk))
        else:
            out, lse = _fused(qf, kf, vf, None, scale)
    else:
        plan = _plan(layout, q.device, explicit)
        out, lse = _sparse(qf, kf, vf, scale, decay, plan, layout, tile_stats, explicit)
    if mix is not None:
        out = mix.reference_output(out, vf, H)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _fused_ok(q: torch.Tensor) -> bool:
    return _FLASH_CPU is not None and q.device.type == "cpu"


def _fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused CPU attention on fp32; head dims padded to one size (it needs D == Dv)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    elif dv < d:
        v = F.pad(v, (0, d - dv))
    out, lse = _FLASH_CPU(q, k, v, attn_mask=bias, scale=scale)
    return (out[..., :dv] if dv < d else out), lse


def _softmax_out(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits s [B,H,rows,L] (-inf = hidden), values [B,H,L,Dv] -> (out, lse); empty rows 0 / -inf."""
    m = s.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe)
    denom = p.sum(-1, keepdim=True)
    o = torch.einsum("bhqk,bhkd->bhqd", p, v) / denom.clamp_min(1e-30)
    o = torch.where(denom > 0, o, torch.zeros_like(o))
    seen = denom[..., 0] > 0
    lse = torch.where(seen, m_safe[..., 0] + torch.log(torch.where(seen, denom[..., 0], 1.0)), _NEG_INF)  # no NaN grads
    return o, lse


def _dense_explicit(q, k, v, scale, decay, chunk):
    """Explicit fp32 math over all keys, `chunk` query rows at a time."""
    H, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    if decay is not None:
        qpos, kpos = decay.positions(nq, nk, q.device)
        factors = decay.factors(H)
    outs, lses = [], []
    for r0 in range(0, nq, chunk):
        r1 = min(r0 + chunk, nq)
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, r0:r1], k) * scale
        if decay is not None:
            s = decay.reference_scores(s, qpos[r0:r1], kpos, factors)
        o, lse = _softmax_out(s, v)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


# ---------------------------------------------------------------------- per-layout plan
class _Row:
    """Keys of one query block while planning (CPU), whole key blocks: blk ``[S]`` (shared) or
    ``[Bl, Hl, S]`` (per batch entry / head, padded with block 0), has ``[Bl, Hl, S]`` which of
    those are listed (None = all), visible bool ``[Bl|1, Hl|1, rows, S*block_k]`` or None (all
    visible; covers element masks, the ragged last key block and padding)."""

    __slots__ = ("qb", "rows", "blk", "has", "visible")

    def __init__(self, qb, rows, blk, has, visible) -> None:
        self.qb, self.rows, self.blk, self.has, self.visible = qb, rows, blk, has, visible

    @property
    def S(self) -> int:
        return self.blk.shape[-1]


def _row_keys(layout: BlockLayout, sel: torch.Tensor, qb: int) -> _Row:
    """Key blocks of query block `qb` (sel: bool [Bl, Hl, nkb] its listed key blocks)."""
    bq, bk, nk, nkb = layout.block_q, layout.block_k, layout.k_len, layout.num_k_blocks
    Bl, Hl = sel.shape[:2]
    rows = min(bq, layout.q_len - qb * bq)
    if bool((sel == sel[:1, :1]).all()):  # one key list for every batch entry and head
        blk, has = sel[0, 0].nonzero()[:, 0], None
        ok = (blk[:, None] * bk + torch.arange(bk)).reshape(1, 1, -1) < nk  # the ragged last block
    else:  # per (batch, head) lists, padded to the longest
        counts = sel.sum(-1)
        ar = torch.arange(nkb)
        cols = torch.where(sel, ar, ar + nkb).sort(-1).values[..., : int(counts.max())]  # listed first, ascending
        has = torch.arange(cols.shape[-1]) < counts[..., None]
        blk = torch.where(has, cols, 0)
        ok = has.repeat_interleave(bk, -1) & ((blk[..., None] * bk + torch.arange(bk)).reshape(Bl, Hl, -1) < nk)
    visible = None if bool(ok.all()) else ok[:, :, None, :].expand(-1, -1, rows, -1)
    if layout.partial is not None:
        tok = (blk[..., None] * bk + torch.arange(bk)).flatten(-2).clamp(max=nk - 1)
        tm = layout.row_token_mask(qb).cpu()[:, :, :rows]  # [Bl, Hl, rows, nk]
        g = tm[..., tok] if tok.dim() == 1 else tm.gather(-1, tok[:, :, None, :].expand(-1, -1, rows, -1))
        g = g if visible is None else g & visible
        visible = None if bool(g.all()) else g
    return _Row(qb, rows, blk, has, visible)


def _void_row(layout: BlockLayout, qb: int) -> _Row:
    """A query block that sees no key (inside a natural-order bucket: all its keys are padding)."""
    return _Row(
        qb, min(layout.block_q, layout.q_len - qb * layout.block_q), torch.zeros(0, dtype=torch.long), None, None
    )


def _segments(lengths: list[int], call_cost: float, sorted_desc: bool) -> tuple[list[int], float]:
    """Split a list of key counts into runs, each padded to its longest: minimise
    ``sum(call_cost + len(run) * max(run))`` (dynamic programming). Returns (run starts, cost)."""
    n = len(lengths)
    if n == 0:
        return [], 0.0
    L = torch.tensor(lengths, dtype=torch.float64)
    best = torch.zeros(n + 1, dtype=torch.float64)
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        span_max = L[:j] if sorted_desc else torch.flip(torch.cummax(torch.flip(L[:j], (0,)), 0).values, (0,))
        cost = best[:j] + call_cost + (j - torch.arange(j, dtype=torch.float64)) * span_max
        i = int(cost.argmin())
        best[j], start[j] = cost[i], i
    out, j = [], n
    while j > 0:
        out.append(start[j])
        j = start[j]
    return out[::-1], float(best[n])


def _key_of(r: _Row) -> tuple:
    return (tuple(r.blk.shape), r.blk.numpy().tobytes(), None if r.has is None else r.has.numpy().tobytes())


def _group(layout: BlockLayout, rows: list[_Row | None]) -> tuple[bool, list[tuple[str, list[_Row], int]]]:
    """Buckets ("fold" | "common" | "void", rows, query rows per block) and whether they are sorted.

    Natural order (contiguous runs of query blocks: no permutation of queries and outputs) is
    used unless sorting by key count saves more than the two permutations cost."""
    bq, nq = layout.block_q, layout.q_len
    live = [r for r in rows if r is not None]
    call_cost = _CALL_COST * layout.num_q_blocks * layout.num_k_blocks  # in key blocks per query block
    # sorted: identical key sets of >= 4 blocks share their keys, the rest is folded by key count
    by_keys: dict = {}
    for r in live:
        by_keys.setdefault(_key_of(r), []).append(r)
    srt, rest, cost_s = [], [], 2 * call_cost
    for same in by_keys.values():
        if len(same) >= 4:
            srt.append(("common", same, bq))
            cost_s += call_cost + len(same) * same[0].S
        else:
            rest.extend(same)
    rest.sort(key=lambda r: -r.S)
    starts, c = _segments([r.S for r in rest], call_cost, True)
    srt += [("fold", rest[a:b], bq) for a, b in zip(starts, starts[1:] + [len(rest)])]
    cost_s += c
    void = [_void_row(layout, qb) for qb, r in enumerate(rows) if r is None]
    if void:
        srt.append(("void", void, bq))
    # natural: the ragged last query block is a bucket of its own (no padded query rows)
    nat_rows = [r if r is not None else _void_row(layout, qb) for qb, r in enumerate(rows)]
    tail = [nat_rows.pop()] if nq % bq else []
    starts, cost_n = _segments([r.S for r in nat_rows], call_cost, False)
    nat = []
    for run in [nat_rows[a:b] for a, b in zip(starts, starts[1:] + [len(nat_rows)])] + ([tail] if tail else []):
        n = run[0].rows
        if all(r.S == 0 for r in run):
            nat.append(("void", run, n))
        elif len(run) == 1 or (all(r.S > 0 for r in run) and len({_key_of(r) for r in run}) == 1):
            nat.append(("common", run, n))
        else:
            nat.append(("fold", run, n))
    if tail:
        cost_n += call_cost + tail[0].S
    if _FORCE_ORDER in ("sorted", "natural"):  # tests exercise both
        return (True, srt) if _FORCE_ORDER == "sorted" else (False, nat)
    return (True, srt) if cost_s < cost_n else (False, nat)


class _Bucket:
    """Query blocks computed together: positions ``s0 .. s0+G`` of the plan's block order.

    kind: "fold" (each block its own S key blocks, padded; blocks become the batch dim of the
    fused call), "common" (one key set for all G blocks; their rows are concatenated) or "void"
    (no keys: output 0). rows: query rows per block (block_q, less for a ragged last block of
    its own). L = S * block_k keys per block. Per-(batch, head) tensors have a row-set dim R: 1
    when every batch entry and head agrees, else the layout's Bl*Hl. t0: where the key blocks
    start in the plan's flat block ids; span: ``(a, b)`` when the keys are the contiguous token
    range a..b-1 of the padded keys (a slice; t0 is then None). bias (0 / -inf): fold
    ``[G, R, bq, L]``, common ``[R, G*rows, L]``; None = all visible. row_ok: bool ``[G, bq]``
    rows inside q_len (None = all). For TileStats: slot ``[G|1, R, L]``, the position of each
    key's block in its query block's ascending list (S = padding), and blocks ``[G|1, R, S]``,
    the key block at each position (num_k_blocks = padding).
    """

    __slots__ = ("kind", "s0", "G", "L", "rows", "t0", "span", "bias", "row_ok", "slot", "blocks")

    def __init__(self, **kw) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.get(name))


class _Plan:
    """A layout's buckets. idx: flat key block ids ``[R, T]``; bounds: offsets into idx where a
    query block's keys start or end (gathers cut there); tok_order: the query token of each
    sorted row (None = natural order); inv ``[nqb]``: sorted position of each query block (None
    = natural order); empty: bool ``[Bl|1, Hl|1, nqb*bq]`` rows that see no key (None = none);
    per_bh: per (B, H), tensors expanded to B*H rows; masked_dense: one masked dense call."""

    __slots__ = ("buckets", "idx", "bounds", "dims", "tok_order", "inv", "empty", "per_bh", "masked_dense")

    def __init__(self, **kw) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.get(name))


def _plan(layout: BlockLayout, device: torch.device, explicit: bool) -> _Plan:
    """The layout's plan on `device`, built once (host work) and cached on the layout.

    The fused path runs a dense-enough layout as one masked dense call instead (gathering keys
    per query block then costs more than computing every pair; see `_DENSE_IF`)."""
    key = ("ref_plan", str(device), "explicit" if explicit else "fused")
    plan = layout._dense_cache.get(key)
    if plan is None:
        other = ("ref_plan", str(device), "fused" if explicit else "explicit")
        plan = layout._dense_cache.get(other)
        if plan is None or plan.masked_dense:
            plan = _build_plan(layout, device)
        if not explicit and _prefer_masked_dense(layout, plan):
            plan = _masked_dense_plan(layout, device)
        layout._dense_cache[key] = plan
    return plan


def _prefer_masked_dense(layout: BlockLayout, plan: _Plan) -> bool:
    """Cost model of the fused path (fit on CPU timings): gathered, padded pair density ``pd``
    costs ``pd * (a + b / block_q)`` of a dense call; a masked dense call ~1.1."""
    if _FORCE_ORDER is not None:
        return _FORCE_ORDER == "masked_dense"
    if layout.batch * layout.heads * layout.q_len * layout.k_len > _MASK_BUDGET:
        return False
    pd = sum(b.G * b.rows * b.L for b in plan.buckets) / (layout.q_len * layout.k_len)
    a, b, dense = _DENSE_IF
    return pd * (a + b / layout.block_q) > dense


def _masked_dense_plan(layout: BlockLayout, device: torch.device) -> _Plan:
    """Every query against every key in one call, the layout as an additive mask."""
    nq, nk, bq, nqb = layout.q_len, layout.k_len, layout.block_q, layout.num_q_blocks
    vis = torch.cat([layout.row_token_mask(qb).cpu() for qb in range(nqb)], 2)[:, :, :nq]  # [Bl, Hl, nq, nk]
    dims = tuple(vis.shape[:2])
    R = dims[0] * dims[1]
    vis = vis.reshape(R, nq, nk)
    bias = torch.zeros(vis.shape).masked_fill_(~vis, _NEG_INF).to(device)
    b = _Bucket(kind="common", s0=0, G=1, L=nk, rows=nq, span=(0, nk), bias=bias)
    e = F.pad(~vis.any(-1), (0, nqb * bq - nq))
    return _Plan(
        buckets=[b], idx=torch.zeros(R, 0, dtype=torch.long, device=device), bounds=[0], dims=dims, tok_order=None,
        inv=None, empty=e.view(*dims, -1).to(device) if bool(e.any()) else None, per_bh={}, masked_dense=True,
    )  # fmt: skip


def _build_plan(layout: BlockLayout, device: torch.device) -> _Plan:
    bq, nq, nqb = layout.block_q, layout.q_len, layout.num_q_blocks
    bm = layout.to_block_mask().cpu()  # [Bl, Hl, nqb, nkb]
    Bl, Hl = bm.shape[:2]
    rows = [_row_keys(layout, bm[:, :, qb], qb) if bool(bm[:, :, qb].any()) else None for qb in range(nqb)]
    live = [r for r in rows if r is not None]
    wide = any(r.blk.dim() == 3 or (r.visible is not None and r.visible.shape[:2].numel() > 1) for r in live)
    dims = (Bl, Hl) if wide else (1, 1)
    R = dims[0] * dims[1]
    is_sorted, groups = _group(layout, rows)
    buckets, keys, bounds, order = [], [], [0], []
    empty = torch.zeros(R, nqb * bq, dtype=torch.bool)
    t = 0
    for kind, grp, n in groups:
        b, kb, e = _bucket(layout, kind, grp, n, dims, len(order), t, device)
        if kb is not None:
            keys.append(kb)
            step = kb.shape[1] if kind == "common" else b.L // layout.block_k
            bounds.extend(range(t + step, t + kb.shape[1] + 1, step))
            t += kb.shape[1]
        for j, r in enumerate(grp):
            empty[:, r.qb * bq : r.qb * bq + e.shape[-1]] = e[j]
        buckets.append(b)
        order.extend(r.qb for r in grp)
    inv = tok_order = None
    if is_sorted:
        inv = torch.empty(nqb, dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(nqb)
        inv = inv.to(device)
        tok = torch.tensor(order, dtype=torch.long)[:, None] * bq + torch.arange(bq)
        tok_order = tok.reshape(-1).clamp(max=nq - 1).to(device)  # padded rows read the last row (dropped)
    idx = torch.cat(keys, 1) if keys else torch.zeros(R, 0, dtype=torch.long)
    return _Plan(
        buckets=buckets, idx=idx.to(device), bounds=bounds, dims=dims, tok_order=tok_order, inv=inv,
        empty=empty.view(*dims, -1).to(device) if bool(empty.any()) else None, per_bh={},
    )  # fmt: skip


def _to_sets(x: torch.Tensor, dims: tuple[int, int], lead: int) -> torch.Tensor:
    """A per-block tensor, ``[*rest]`` (lead 0: shared) or ``[Bl', Hl', *rest]`` (lead 2), as ``[R, *rest]``."""
    rest = x.shape[lead:]
    if lead == 0:
        return x.expand(dims[0] * dims[1], *rest)
    return x.expand(*dims, *rest).reshape(dims[0] * dims[1], *rest)


def _bucket(layout: BlockLayout, kind: str, rows: list[_Row], n: int, dims, s0: int, t0: int, device):
    """One bucket (on `device`), its flat key block ids ``[R, T_b]`` (None: span or void) and its
    empty rows ``[G, R, rows]`` (CPU)."""
    bk, nkb = layout.block_k, layout.num_k_blocks
    R = dims[0] * dims[1]
    G, S = len(rows), max(r.S for r in rows)
    L = S * bk
    if kind == "void":
        return _Bucket(kind=kind, s0=s0, G=G, L=0, rows=n), None, torch.ones(G, R, n, dtype=torch.bool)
    n_sets = 1 if kind == "common" else G
    blk = torch.zeros(n_sets, R, S, dtype=torch.long)  # padding reads block 0 (masked)
    blocks = torch.full((n_sets, R, S), nkb, dtype=torch.long)
    for j, r in enumerate(rows[:n_sets]):
        lead = 2 if r.blk.dim() == 3 else 0
        blk[j, :, : r.S] = _to_sets(r.blk, dims, lead)
        listed = _to_sets(r.has, dims, 2) if r.has is not None else torch.ones(R, r.S, dtype=torch.bool)
        blocks[j, :, : r.S] = torch.where(listed, blk[j, :, : r.S], nkb)
    slot = torch.where(blocks == nkb, S, torch.arange(S)).repeat_interleave(bk, -1)
    bias, empty = None, torch.zeros(G, R, n, dtype=torch.bool)
    if any(r.visible is not None or r.S < S for r in rows):
        vis = torch.ones(G, R, n, L, dtype=torch.bool)  # padded rows stay visible: never "empty", dropped
        for j, r in enumerate(rows):
            vis[j, :, : r.rows, r.S * bk :] = False
            if r.visible is not None:
                vis[j, :, : r.rows, : r.S * bk] = _to_sets(r.visible, dims, 2)
        bias = torch.zeros(vis.shape).masked_fill_(~vis, _NEG_INF)
        if kind == "common":
            bias = bias.permute(1, 0, 2, 3).reshape(R, G * n, L)
        bias, empty = bias.to(device), ~vis.any(-1)
    row_ok = None
    if any(r.rows < n for r in rows):
        row_ok = torch.stack([torch.arange(n) < r.rows for r in rows]).to(device)
    keys, span = blk.permute(1, 0, 2).reshape(R, n_sets * S), None
    if kind == "common" and R == 1 and int(blk[0, 0, -1] - blk[0, 0, 0]) == S - 1:  # ascending, unique
        keys, span = None, (int(blk[0, 0, 0]) * bk, (int(blk[0, 0, -1]) + 1) * bk)
    b = _Bucket(
        kind=kind, s0=s0, G=G, L=L, rows=n, t0=None if span else t0, span=span, bias=bias, row_ok=row_ok,
        slot=slot.to(device), blocks=blocks.to(device),
    )  # fmt: skip
    return b, keys, empty


def _per_bh(plan: _Plan, B: int, H: int, nkb: int) -> dict:
    """Per (B, H), cached: "flat" block ids into keys viewed ``[B*H*nkb, block_k, D]``
    (``[B*H, T]``) and the plan's R-dim tensors expanded to B*H rows."""
    hit = plan.per_bh.get((B, H))
    if hit is None:
        (Bl, Hl), dev = plan.dims, plan.idx.device
        bl = torch.arange(B, device=dev) if Bl > 1 else torch.zeros(B, dtype=torch.long, device=dev)
        hl = torch.arange(H, device=dev) if Hl > 1 else torch.zeros(H, dtype=torch.long, device=dev)
        rs = (bl[:, None] * Hl + hl[None, :]).reshape(-1)
        hit = {"flat": plan.idx.index_select(0, rs) + torch.arange(B * H, device=dev)[:, None] * nkb}
        if plan.dims != (1, 1):
            for i, b in enumerate(plan.buckets):
                if b.bias is not None:
                    hit[("bias", i)] = b.bias.index_select(0 if b.kind == "common" else 1, rs)
                if b.slot is not None:
                    hit[("slot", i)] = b.slot.index_select(1, rs)
                    hit[("blocks", i)] = b.blocks.index_select(1, rs)
        plan.per_bh[(B, H)] = hit
    return hit


# ---------------------------------------------------------------------- sparse path
@contextlib.contextmanager
def _serial():
    """Run memory-bound copies (gathers, permutations) on one intra-op thread: more threads gain
    them little, and every parallel region waits at a barrier, which costs milliseconds when the
    cores are busy. Restores the caller's setting (per calling thread with OpenMP)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _take(xb: torch.Tensor, flat: torch.Tensor, t0: int, t1: int, bufs: dict | None, name: str) -> torch.Tensor:
    """Key blocks flat[:, t0:t1] of xb ``[BH*nkb, block_k, D]`` -> ``[1, BH, (t1-t0)*block_k, D]``.

    Without autograd, into a buffer kept per (layout, thread): fresh memory for every gather
    costs page faults comparable to the copy itself."""
    BH, (bk, D) = flat.shape[0], xb.shape[1:]
    ids = flat[:, t0:t1].reshape(-1)
    if bufs is None:
        out = xb.index_select(0, ids)
    else:
        buf = bufs.get(name)
        if buf is None or buf.shape[0] < ids.numel() or buf.shape[1:] != xb.shape[1:]:
            buf = bufs[name] = xb.new_empty(ids.numel(), bk, D)
        out = torch.index_select(xb, 0, ids, out=buf[: ids.numel()])
    return out.view(1, BH, (t1 - t0) * bk, D)


def _sparse(q, k, v, scale, decay, plan: _Plan, layout: BlockLayout, tile_stats, explicit):
    """Every bucket, in pieces within the memory budgets; results put back in query order.

    Batch and heads are merged into one head dim of B*H, so every piece is a strided view: queries
    are permuted once (sorted plans only), key blocks gathered once per budget-sized run."""
    B, H, nq, D = q.shape
    nk, Dv = k.shape[2], v.shape[-1]
    BH, bq, bk, nqb, nkb = B * H, layout.block_q, layout.block_k, layout.num_q_blocks, layout.num_k_blocks
    q4, k4, v4 = q.reshape(1, BH, nq, D), k.reshape(1, BH, nk, D), v.reshape(1, BH, nk, Dv)
    if not explicit and D != Dv:  # the fused kernel wants one head size: zero-pad once
        q4, k4 = (F.pad(t, (0, max(D, Dv) - D)) for t in (q4, k4))
        v4 = F.pad(v4, (0, max(D, Dv) - Dv))
    Dq, Do = q4.shape[-1], v4.shape[-1]
    if nkb * bk != nk:  # whole key blocks: pad the ragged last one (its padding is masked)
        k4, v4 = F.pad(k4, (0, 0, 0, nkb * bk - nk)), F.pad(v4, (0, 0, 0, nkb * bk - nk))
    kb, vb = k4.contiguous().view(BH * nkb, bk, Dq), v4.contiguous().view(BH * nkb, bk, Do)
    ex = _per_bh(plan, B, H, nkb)
    flat = ex["flat"]  # [BH, T]
    bufs = None  # gather buffers (inference only: autograd keeps what it saved)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        bufs = ex.setdefault(("buffers", threading.get_ident(), q.dtype), {})
    if plan.tok_order is None:
        qs = q4
    elif bufs is None:
        qs = q4.index_select(2, plan.tok_order)
    else:
        qs = bufs.get("q")
        if qs is None or qs.shape[1:] != (BH, plan.tok_order.numel(), Dq):
            qs = bufs["q"] = q4.new_empty(1, BH, plan.tok_order.numel(), Dq)
        with _serial():
            torch.index_select(q4, 2, plan.tok_order, out=qs)
    ctx = None
    if explicit:
        ctx = {"threshold": None if tile_stats is None else tile_stats.threshold, "nkb": nkb, "decay": decay}
        if decay is not None:
            qpos, kpos = decay.positions(nq, nk, q.device)
            ctx["qpos"] = qpos if plan.tok_order is None else qpos[plan.tok_order]
            ctx["kpos"] = F.pad(kpos, (0, nkb * bk - nk)).view(nkb, bk)
            ctx["factors"] = decay.factors(H).to(q.device).repeat(B)
    span_blocks = max(1, _GATHER_BUDGET // (BH * (Dq + Do) * bk))
    outs, lses, needs = [], [], []
    gk = gv = None
    gs = ge = 0  # block range of flat held in gk / gv
    for i, b in enumerate(plan.buckets):
        if b.kind == "void":
            outs.append(_zeros_in_graph(q4, k4, v4, (BH, b.G * b.rows, Do)))
            lses.append(q.new_full((BH, b.G * b.rows), _NEG_INF))
            needs.append(torch.zeros(BH, b.G, nkb, dtype=torch.uint8, device=q.device))
            continue
        L, common = b.L, b.kind == "common"
        S = L // bk
        if explicit:  # scores of a piece within budget
            step = max(1, _SCORE_BUDGET // (BH * b.rows * L))
        else:  # a piece's gathered keys within budget
            step = b.G if common else max(1, span_blocks // S)
        bias_all = ex.get(("bias", i), b.bias)
        for g0 in range(0, b.G, step):
            g1 = min(b.G, g0 + step)
            g = g1 - g0
            r0, r1 = b.s0 * bq + g0 * b.rows, b.s0 * bq + g1 * b.rows
            if b.span is not None:
                ks, vs = k4[:, :, b.span[0] : b.span[1]], v4[:, :, b.span[0] : b.span[1]]
            else:
                t0, t1 = (b.t0, b.t0 + S) if common else (b.t0 + g0 * S, b.t0 + g1 * S)
                if gk is None or t0 < gs or t1 > ge:  # gather the next run of pieces
                    gs = t0
                    ge = max(t1, plan.bounds[bisect.bisect_right(plan.bounds, t0 + span_blocks) - 1])
                    with _serial():
                        gk, gv = _take(kb, flat, gs, ge, bufs, "k"), _take(vb, flat, gs, ge, bufs, "v")
                ks, vs = gk[:, :, (t0 - gs) * bk : (t1 - gs) * bk], gv[:, :, (t0 - gs) * bk : (t1 - gs) * bk]
                if not common:
                    ks = ks[0].view(BH, g, L, Dq).transpose(0, 1)
                    vs = vs[0].view(BH, g, L, Do).transpose(0, 1)
            if common:
                qp = qs[:, :, r0:r1]  # [1, BH, g*rows, Dq]
                bias = None if bias_all is None else bias_all[None, :, g0 * b.rows : g1 * b.rows]
            else:
                qp = qs[0, :, r0:r1].view(BH, g, bq, Dq).transpose(0, 1)  # [g, BH, bq, Dq]
                bias = None if bias_all is None else bias_all[g0:g1]
            if explicit:
                kpos_p = None
                if decay is not None:
                    kp = ctx["kpos"]  # [nkb, bk]
                    if b.span is not None:
                        kpos_p = kp.view(-1)[b.span[0] : b.span[1]].view(1, 1, L)
                    else:
                        ids = flat[:, t0:t1] % nkb  # [BH, S*g] block ids
                        kpos_p = kp[ids].view(BH, -1, L).transpose(0, 1)  # [g|1, BH, L]
                o, lse, need = _explicit(qp, ks, vs, bias, scale, b, i, g0, g1, r0, r1, kpos_p, ex, ctx)
                needs.append(None if need is None else need.transpose(0, 1))
            else:
                o, lse = _FLASH_CPU(qp, ks, vs, attn_mask=bias, scale=scale)
            if common:  # -> [BH, g*rows, .]
                o, lse = o[0], lse[0]
            else:
                o, lse = o.transpose(0, 1).reshape(BH, g * bq, Do), lse.transpose(0, 1).reshape(BH, g * bq)
            outs.append(o)
            lses.append(lse)
    with _serial():
        out, lse = _unsort(outs, plan, bq), _unsort(lses, plan, bq)
    out, lse = out[:, :nq].view(B, H, nq, Do)[..., :Dv], lse[:, :nq].view(B, H, nq)
    if plan.empty is not None:
        e = plan.empty[..., :nq]
        out, lse = out.masked_fill(e[..., None], 0.0), lse.masked_fill(e, _NEG_INF)
    if tile_stats is not None:
        tile_stats.needed = _unsort(needs, plan, 1).view(B, H, nqb, nkb)
    return out, lse


def _zeros_in_graph(q4, k4, v4, shape) -> torch.Tensor:
    """Zeros that stay in the autograd graph of q, k and v (gradient 0, never NaN), so that a layout
    with no key at all still differentiates like any other."""
    if not (torch.is_grad_enabled() and (q4.requires_grad or k4.requires_grad or v4.requires_grad)):
        return q4.new_zeros(shape)
    anchor = q4[0, :, :1, :1] + k4[0, :, :1, :1] + v4[0, :, :1, :1]  # [BH, 1, 1]
    return torch.where(torch.zeros((), dtype=torch.bool, device=q4.device), anchor, 0.0).expand(shape)


def _unsort(parts: list[torch.Tensor], plan: _Plan, rows: int) -> torch.Tensor:
    """Pieces ``[BH, n_i, ...]`` in bucket order -> one ``[BH, n, ...]`` in query order (``rows``
    per block: sorted plans permute whole blocks)."""
    x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    if plan.inv is None:
        return x
    BH, rest = x.shape[0], x.shape[2:]
    return x.view(BH, -1, rows, *rest).index_select(1, plan.inv).view(BH, -1, *rest)


def _explicit(q, k, v, bias, scale, b: _Bucket, i, g0, g1, r0, r1, kpos, ex, ctx):
    """Explicit fp32 math for one piece, in the fused call's layouts (fold: q ``[g, BH, bq, D]``;
    common: ``[1, BH, g*rows, D]``). Returns (out, lse, needed uint8 ``[g, BH, nkb]`` or None)."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    g, common = g1 - g0, b.kind == "common"
    BH, L, n = s.shape[1], s.shape[-1], b.rows
    s4 = s[0].view(BH, g, n, L).transpose(0, 1) if common else s  # [g, BH, rows, L]
    decay = ctx["decay"]
    if decay is not None:  # LogitDecay.reference_scores on gathered keys
        qp = ctx["qpos"][r0:r1].long().view(g, 1, n, 1)
        kp = kpos.long()[:, :, None, :]  # [g|1, 1|BH, 1, L]
        far = ((qp - kp).abs() > decay.threshold) & (qp >= 0) & (kp >= 0)
        s4 = torch.where(far & (s4 > 0), s4 * ctx["factors"].view(1, BH, 1, 1), s4)
    if bias is not None:
        s4 = s4 + (bias[0].view(-1, g, n, L).transpose(0, 1) if common else bias)
    need = None
    if ctx["threshold"] is not None:
        slot = ex.get(("slot", i), b.slot)
        blocks = ex.get(("blocks", i), b.blocks)
        if not common:
            slot, blocks = slot[g0:g1], blocks[g0:g1]
        row_ok = None if b.row_ok is None else b.row_ok[g0:g1]
        need = _tile_needed(s4.detach(), slot, blocks, row_ok, ctx["threshold"], ctx["nkb"])
    s = s4.transpose(0, 1).reshape(1, BH, g * n, L) if common else s4
    o, lse = _softmax_out(s, v)
    return o, lse, need


def _tile_needed(s4, slot, blocks, row_ok, threshold: float, nkb: int) -> torch.Tensor:
    """LiteAttention rule: logits ``[g, BH, rows, L]`` of gathered keys -> uint8 ``[g, BH, nkb]``.

    A query block's tiles are its listed key blocks in ascending order (an unlisted block would
    only add -inf to the running max, so leaving it out changes nothing); padded rows count for
    nothing."""
    g, BH, n, L = s4.shape
    S = blocks.shape[-1]
    index = slot[:, :, None, :].expand(g, BH, n, L)
    tile_max = s4.new_full((g, BH, n, S + 1), _NEG_INF).scatter_reduce_(-1, index, s4, "amax")[..., :S]
    if row_ok is not None:
        tile_max = tile_max.masked_fill(~row_ok[:, None, :, None], _NEG_INF)
    run = torch.cummax(tile_max, dim=-1).values
    before = torch.cat([torch.full_like(run[..., :1], _NEG_INF), run[..., :-1]], -1)
    need = (tile_max * _LOG2E > before * _LOG2E + threshold).any(2)  # False for -inf tiles, True after -inf
    out = torch.zeros(g, BH, nkb + 1, dtype=torch.uint8, device=s4.device)
    return out.scatter_(-1, blocks.expand(g, BH, S), need.to(torch.uint8))[..., :nkb]

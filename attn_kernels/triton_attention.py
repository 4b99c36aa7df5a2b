"""Triton block-sparse FlashAttention: forward and backward.

In the style of the Triton tutorials' fused attention: one program per (query block,
batch*head) walks only the key blocks its CSR row lists (online softmax in the exp2 domain,
fp32 accumulation). Element masks of partial blocks, tails, the fused modifiers and the
LiteAttention tile statistics are applied by `_score_hook`, so a new score modifier touches the
hook, not the loops. The backward pass is FlashAttention-2's: a dK/dV kernel per key block
walking the transposed layout, and a dQ kernel per query block walking the layout.

On CPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` (tests); there bf16
is unreliable, so tests use fp32/fp16 there and bf16 on the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import BlockLayout
from .modifiers import TileStats, check_modifiers

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "pick_tiles",
    "triton_attention_backward",
    "triton_attention_forward",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


@triton.jit
def _score_hook(
    s,  # [BM, BN] logits * scale * log2(e)
    offs_m,  # [BM] query token index
    offs_n,  # [BN] key token index
    offs_r,  # [BM] row of the query block (element-mask row)
    offs_c,  # [BN] column of the key block (element-mask column)
    idx,  # CSR entry of this (query block, key block)
    h,
    Nq,
    Nk,
    Partial,
    ElemMask,
    DecayF,
    decay_thr,
    QPos,
    KPos,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DECAY: tl.constexpr,
):
    """Apply score modifiers and masks to one tile; returns (masked scores, decay gate).

    Every score modifier lives here behind its constexpr flag (the gate is ds/ds_raw for the
    backward pass); the forward / backward loops only call this hook."""
    valid = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    if HAS_MASK:
        pidx = tl.load(Partial + idx)
        wptr = (
            ElemMask
            + tl.maximum(pidx, 0).to(tl.int64) * (BLOCK_Q * WORDS)
            + offs_r[:, None] * WORDS
            + offs_c[None, :] // 32
        )
        words = tl.load(wptr)
        bit = (words >> (offs_c[None, :] % 32)) & 1
        valid = valid & ((bit != 0) | (pidx < 0))
    gate = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
    if HAS_DECAY:
        f = tl.load(DecayF + h)
        qp = tl.load(QPos + offs_m, mask=offs_m < Nq, other=-1)
        kp = tl.load(KPos + offs_n, mask=offs_n < Nk, other=-1)
        dist = tl.abs(qp[:, None] - kp[None, :])
        far = (dist > decay_thr) & (qp[:, None] >= 0) & (kp[None, :] >= 0) & (s > 0)
        gate = tl.where(far, f, 1.0)
        s = s * gate
    s = tl.where(valid, s, float("-inf"))
    return s, gate


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    RowPtr, ColIdx, Partial, ElemMask,
    DecayF, decay_thr, QPos, KPos, MixU,
    Stats, stats_thr,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, Nq, Nk, NQB, NKB, LB, LH, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    WORDS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_MIX: tl.constexpr,
    HAS_STATS: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_M rows of a layout query block (BLOCK_Q = BLOCK_M*SPLIT_M rows); the loop
    # walks the CSR row's key blocks in BLOCK_N-wide sub-tiles (BLOCK_K = BLOCK_N*SPLIT_N).
    BLOCK_Q: tl.constexpr = BLOCK_M * SPLIT_M
    BLOCK_K: tl.constexpr = BLOCK_N * SPLIT_N
    pid = tl.program_id(0)
    qb = pid // SPLIT_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bl = tl.where(LB > 1, b, 0)
    hl = tl.where(LH > 1, h, 0)
    row = (bl * LH + hl) * NQB + qb
    start = tl.load(RowPtr + row)
    end = tl.load(RowPtr + row + 1)

    offs_r = (pid % SPLIT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_Q + offs_r
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Nq, other=0.0)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    m_before = tl.full([BLOCK_M], float("-inf"), tl.float32)  # tile stats: running max before the block
    need = tl.zeros([BLOCK_M], tl.int32)
    for it in range(start * SPLIT_N, end * SPLIT_N):
        idx = it // SPLIT_N
        sub = it % SPLIT_N
        kb = tl.load(ColIdx + idx)
        offs_c = sub * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = kb * BLOCK_K + offs_c
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=offs_n[None, :] < Nk, other=0.0)
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        s, _gate = _score_hook(
            s, offs_m, offs_n, offs_r, offs_c, idx, h, Nq, Nk, Partial, ElemMask, DecayF, decay_thr, QPos, KPos,
            BLOCK_Q, BLOCK_M, BLOCK_N, WORDS, HAS_MASK, HAS_DECAY,
        )  # fmt: skip
        tile_max = tl.max(s, 1)
        if HAS_STATS:
            # needed <=> some valid row has (block max - running max before the block) > thr; the
            # block max is the max of its sub-tiles, so OR the per-sub-tile test against m_before
            m_before = tl.where(sub == 0, m_i, m_before)
            cond = ((tile_max > m_before + stats_thr) & (offs_m < Nq)).to(tl.int32)  # no -inf - -inf
            need = tl.where(sub == 0, cond, tl.maximum(need, cond))
            need_any = tl.max(need, 0)
            st_ptr = Stats + ((b * H + h) * NQB + qb).to(tl.int64) * NKB + kb
            # programs sharing a query block only ever write 1 into a zeroed buffer
            tl.store(st_ptr, need_any.to(tl.uint8), mask=(sub == SPLIT_N - 1) & (need_any > 0))
        m_new = tl.maximum(m_i, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=offs_n[:, None] < Nk, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out = tl.where(has[:, None], out, 0.0)
    if HAS_MIX:
        u = tl.load(MixU + h)
        vrow = tl.load(
            v_base + offs_m[:, None] * svn + offs_dv[None, :] * svd, mask=offs_m[:, None] < Nq, other=0.0
        ).to(tl.float32)
        out = (1.0 - u) * out + u * vrow
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Nq)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


def _dummy(device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=device)


def _mod_args(modifiers: tuple, nq: int, nk: int, heads: int, device: torch.device):
    decay, mix = check_modifiers(modifiers, nq, nk, heads)
    if decay is not None:
        qp, kp = decay.positions(nq, nk, device)
        dargs = (decay.factors(heads).to(device), int(decay.threshold), qp.contiguous(), kp.contiguous())
    else:
        dargs = (_dummy(device, torch.float32), 0, _dummy(device), _dummy(device))
    margs = mix.weights(heads).to(device) if mix is not None else _dummy(device, torch.float32)
    return decay, mix, dargs, margs


def pick_tiles(kind: str, block_q: int, block_k: int, d: int, dv: int, dtype: torch.dtype) -> dict:
    """Kernel tile of one program and its launch options, for a layout's (block_q, block_k).

    The kernels split a layout block into ``SPLIT_M x SPLIT_N`` sub-tiles of ``BLOCK_M x BLOCK_N``
    (the layout only decides which blocks are visited), so 128x128 layouts run with tiles that
    fit the registers and shared memory. kind: "fwd" (rows per program x keys per step), "dkdv"
    (query rows per step x keys per program) or "dq" (rows per program x keys per step).
    Chosen from sm_90 compiles (no register spills, shared memory well under 227 KiB).
    """
    if dtype == torch.float32:  # 4-byte operands (GPU fp32 is a debugging path): small tiles
        bm, bn, stages = 64, 32, 2
    elif kind == "fwd":
        bm, bn, stages = 128, 64, 3
    elif kind == "dkdv":  # keys per program x (k, v, dk, dv) in registers: few query rows per step
        bm, bn, stages = (32 if max(d, dv) > 64 else 64), 64, 2
    else:  # dq
        bm, bn, stages = 128, 64, 2
    bm, bn = min(bm, block_q), min(bn, block_k)
    if dtype == torch.float32:
        warps = 4
    elif kind == "dkdv":
        warps = 8 if bm * bn >= 32 * 64 else 4
    else:
        warps = 8 if bm >= 128 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT_M=block_q // bm, SPLIT_N=block_k // bn, num_warps=warps, num_stages=stages)


def _check(q: torch.Tensor, v: torch.Tensor) -> None:
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"Triton attention: head dim must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Triton attention: dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")


def _dense_block(n: int) -> int:
    return 128 if n >= 128 else 64 if n >= 64 else 16


def _layout_args(layout: BlockLayout | None, nq: int, nk: int, device: torch.device) -> tuple:
    if layout is None:
        layout = BlockLayout.dense(nq, nk, _dense_block(nq), _dense_block(nk)).to(device)
    has_mask = layout.partial is not None
    partial = layout.partial if has_mask else _dummy(device)
    elem = layout.elem_mask if has_mask else _dummy(device)
    return layout, has_mask, partial, elem


def triton_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
    tile_stats: TileStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel: returns (out [B,H,Nq,Dv] in q.dtype, lse [B,H,Nq] fp32, natural log)."""
    _check(q, v)
    B, H, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    layout, has_mask, partial, elem = _layout_args(layout, nq, nk, q.device)
    decay, mix, dargs, margs = _mod_args(tuple(modifiers), nq, nk, H, q.device)
    out = torch.empty(B, H, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, nq, dtype=torch.float32, device=q.device)
    nqb, nkb = layout.num_q_blocks, layout.num_k_blocks
    if tile_stats is not None:
        stats = torch.zeros(B, H, nqb, nkb, dtype=torch.uint8, device=q.device)
        stats_thr = float(tile_stats.threshold)
    else:
        stats, stats_thr = _dummy(q.device, torch.uint8), 0.0
    tiles = pick_tiles("fwd", layout.block_q, layout.block_k, d, dv, q.dtype)
    grid = (nqb * tiles["SPLIT_M"], B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        layout.row_ptr, layout.col_idx, partial, elem,
        *dargs, margs, stats, stats_thr,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, nq, nk, nqb, nkb, layout.batch, layout.heads, scale * _LOG2E,
        HEAD_D=d, HEAD_DV=dv, WORDS=-(-layout.block_k // 32), HAS_MASK=has_mask, HAS_DECAY=decay is not None,
        HAS_MIX=mix is not None, HAS_STATS=tile_stats is not None, **tiles,
    )  # fmt: skip
    if tile_stats is not None:
        tile_stats.needed = stats
    return out, lse


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, Delta, DK, DV,
    ColPtr, RowIdx, Entry, Partial, ElemMask,
    DecayF, decay_thr, QPos, KPos,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    H, Nq, Nk, NQB, NKB, LB, LH, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    WORDS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DECAY: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_N keys of a layout key block; walks the CSC column's query blocks in
    # BLOCK_M-row sub-tiles.
    BLOCK_Q: tl.constexpr = BLOCK_M * SPLIT_M
    BLOCK_K: tl.constexpr = BLOCK_N * SPLIT_N
    pid = tl.program_id(0)
    kb = pid // SPLIT_N
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bl = tl.where(LB > 1, b, 0)
    hl = tl.where(LH > 1, h, 0)
    col = (bl * LH + hl) * NKB + kb
    start = tl.load(ColPtr + col)
    end = tl.load(ColPtr + col + 1)
    offs_c = (pid % SPLIT_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = kb * BLOCK_K + offs_c
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    k = tl.load(
        K + b64 * skb + h64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=offs_n[:, None] < Nk, other=0.0
    )
    v = tl.load(
        V + b64 * svb + h64 * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=offs_n[:, None] < Nk, other=0.0
    )
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DV], tl.float32)
    for it in range(start * SPLIT_M, end * SPLIT_M):
        j = it // SPLIT_M
        qb = tl.load(RowIdx + j)
        idx = tl.load(Entry + j)
        offs_r = (it % SPLIT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m = qb * BLOCK_Q + offs_r
        mrow = offs_m < Nq
        q = tl.load(
            Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=mrow[:, None], other=0.0
        )
        do = tl.load(
            DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
            mask=mrow[:, None],
            other=0.0,
        )
        lse2 = tl.load(LSE2 + bh.to(tl.int64) * Nq + offs_m, mask=mrow, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * Nq + offs_m, mask=mrow, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s, gate = _score_hook(
            s, offs_m, offs_n, offs_r, offs_c, idx, h, Nq, Nk, Partial, ElemMask, DecayF, decay_thr, QPos, KPos,
            BLOCK_Q, BLOCK_M, BLOCK_N, WORDS, HAS_MASK, HAS_DECAY,
        )  # fmt: skip
        p = tl.exp2(s - lse2[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None]) * gate
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    dk = dk * scale
    mk = offs_n[:, None] < Nk
    tl.store(DK + bh.to(tl.int64) * Nk * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :], dk, mask=mk)
    tl.store(DV + bh.to(tl.int64) * Nk * HEAD_DV + offs_n[:, None] * HEAD_DV + offs_dv[None, :], dv, mask=mk)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, Delta, DQ,
    RowPtr, ColIdx, Partial, ElemMask,
    DecayF, decay_thr, QPos, KPos,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    H, Nq, Nk, NQB, NKB, LB, LH, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    WORDS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DECAY: tl.constexpr,
):  # fmt: skip
    BLOCK_Q: tl.constexpr = BLOCK_M * SPLIT_M
    BLOCK_K: tl.constexpr = BLOCK_N * SPLIT_N
    pid = tl.program_id(0)
    qb = pid // SPLIT_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bl = tl.where(LB > 1, b, 0)
    hl = tl.where(LH > 1, h, 0)
    row = (bl * LH + hl) * NQB + qb
    start = tl.load(RowPtr + row)
    end = tl.load(RowPtr + row + 1)
    offs_r = (pid % SPLIT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_Q + offs_r
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    mrow = offs_m < Nq
    q = tl.load(
        Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=mrow[:, None], other=0.0
    )
    do = tl.load(
        DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod, mask=mrow[:, None], other=0.0
    )
    lse2 = tl.load(LSE2 + bh.to(tl.int64) * Nq + offs_m, mask=mrow, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Nq + offs_m, mask=mrow, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    for it in range(start * SPLIT_N, end * SPLIT_N):
        idx = it // SPLIT_N
        kb = tl.load(ColIdx + idx)
        offs_c = (it % SPLIT_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = kb * BLOCK_K + offs_c
        mk = offs_n[:, None] < Nk
        k = tl.load(K + b64 * skb + h64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mk, other=0.0)
        v = tl.load(V + b64 * svb + h64 * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=mk, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s, gate = _score_hook(
            s, offs_m, offs_n, offs_r, offs_c, idx, h, Nq, Nk, Partial, ElemMask, DecayF, decay_thr, QPos, KPos,
            BLOCK_Q, BLOCK_M, BLOCK_N, WORDS, HAS_MASK, HAS_DECAY,
        )  # fmt: skip
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None]) * gate
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    dq = dq * scale
    tl.store(DQ + bh.to(tl.int64) * Nq * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :], dq, mask=mrow[:, None])


def triton_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BlockLayout | None,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 style backward of `triton_attention_forward`: returns (dq, dk, dv)."""
    _check(q, v)
    B, H, nq, d = q.shape
    nk, dv_dim = k.shape[2], v.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    layout, has_mask, partial, elem = _layout_args(layout, nq, nk, q.device)
    decay, mix, dargs, _ = _mod_args(tuple(modifiers), nq, nk, H, q.device)
    do = grad_out.to(q.dtype).contiguous()
    if mix is not None:  # out = (1-u)·attn + u·v: attention sees (1-u)·dO; delta uses out - u·v
        u = mix.weights(H).to(q.device).view(1, H, 1, 1)
        delta = (do.float() * (out.float() - u * v.float())).sum(-1)
        do_a = ((1 - u) * do.float()).to(q.dtype).contiguous()
    else:
        delta = (do.float() * out.float()).sum(-1)
        do_a = do
    delta = delta.contiguous()
    lse2 = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse * _LOG2E).contiguous()
    dq = torch.empty(B, H, nq, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(B, H, nk, d, dtype=torch.float32, device=q.device)
    dv = torch.empty(B, H, nk, dv_dim, dtype=torch.float32, device=q.device)
    nqb, nkb = layout.num_q_blocks, layout.num_k_blocks
    col_ptr, row_idx, entry = layout.transpose()
    common = dict(
        HEAD_D=d, HEAD_DV=dv_dim, WORDS=-(-layout.block_k // 32), HAS_MASK=has_mask, HAS_DECAY=decay is not None,
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *do_a.stride())
    dims = (H, nq, nk, nqb, nkb, layout.batch, layout.heads, scale * _LOG2E, scale)
    t_kv = pick_tiles("dkdv", layout.block_q, layout.block_k, d, dv_dim, q.dtype)
    _bwd_dkdv_kernel[(nkb * t_kv["SPLIT_N"], B * H)](
        q, k, v, do_a, lse2, delta, dk, dv, col_ptr, row_idx, entry, partial, elem, *dargs, *strides, *dims,
        **common, **t_kv,
    )  # fmt: skip
    t_q = pick_tiles("dq", layout.block_q, layout.block_k, d, dv_dim, q.dtype)
    _bwd_dq_kernel[(nqb * t_q["SPLIT_M"], B * H)](
        q, k, v, do_a, lse2, delta, dq, layout.row_ptr, layout.col_idx, partial, elem, *dargs, *strides, *dims,
        **common, **t_q,
    )  # fmt: skip
    if mix is not None:
        dv = dv + u * do.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

"""Triton block-sparse FlashAttention: forward and backward.

In the style of the Triton tutorials' fused attention and FlexAttention's block split: one
program per (BLOCK_M query rows, batch*head) walks the key blocks its layout row lists, as
``BLOCK_N``-wide kernel tiles (a 128-token layout block is several tiles: the layout says which
blocks are visited, the kernel's tile is tuned on its own). It walks two lists of the layout's
`KernelLayout`: *partial* blocks first (element mask expanded from compact bit words in
registers, key bounds of the ragged tail block), then *full* blocks (no mask memory, no bounds
checks). Online softmax in the exp2 domain with fp32 accumulation. LiteAttention's tile
statistics need the blocks in ascending key order, so that mode walks the merged list and
branches per block. Score modifiers (UltraViCo's `LogitDecay`) live in `_score_mod` and
`OutputMix` (SoftPAG) in the epilogue, so the loops never change when a modifier is added. The
backward pass is FlashAttention-2's: a dK/dV kernel per key tile walking the per-column lists,
a dQ kernel per query tile walking the per-row lists.

Tiles: each kernel has a candidate table per (head dim, dtype) (`CANDIDATES`), every entry
compiled for sm_90a without register spills and within the H100's shared memory
(`python -m attn_kernels.static_check`). On a GPU the candidates are autotuned per key (set
``ATTNPLUG_AUTOTUNE=0`` to take the table's first fitting entry); elsewhere (the interpreter)
the table's first entry runs. Head dims up to 256 run padded to the next power of two (masked
loads). fp16 / bf16 run on tensor cores with fp32 accumulation. fp32 inputs run on tensor cores
too: in 3xTF32 (about fp32 accuracy) for head dims up to 64, in TF32 (inputs rounded to 10-bit
mantissas, about 1e-3 relative error, like torch's ``allow_tf32``) above, where 3xTF32 needs
more registers than a thread has; fp32 is for debugging, bf16/fp16 for speed.

On CPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` (tests); there bf16
is unreliable, so tests use fp32/fp16 there and bf16 on the GPU.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .backends import SizeRule, register_backend
from .launch_config import LaunchConfig
from .layout import BlockLayout, KernelLayout
from .modifiers import prepare_modifiers

__all__ = [
    "CANDIDATES",
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "pick_tiles",
    "static_configs",
    "triton_attention_backward",
    "triton_attention_forward",
]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _ld(ptr, m0, m1, USE0: tl.constexpr, USE1: tl.constexpr):
    """Load with zero fill under the masks that are in use (constexpr: unused masks cost nothing)."""
    if USE0 and USE1:
        x = tl.load(ptr, mask=m0 & m1, other=0.0)
    elif USE0:
        x = tl.load(ptr, mask=m0, other=0.0)
    elif USE1:
        x = tl.load(ptr, mask=m1, other=0.0)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _idx(offs, IDX64: tl.constexpr):
    """Token offsets as int64 when the launch's sizes need it (a row stride of H*D makes
    ``offs * stride`` pass 2**31 at about 420K tokens for 40 heads x 128), else int32."""
    if IDX64:
        return offs.to(tl.int64)
    else:
        return offs


@triton.jit
def _score_mod(s, qp, kp, f, decay_thr, HAS_DECAY: tl.constexpr):
    """Score modifiers, each behind its constexpr flag; returns (scores, gate = ds/ds_raw).

    s: raw fp32 logits q.k (the softmax scale is applied later in one multiply-add: every modifier
    here is positively homogeneous, so it commutes with the scale); qp / kp: query / key positions
    shaped to broadcast against s ([BM, 1] and [1, BN], or transposed). LogitDecay (UltraViCo):
    s <- f * s where s > 0 and |qp - kp| > thr, positions < 0 exempt."""
    gate = 1.0
    if HAS_DECAY:
        far = (tl.abs(qp - kp) > decay_thr) & (qp >= 0) & (kp >= 0) & (s > 0)
        gate = tl.where(far, f, 1.0)
        s = s * gate
    return s, gate


@triton.jit
def _block_valid(
    pidx,  # element-mask index of the block (-1: none)
    offs_r,  # [BM] rows within the layout block
    offs_c,  # [BN] columns within the layout block
    offs_n,  # [BN] key token index
    Nk,
    ElemMask,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TRANS: tl.constexpr,
):
    """Visibility inside a partial block, [BM, BN] (or [BN, BM] when TRANS): key bounds and the
    element mask, expanded in registers from BLOCK_M x ceil(BLOCK_N / 32) int32 words (one load
    per row and word, never one per element)."""
    WORDS: tl.constexpr = (BLOCK_K + 31) // 32
    WPT: tl.constexpr = (BLOCK_N + 31) // 32
    w0 = tl.min(offs_c, 0) // 32
    has = pidx >= 0
    base = ElemMask + tl.maximum(pidx, 0).to(tl.int64) * (BLOCK_Q * WORDS) + offs_r * WORDS + w0
    word = tl.load(base, mask=has, other=-1)  # [BM]
    wsel = (offs_c // 32) - w0
    if TRANS:
        words = tl.broadcast_to(word[None, :], [BLOCK_N, BLOCK_M])
        for i in tl.static_range(1, WPT):
            words = tl.where((wsel == i)[:, None], tl.load(base + i, mask=has, other=-1)[None, :], words)
        bit = (words >> (offs_c % 32)[:, None]) & 1
        valid = (bit != 0) & (offs_n < Nk)[:, None]
    else:
        words = tl.broadcast_to(word[:, None], [BLOCK_M, BLOCK_N])
        for i in tl.static_range(1, WPT):
            words = tl.where((wsel == i)[None, :], tl.load(base + i, mask=has, other=-1)[:, None], words)
        bit = (words >> (offs_c % 32)[None, :]) & 1
        valid = (bit != 0) & (offs_n < Nk)[None, :]
    return valid


@triton.jit
def _lse2(LSE, off, mask):
    """Row log-sum-exp in the exp2 domain; +inf for rows that saw no key (so p = 0 there)."""
    lse = tl.load(LSE + off, mask=mask, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, need, m_before,
    q, qp, offs_r, offs_m, k_base, v_base, skn, skd, svn, svd, offs_d, offs_dv,
    Begin, End, Idx, Mask, row, ElemMask, KPos, Stats, stats_row, stats_thr,
    Nq, Nk, NKB, qk_scale, f, decay_thr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, MODE: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PREC: tl.constexpr, DENSE: tl.constexpr,
    IDX64: tl.constexpr,
):  # fmt: skip
    """Walk one list of a query tile's row. MODE 0: full blocks (no masks, no bounds), 1: partial
    blocks, 2: every block in ascending key order, masked per block (tile statistics).
    A layout block is SPLIT kernel tiles (compile-time: the divisions below are shifts)."""
    SPLIT: tl.constexpr = BLOCK_K // BLOCK_N
    tail_kb = tl.where(Nk % BLOCK_K != 0, NKB - 1, -1)
    if DENSE:  # no lists: keys [0, NKB), the ragged tail block is the partial one
        nfull = tl.where(tail_kb >= 0, NKB - 1, NKB)
        begin = tl.where(MODE == 1, nfull, 0)
        end = tl.where(MODE == 0, nfull, NKB)
    else:
        begin = tl.load(Begin + row)
        end = tl.load(End + row)
    for it in range(begin * SPLIT, end * SPLIT):
        e = it // SPLIT
        sub = it % SPLIT
        if DENSE:
            kb = e
        else:
            kb = tl.load(Idx + e)
        offs_c = sub * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = kb * BLOCK_K + offs_c
        in_n = offs_n < Nk
        offs_nx = _idx(offs_n, IDX64)
        k = _ld(k_base + offs_nx[None, :] * skn + offs_d[:, None] * skd, in_n[None, :], offs_d[:, None] < D,
                MODE != 0, D != HEAD_D)  # fmt: skip
        v = _ld(v_base + offs_nx[:, None] * svn + offs_dv[None, :] * svd, in_n[:, None], offs_dv[None, :] < DV,
                MODE != 0, DV != HEAD_DV)  # fmt: skip
        s = tl.dot(q, k, input_precision=DOT_PREC)  # raw logits: the scale goes into the exp2's FMA
        if HAS_DECAY:
            kp = tl.load(KPos + offs_n, mask=in_n, other=-1)
            s, _g = _score_mod(s, qp[:, None], kp[None, :], f, decay_thr, HAS_DECAY)
        if MODE == 1:
            pidx = -1 if DENSE else tl.load(Mask + e)
            valid = _block_valid(pidx, offs_r, offs_c, offs_n, Nk, ElemMask, BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N,
                                 False)  # fmt: skip
            s = tl.where(valid, s, float("-inf"))
        if MODE == 2:
            pidx = -1 if DENSE else tl.load(Mask + e)
            if (pidx >= 0) | (kb == tail_kb):
                valid = _block_valid(
                    pidx, offs_r, offs_c, offs_n, Nk, ElemMask, BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, False
                )
                s = tl.where(valid, s, float("-inf"))
        tile_max = tl.max(s, 1) * qk_scale  # scale > 0: max commutes with it
        if HAS_STATS:
            # needed <=> some valid row has (block max - running max before the block) > thr; the
            # block max is the max of its tiles, so OR the per-tile test against m_before
            m_before = tl.where(sub == 0, m_i, m_before)
            cond = ((tile_max > m_before + stats_thr) & (offs_m < Nq)).to(tl.int32)  # no -inf - -inf
            need = tl.where(sub == 0, cond, tl.maximum(need, cond))
            need_any = tl.max(need, 0)
            # programs sharing a query block only ever write 1 into a zeroed buffer
            tl.store(Stats + stats_row + kb, need_any.to(tl.uint8), mask=(sub == SPLIT - 1) & (need_any > 0))
        m_new = tl.maximum(m_i, tile_max)
        if MODE == 0:  # scores of full blocks are finite, so m_new is
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        else:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i, need, m_before


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    FullB, FullE, FullIdx, PartB, PartE, PartIdx, PartMask, ElemMask,
    DecayF, decay_thr, QPos, KPos, MixU, Stats, stats_thr,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, Nq, Nk, NQB, NKB, LB, LH, qk_scale, TUNE_NQ, TUNE_NK,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_MIX: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PREC: tl.constexpr,
    DENSE: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_M rows of a layout query block (BLOCK_Q rows); with HAS_STATS the
    Part* arguments carry the merged list; DENSE: no layout lists (every key block). TUNE_NQ /
    TUNE_NK: the lengths rounded up to a power of two, read only by the autotuner's key."""
    SPLIT_M: tl.constexpr = BLOCK_Q // BLOCK_M
    pid = tl.program_id(0)
    qb = pid // SPLIT_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bl = tl.where(LB > 1, b, 0)
    hl = tl.where(LH > 1, h, 0)
    row = (bl * LH + hl) * NQB + qb
    offs_r = (pid % SPLIT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_Q + offs_r
    offs_mx = _idx(offs_m, IDX64)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    in_m = offs_m < Nq
    q = _ld(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_mx[:, None] * sqm + offs_d[None, :] * sqd,
            in_m[:, None], offs_d[None, :] < D, True, D != HEAD_D)  # fmt: skip
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    if HAS_DECAY:
        f = tl.load(DecayF + h)
        qp = tl.load(QPos + offs_m, mask=in_m, other=-1)
    else:
        f = 1.0
        qp = offs_m
    stats_row = ((b * H + h) * NQB + qb).to(tl.int64) * NKB

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    need = tl.zeros([BLOCK_M], tl.int32)
    m_before = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if HAS_STATS:
        acc, l_i, m_i, need, m_before = _fwd_inner(
            acc, l_i, m_i, need, m_before, q, qp, offs_r, offs_m, k_base, v_base, skn, skd, svn, svd, offs_d, offs_dv,
            PartB, PartE, PartIdx, PartMask, row, ElemMask, KPos, Stats, stats_row, stats_thr,
            Nq, Nk, NKB, qk_scale, f, decay_thr,
            BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, D, DV, HEAD_D, HEAD_DV, 2, HAS_DECAY, True, DOT_PREC, DENSE, IDX64,
        )  # fmt: skip
    else:
        acc, l_i, m_i, need, m_before = _fwd_inner(
            acc, l_i, m_i, need, m_before, q, qp, offs_r, offs_m, k_base, v_base, skn, skd, svn, svd, offs_d, offs_dv,
            PartB, PartE, PartIdx, PartMask, row, ElemMask, KPos, Stats, stats_row, stats_thr,
            Nq, Nk, NKB, qk_scale, f, decay_thr,
            BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, D, DV, HEAD_D, HEAD_DV, 1, HAS_DECAY, False, DOT_PREC, DENSE, IDX64,
        )  # fmt: skip
        acc, l_i, m_i, need, m_before = _fwd_inner(
            acc, l_i, m_i, need, m_before, q, qp, offs_r, offs_m, k_base, v_base, skn, skd, svn, svd, offs_d, offs_dv,
            FullB, FullE, FullIdx, PartMask, row, ElemMask, KPos, Stats, stats_row, stats_thr,
            Nq, Nk, NKB, qk_scale, f, decay_thr,
            BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, D, DV, HEAD_D, HEAD_DV, 0, HAS_DECAY, False, DOT_PREC, DENSE, IDX64,
        )  # fmt: skip

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out = tl.where(has[:, None], out, 0.0)
    if HAS_MIX:
        u = tl.load(MixU + h)
        vrow = _ld(v_base + offs_mx[:, None] * svn + offs_dv[None, :] * svd, in_m[:, None], offs_dv[None, :] < DV,
                   True, DV != HEAD_DV).to(tl.float32)  # fmt: skip
        out = (1.0 - u) * out + u * vrow
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_mx[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_m[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse, mask=in_m)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta_kernel(
    O, DO, V, MixU, Delta,
    sob, soh, som, sod,
    sdob, sdoh, sdom, sdod,
    svb, svh, svn, svd,
    H, Nq,
    BLOCK_M: tl.constexpr, DV: tl.constexpr, HEAD_DV: tl.constexpr, HAS_MIX: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * A_id in fp32, A the attention output before OutputMix
    (A = (out - u v) / (1 - u), so the (1 - u) factor of dA = (1 - u) dO cancels): one read of
    dO and out, no fp32 copies on the host."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_mx = _idx(offs_m, IDX64)
    offs_dv = tl.arange(0, HEAD_DV)
    in_m = offs_m < Nq
    o = _ld(O + b * sob + h * soh + offs_mx[:, None] * som + offs_dv[None, :] * sod, in_m[:, None],
            offs_dv[None, :] < DV, True, DV != HEAD_DV).to(tl.float32)  # fmt: skip
    do = _ld(DO + b * sdob + h * sdoh + offs_mx[:, None] * sdom + offs_dv[None, :] * sdod, in_m[:, None],
             offs_dv[None, :] < DV, True, DV != HEAD_DV).to(tl.float32)  # fmt: skip
    if HAS_MIX:
        u = tl.load(MixU + h)
        v = _ld(V + b * svb + h * svh + offs_mx[:, None] * svn + offs_dv[None, :] * svd, in_m[:, None],
                offs_dv[None, :] < DV, True, DV != HEAD_DV).to(tl.float32)  # fmt: skip
        o = o - u * v
    tl.store(Delta + bh.to(tl.int64) * Nq + offs_m, tl.sum(o * do, 1), mask=in_m)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, kp, offs_c, offs_n, q_base, do_base, sqm, sqd, sdom, sdod, offs_d, offs_dv,
    LSE, Delta, bh, Begin, End, Idx, Mask, col, kb, ElemMask, QPos,
    Nq, Nk, NQB, NKB, qk_scale, f, decay_thr, cmix,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, MODE: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_MIX: tl.constexpr, DOT_PREC: tl.constexpr, DENSE: tl.constexpr,
    IDX64: tl.constexpr,
):  # fmt: skip
    """dK/dV of one key tile over one list (MODE 0 full, 1 partial) of its column, computed
    transposed (rows = keys) as in the Triton tutorial, so no register tile is transposed.
    cmix = 1 - u with OutputMix: dA = (1 - u) dO, applied to dO·Vᵀ and (by the caller) to dV."""
    SPLIT: tl.constexpr = BLOCK_Q // BLOCK_M
    if DENSE:  # every query block; the ragged tail key block's column is the partial one
        is_tail = (Nk % BLOCK_K != 0) & (kb == NKB - 1)
        begin = 0
        end = tl.where(is_tail == (MODE == 1), NQB, 0)
    else:
        begin = tl.load(Begin + col)
        end = tl.load(End + col)
    for it in range(begin * SPLIT, end * SPLIT):
        e = it // SPLIT
        if DENSE:
            qb = e
        else:
            qb = tl.load(Idx + e)
        offs_r = (it % SPLIT) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m = qb * BLOCK_Q + offs_r
        in_m = offs_m < Nq
        offs_mx = _idx(offs_m, IDX64)
        qT = _ld(
            q_base + offs_mx[None, :] * sqm + offs_d[:, None] * sqd,
            in_m[None, :],
            offs_d[:, None] < D,
            True,
            D != HEAD_D,
        )  # fmt: skip  [HEAD_D, BM]
        do = _ld(
            do_base + offs_mx[:, None] * sdom + offs_dv[None, :] * sdod,
            in_m[:, None],
            offs_dv[None, :] < DV,
            True,
            DV != HEAD_DV,
        )  # fmt: skip  [BM, HEAD_DV]
        lse2 = _lse2(LSE, bh.to(tl.int64) * Nq + offs_m, in_m)
        delta = tl.load(Delta + bh.to(tl.int64) * Nq + offs_m, mask=in_m, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PREC)  # [BN, BM], raw logits
        gate = 1.0
        if HAS_DECAY:
            qp = tl.load(QPos + offs_m, mask=in_m, other=-1)
            sT, gate = _score_mod(sT, qp[None, :], kp[:, None], f, decay_thr, HAS_DECAY)
        if MODE == 1:
            pidx = -1 if DENSE else tl.load(Mask + e)
            valid = _block_valid(pidx, offs_r, offs_c, offs_n, Nk, ElemMask, BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N,
                                 True)  # fmt: skip
            sT = tl.where(valid, sT, float("-inf"))
        pT = tl.exp2(sT * qk_scale - lse2[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if HAS_MIX:
            dpT = dpT * cmix
        dsT = pT * (dpT - delta[None, :]) * gate
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DKo, DVo,
    TFullB, TFullE, TFullIdx, TPartB, TPartE, TPartIdx, TPartMask, ElemMask,
    DecayF, decay_thr, QPos, KPos, MixU,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    H, Nq, Nk, NQB, NKB, LB, LH, qk_scale, scale, TUNE_NQ, TUNE_NK,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_MIX: tl.constexpr,
    DOT_PREC: tl.constexpr, DENSE: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_N keys of a layout key block (BLOCK_K keys), accumulating dK and dV over
    the query blocks of its column in BLOCK_M-row tiles; writes them in the inputs' dtype."""
    SPLIT_N: tl.constexpr = BLOCK_K // BLOCK_N
    pid = tl.program_id(0)
    kb = pid // SPLIT_N
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bl = tl.where(LB > 1, b, 0)
    hl = tl.where(LH > 1, h, 0)
    col = (bl * LH + hl) * NKB + kb
    offs_c = (pid % SPLIT_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = kb * BLOCK_K + offs_c
    offs_nx = _idx(offs_n, IDX64)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    in_n = offs_n < Nk
    k = _ld(K + b64 * skb + h64 * skh + offs_nx[:, None] * skn + offs_d[None, :] * skd, in_n[:, None],
            offs_d[None, :] < D, True, D != HEAD_D)  # fmt: skip
    v = _ld(V + b64 * svb + h64 * svh + offs_nx[:, None] * svn + offs_dv[None, :] * svd, in_n[:, None],
            offs_dv[None, :] < DV, True, DV != HEAD_DV)  # fmt: skip
    if HAS_DECAY:
        f = tl.load(DecayF + h)
        kp = tl.load(KPos + offs_n, mask=in_n, other=-1)
    else:
        f = 1.0
        kp = offs_n
    if HAS_MIX:
        u = tl.load(MixU + h)
    else:
        u = 0.0
    cmix = 1.0 - u
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdob + h64 * sdoh
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DV], tl.float32)
    dk, dv = _dkdv_inner(
        dk, dv, k, v, kp, offs_c, offs_n, q_base, do_base, sqm, sqd, sdom, sdod, offs_d, offs_dv,
        LSE, Delta, bh, TPartB, TPartE, TPartIdx, TPartMask, col, kb, ElemMask, QPos,
        Nq, Nk, NQB, NKB, qk_scale, f, decay_thr, cmix,
        BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, D, DV, HEAD_D, HEAD_DV, 1, HAS_DECAY, HAS_MIX, DOT_PREC, DENSE, IDX64,
    )  # fmt: skip
    dk, dv = _dkdv_inner(
        dk, dv, k, v, kp, offs_c, offs_n, q_base, do_base, sqm, sqd, sdom, sdod, offs_d, offs_dv,
        LSE, Delta, bh, TFullB, TFullE, TFullIdx, TPartMask, col, kb, ElemMask, QPos,
        Nq, Nk, NQB, NKB, qk_scale, f, decay_thr, cmix,
        BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, D, DV, HEAD_D, HEAD_DV, 0, HAS_DECAY, HAS_MIX, DOT_PREC, DENSE, IDX64,
    )  # fmt: skip
    dk = dk * scale
    if HAS_MIX:  # out = (1 - u) A + u V: dV = (1 - u) PᵀdO + u dO (query i = key i)
        do_n = _ld(do_base + offs_nx[:, None] * sdom + offs_dv[None, :] * sdod, in_n[:, None], offs_dv[None, :] < DV,
                   True, DV != HEAD_DV).to(tl.float32)  # fmt: skip
        dv = dv * cmix + u * do_n
    mk = in_n[:, None]
    dk_ptrs = DKo + bh.to(tl.int64) * Nk * D + offs_nx[:, None] * D + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DKo.dtype.element_ty), mask=mk & (offs_d[None, :] < D))
    dv_ptrs = DVo + bh.to(tl.int64) * Nk * DV + offs_nx[:, None] * DV + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DVo.dtype.element_ty), mask=mk & (offs_dv[None, :] < DV))


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, qp, offs_r, k_base, v_base, skn, skd, svn, svd, offs_d, offs_dv,
    Begin, End, Idx, Mask, row, ElemMask, KPos,
    Nk, NKB, qk_scale, f, decay_thr, cmix,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, MODE: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_MIX: tl.constexpr, DOT_PREC: tl.constexpr, DENSE: tl.constexpr,
    IDX64: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile over one list (MODE 0 full, 1 partial) of its row."""
    SPLIT: tl.constexpr = BLOCK_K // BLOCK_N
    if DENSE:
        nfull = tl.where(Nk % BLOCK_K != 0, NKB - 1, NKB)
        begin = tl.where(MODE == 1, nfull, 0)
        end = tl.where(MODE == 0, nfull, NKB)
    else:
        begin = tl.load(Begin + row)
        end = tl.load(End + row)
    for it in range(begin * SPLIT, end * SPLIT):
        e = it // SPLIT
        if DENSE:
            kb = e
        else:
            kb = tl.load(Idx + e)
        offs_c = (it % SPLIT) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = kb * BLOCK_K + offs_c
        in_n = offs_n < Nk
        offs_nx = _idx(offs_n, IDX64)
        kT = _ld(
            k_base + offs_nx[None, :] * skn + offs_d[:, None] * skd,
            in_n[None, :],
            offs_d[:, None] < D,
            MODE != 0,
            D != HEAD_D,
        )  # fmt: skip  [HEAD_D, BN]
        vT = _ld(
            v_base + offs_nx[None, :] * svn + offs_dv[:, None] * svd,
            in_n[None, :],
            offs_dv[:, None] < DV,
            MODE != 0,
            DV != HEAD_DV,
        )  # fmt: skip  [HEAD_DV, BN]
        s = tl.dot(q, kT, input_precision=DOT_PREC)
        gate = 1.0
        if HAS_DECAY:
            kp = tl.load(KPos + offs_n, mask=in_n, other=-1)
            s, gate = _score_mod(s, qp[:, None], kp[None, :], f, decay_thr, HAS_DECAY)
        if MODE == 1:
            pidx = -1 if DENSE else tl.load(Mask + e)
            valid = _block_valid(pidx, offs_r, offs_c, offs_n, Nk, ElemMask, BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N,
                                 False)  # fmt: skip
            s = tl.where(valid, s, float("-inf"))
        p = tl.exp2(s * qk_scale - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        if HAS_MIX:
            dp = dp * cmix
        ds = p * (dp - delta[:, None]) * gate
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ,
    FullB, FullE, FullIdx, PartB, PartE, PartIdx, PartMask, ElemMask,
    DecayF, decay_thr, QPos, KPos, MixU,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    H, Nq, Nk, NQB, NKB, LB, LH, qk_scale, scale, TUNE_NQ, TUNE_NK,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_MIX: tl.constexpr,
    DOT_PREC: tl.constexpr, DENSE: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_M rows of a layout query block; walks its row's key tiles."""
    SPLIT_M: tl.constexpr = BLOCK_Q // BLOCK_M
    pid = tl.program_id(0)
    qb = pid // SPLIT_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bl = tl.where(LB > 1, b, 0)
    hl = tl.where(LH > 1, h, 0)
    row = (bl * LH + hl) * NQB + qb
    offs_r = (pid % SPLIT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_Q + offs_r
    offs_mx = _idx(offs_m, IDX64)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    in_m = offs_m < Nq
    q = _ld(Q + b64 * sqb + h64 * sqh + offs_mx[:, None] * sqm + offs_d[None, :] * sqd, in_m[:, None],
            offs_d[None, :] < D, True, D != HEAD_D)  # fmt: skip
    do = _ld(DO + b64 * sdob + h64 * sdoh + offs_mx[:, None] * sdom + offs_dv[None, :] * sdod, in_m[:, None],
             offs_dv[None, :] < DV, True, DV != HEAD_DV)  # fmt: skip
    lse2 = _lse2(LSE, bh.to(tl.int64) * Nq + offs_m, in_m)
    delta = tl.load(Delta + bh.to(tl.int64) * Nq + offs_m, mask=in_m, other=0.0)
    if HAS_DECAY:
        f = tl.load(DecayF + h)
        qp = tl.load(QPos + offs_m, mask=in_m, other=-1)
    else:
        f = 1.0
        qp = offs_m
    if HAS_MIX:
        cmix = 1.0 - tl.load(MixU + h)
    else:
        cmix = 1.0
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    dq = _dq_inner(
        dq, q, do, lse2, delta, qp, offs_r, k_base, v_base, skn, skd, svn, svd, offs_d, offs_dv,
        PartB, PartE, PartIdx, PartMask, row, ElemMask, KPos, Nk, NKB, qk_scale, f, decay_thr, cmix,
        BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, D, DV, HEAD_D, HEAD_DV, 1, HAS_DECAY, HAS_MIX, DOT_PREC, DENSE, IDX64,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, qp, offs_r, k_base, v_base, skn, skd, svn, svd, offs_d, offs_dv,
        FullB, FullE, FullIdx, PartMask, row, ElemMask, KPos, Nk, NKB, qk_scale, f, decay_thr, cmix,
        BLOCK_Q, BLOCK_K, BLOCK_M, BLOCK_N, D, DV, HEAD_D, HEAD_DV, 0, HAS_DECAY, HAS_MIX, DOT_PREC, DENSE, IDX64,
    )  # fmt: skip
    dq = dq * scale
    dq_ptrs = DQ + bh.to(tl.int64) * Nq * D + offs_mx[:, None] * D + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=in_m[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------- tiles
#: Kernel tiles per (kernel, operand width, padded head dim): (BLOCK_M, BLOCK_N, num_warps,
#: num_stages), best first. fwd / dq: BLOCK_M query rows per program, BLOCK_N keys per step;
#: dkdv: BLOCK_N keys per program, BLOCK_M query rows per step. Every entry compiles for sm_90a
#: with no register spills and fits the H100's shared memory, with every feature flag
#: (`python -m attn_kernels.static_check`); small entries serve layouts with small blocks.
CANDIDATES: dict[tuple[str, str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", "16", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 8, 2), (16, 16, 2, 2)],
    ("fwd", "16", 128): [
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (64, 64, 4, 2),
        (64, 32, 4, 2),
        (32, 32, 2, 2),
        (16, 16, 4, 2),
    ],
    ("fwd", "16", 256): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 8, 2)],
    ("fwd", "32", 64): [(64, 32, 4, 2), (32, 32, 8, 2), (16, 16, 4, 1)],
    ("fwd", "32", 128): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 8, 2)],
    ("fwd", "32", 256): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("dkdv", "16", 64): [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 2), (16, 32, 4, 2), (16, 16, 2, 2)],
    ("dkdv", "16", 128): [(32, 64, 8, 2), (32, 128, 8, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    ("dkdv", "16", 256): [(16, 64, 8, 2), (16, 32, 8, 2), (16, 16, 2, 2)],
    ("dkdv", "32", 64): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("dkdv", "32", 128): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("dkdv", "32", 256): [(16, 16, 8, 2)],
    ("dq", "16", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 2)],
    # 64x64 with 8 warps and 16x16 in one stage: with 4 warps / 2 stages both spill 8 B under Triton 3.6
    ("dq", "16", 128): [(128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    ("dq", "16", 256): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2)],
    ("dq", "32", 64): [(64, 32, 4, 2), (32, 32, 8, 2), (16, 16, 8, 2)],
    ("dq", "32", 128): [(16, 16, 4, 2)],
    ("dq", "32", 256): [(32, 32, 8, 2), (16, 16, 8, 2)],
}


#: Entries that spill with some features on together: the autotuner prunes them for launches
#: with all of those features, and the static check skips exactly those combinations.
#: (fwd 128x128 at d128: 255 registers; LogitDecay + OutputMix spill 20-24 B in the dense walk.)
EXCLUDED: dict[tuple[str, str, int, tuple[int, int, int, int]], tuple[str, ...]] = {
    ("fwd", "16", 128, (128, 128, 8, 3)): ("HAS_DECAY", "HAS_MIX"),
}


def _excluded(kind: str, width: str, hc: int, cand: tuple, flags: dict) -> bool:
    feats = EXCLUDED.get((kind, width, hc, tuple(cand)))
    return feats is not None and all(flags.get(f) for f in feats)


#: The backward's delta kernel (rows of dO * A summed): memory-bound, one tile for every shape.
DELTA_TILE = dict(BLOCK_M=64, num_warps=4, num_stages=1)


def _head_class(d: int, dv: int) -> int:
    m = max(d, dv)
    return 64 if m <= 64 else 128 if m <= 128 else 256


def _width(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def _fits(kind: str, c: tuple, block_q: int, block_k: int) -> bool:
    return c[0] <= block_q and c[1] <= block_k


@functools.cache
def pick_tiles(kind: str, block_q: int, block_k: int, d: int, dv: int, dtype: torch.dtype) -> dict:
    """The table's first entry that fits a layout's (block_q, block_k): the launch without autotuning."""
    for c in CANDIDATES[(kind, _width(dtype), _head_class(d, dv))]:
        if _fits(kind, c, block_q, block_k):
            return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
    raise AssertionError(f"no {kind} tile fits blocks ({block_q}, {block_k})")  # tables end with 16x16


def _autotune() -> bool:
    return os.environ.get("ATTNPLUG_AUTOTUNE", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


#: How many of the table's fitting candidates the autotuner times (each costs one compile, about
#: 2 s on sm_90a, on a length bucket's first call).
TUNE_TOP = int(os.environ.get("ATTNPLUG_TUNE_TOP", "3"))
_TUNERS: dict[tuple, object] = {}
#: The autotuner's key: lengths enter only as their power-of-two buckets (TUNE_NQ / TUNE_NK), so a
#: new length re-tunes only when it crosses a power of two.
_TUNE_KEY = ["BLOCK_Q", "BLOCK_K", "TUNE_NQ", "TUNE_NK", "D", "DV", "HAS_DECAY", "HAS_MIX", "DENSE", "IDX64"]
#: `triton.autotune(cache_results=...)` (tunings kept on disk) exists from Triton 3.4 on.
_AUTOTUNE_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def _tuner(kind: str, kernel, width: str, hc: int):
    """triton.autotune over the table's candidates, pruned to the layout's blocks (top TUNE_TOP)."""
    key = (kind, width, hc)
    if key not in _TUNERS:

        def prune(configs, named_args, **kwargs):
            flags = {**named_args, **kwargs}
            ok = [
                c for c in configs
                if _fits(kind, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]), flags["BLOCK_Q"], flags["BLOCK_K"])
                and not _excluded(kind, width, hc, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                    c.num_stages), flags)
            ]  # fmt: skip
            return ok[: max(1, TUNE_TOP)]

        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in CANDIDATES[key]
        ]
        extra = ["HAS_STATS"] if kind == "fwd" else []
        opts = {"cache_results": True} if _AUTOTUNE_CACHE else {}
        _TUNERS[key] = triton.autotune(
            configs=configs, key=_TUNE_KEY + extra, prune_configs_by={"early_config_prune": prune}, **opts
        )(kernel)
    return _TUNERS[key]


#: Test hook: when set, called as ``_LAUNCH_HOOK(kind, grid, args, meta)`` instead of launching
#: (the host-overhead benchmark stubs the launch with it).
_LAUNCH_HOOK = None


def _launch(kind: str, kernel, grid, args: tuple, meta: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Launch with autotuned tiles on a GPU, else the table's first fitting entry."""
    if _LAUNCH_HOOK is not None:
        _LAUNCH_HOOK(kind, grid, args, meta)
    elif kind == "delta":  # memory-bound row reduction: one fixed tile
        kernel[grid](*args, **meta, **DELTA_TILE)
    elif device.type == "cuda" and _autotune():
        _tuner(kind, kernel, _width(dtype), _head_class(meta["D"], meta["DV"]))[grid](*args, **meta)
    else:
        tiles = pick_tiles(kind, meta["BLOCK_Q"], meta["BLOCK_K"], meta["D"], meta["DV"], dtype)
        kernel[grid](*args, **meta, **tiles)


# ----------------------------------------------------------------------------- host entry points
def check_inputs(q: torch.Tensor, v: torch.Tensor) -> None:
    """Raise when the Triton kernels cannot run these tensors (head dim, dtype)."""
    if not (1 <= q.shape[-1] <= MAX_HEAD_DIM and 1 <= v.shape[-1] <= MAX_HEAD_DIM):
        raise ValueError(
            f"Triton attention: head dims must be in [1, {MAX_HEAD_DIM}], got q/k {q.shape[-1]} and v {v.shape[-1]}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Triton attention: dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()  # plain Python: triton's helper is slow in the interpreter


def _pad(d: int) -> int:
    return max(16, _pow2(d))


def _bucket(n: int) -> int:
    return max(16, _pow2(n))


def _dot_prec(dtype: torch.dtype, d: int, dv: int) -> str:
    """fp32 operands: 3xTF32 (about fp32 accuracy) up to head dim 64, TF32 (about 1e-3 relative)
    above, where 3xTF32's registers spill; 16-bit operands: plain tensor-core products."""
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit operands
    return "tf32x3" if max(d, dv) <= 64 else "tf32"


_DUMMIES: dict[tuple, tuple] = {}
#: forward launch plans (integer arguments, constexprs, grid) per shapes / strides / flags
_FWD_PLANS: dict[tuple, tuple] = {}


def _dummies(device: torch.device) -> tuple:
    """(int32, fp32, uint8) one-element placeholders for absent optional arguments, one set per
    device, allocated once (never written: their features are off)."""
    hit = _DUMMIES.get((device.type, device.index))
    if hit is None:
        hit = tuple(torch.zeros(1, dtype=t, device=device) for t in (torch.int32, torch.float32, torch.uint8))
        _DUMMIES[(device.type, device.index)] = hit
    return hit


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """True when some element offset of a launch may not fit in int32 (64-bit index math then):
    an offset never exceeds the elements of the tensor's storage."""
    return any(t.untyped_storage().nbytes() >= 2**31 * t.element_size() for t in tensors)


@register_backend(
    "attention", "triton", devices=("cuda",), interpreter=True, dtypes=SUPPORTED_DTYPES,
    sizes=(SizeRule("head dim", (0, 1), min=1, max=MAX_HEAD_DIM),), auto_devices=("cuda",),
    auto_note="on CPU the interpreter is a test tool", priority=0,
    doc="fused block-sparse FlashAttention (forward, backward, modifiers, element masks, LSE, tile statistics)",
)  # fmt: skip
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kl: KernelLayout | None,
    ldims: tuple,
    scale: float,
    decay: tuple | None = None,
    mix_u: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    stats_thr: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel on prepared inputs (no validation, no host sync): returns (out [B,H,Nq,Dv]
    in q.dtype, lse [B,H,Nq] fp32, natural log). kl None: dense (no lists are read); ldims =
    (q_len, k_len, block_q, block_k, Bl, Hl);
    decay = (factors [H] fp32, threshold, q_pos [Nq] int32, k_pos [Nk] int32) on q's device;
    stats: a zeroed uint8 [B, H, nqb, nkb] buffer to fill with LiteAttention's tile statistics."""
    B, H, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    dev = q.device
    out = torch.empty(B, H, nq, dv, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, nq, dtype=torch.float32, device=dev)
    i32, f32, u8 = _dummies(dev)
    # everything but the tensors depends on shapes, strides and flags only: built once per key
    key = (q.shape, nk, dv, q.stride(), k.stride(), v.stride(), q.dtype, ldims, scale, decay is None,
           mix_u is None, stats is None, kl is None, _needs_int64(q, k, v, out))  # fmt: skip
    hit = _FWD_PLANS.get(key)
    if hit is None:
        _, _, bq, bk, lb, lh = ldims
        nqb, nkb = -(-nq // bq), -(-nk // bk)
        ints = (*q.stride(), *k.stride(), *v.stride(), *out.stride(),
                H, nq, nk, nqb, nkb, lb, lh, scale * _LOG2E, _bucket(nq), _bucket(nk))  # fmt: skip
        meta = dict(
            BLOCK_Q=bq, BLOCK_K=bk, D=d, DV=dv, HEAD_D=_pad(d), HEAD_DV=_pad(dv), HAS_DECAY=decay is not None,
            HAS_MIX=mix_u is not None, HAS_STATS=stats is not None, DOT_PREC=_dot_prec(q.dtype, d, dv),
            DENSE=kl is None, IDX64=key[-1],
        )  # fmt: skip
        if len(_FWD_PLANS) >= 512:  # many distinct shapes (e.g. a length sweep): start over
            _FWD_PLANS.clear()
        hit = _FWD_PLANS[key] = (ints, meta, lambda m, g=nqb * bq, bh=B * H: (g // m["BLOCK_M"], bh))
    ints, meta, grid = hit
    dargs = decay if decay is not None else (f32, 0, i32, i32)
    if kl is None:
        lists = (i32,) * 7
    elif stats is not None:  # merged list, ascending key order
        lists = (kl.full_begin, kl.full_end, kl.full_idx, kl.all_begin, kl.all_end, kl.all_idx, kl.all_mask)
    else:
        lists = (kl.full_begin, kl.full_end, kl.full_idx, kl.part_begin, kl.part_end, kl.part_idx, kl.part_mask)
    elem = kl.elem_mask if kl is not None and kl.elem_mask is not None else i32
    args = (q, k, v, out, lse, *lists, elem, *dargs, mix_u if mix_u is not None else f32,
            stats if stats is not None else u8, float(stats_thr), *ints)  # fmt: skip
    _launch("fwd", _fwd_kernel, grid, args, meta, q.dtype, dev)
    return out, lse


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kl: KernelLayout | None,
    ldims: tuple,
    scale: float,
    decay: tuple | None = None,
    mix_u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward of `forward` on prepared inputs: returns (dq, dk, dv) in the
    inputs' dtypes, written by the kernels (delta = rowsum(dO * A) by a kernel too: no fp32
    copies, no casts on the host)."""
    if kl is not None and not kl.has_backward:
        raise RuntimeError("attention backward: the layout's backward lists were not built (kernel_view(True))")
    B, H, nq, d = q.shape
    nk, dv_dim = k.shape[2], v.shape[-1]
    _, _, bq, bk, lb, lh = ldims
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    dev = q.device
    do = grad_out if grad_out.dtype == q.dtype else grad_out.to(q.dtype)
    if do.stride(-1) != 1:
        do = do.contiguous()
    i32, f32, _u8 = _dummies(dev)
    idx64 = _needs_int64(q, k, v, do, out)
    mix = mix_u if mix_u is not None else f32
    delta = torch.empty(B, H, nq, dtype=torch.float32, device=dev)
    _launch(
        "delta", _bwd_delta_kernel, lambda m: (triton.cdiv(nq, m["BLOCK_M"]), B * H),
        (out, do, v, mix, delta, *out.stride(), *do.stride(), *v.stride(), H, nq),
        dict(DV=dv_dim, HEAD_DV=_pad(dv_dim), HAS_MIX=mix_u is not None, IDX64=idx64), q.dtype, dev,
    )  # fmt: skip
    dq = torch.empty(B, H, nq, d, dtype=q.dtype, device=dev)
    dk = torch.empty(B, H, nk, d, dtype=k.dtype, device=dev)
    dv = torch.empty(B, H, nk, dv_dim, dtype=v.dtype, device=dev)
    dargs = decay if decay is not None else (f32, 0, i32, i32)
    elem = kl.elem_mask if kl is not None and kl.elem_mask is not None else i32
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    dims = (H, nq, nk, nqb, nkb, lb, lh, scale * _LOG2E, scale, _bucket(nq), _bucket(nk))
    meta = dict(
        BLOCK_Q=bq, BLOCK_K=bk, D=d, DV=dv_dim, HEAD_D=_pad(d), HEAD_DV=_pad(dv_dim), HAS_DECAY=decay is not None,
        HAS_MIX=mix_u is not None, DOT_PREC=_dot_prec(q.dtype, d, dv_dim), DENSE=kl is None, IDX64=idx64,
    )  # fmt: skip
    if kl is None:
        t_lists, lists = (i32,) * 7, (i32,) * 7
    else:
        t_lists = (kl.t_full_begin, kl.t_full_end, kl.t_full_idx, kl.t_part_begin, kl.t_part_end, kl.t_part_idx,
                   kl.t_part_mask)  # fmt: skip
        lists = (kl.full_begin, kl.full_end, kl.full_idx, kl.part_begin, kl.part_end, kl.part_idx, kl.part_mask)
    _launch(
        "dkdv", _bwd_dkdv_kernel, lambda m: (nkb * (bk // m["BLOCK_N"]), B * H),
        (q, k, v, do, lse, delta, dk, dv, *t_lists, elem, *dargs, mix, *strides, *dims),
        meta, q.dtype, dev,
    )  # fmt: skip
    _launch(
        "dq", _bwd_dq_kernel, lambda m: (nqb * (bq // m["BLOCK_M"]), B * H),
        (q, k, v, do, lse, delta, dq, *lists, elem, *dargs, mix, *strides, *dims),
        meta, q.dtype, dev,
    )  # fmt: skip
    return dq, dk, dv


def triton_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
    tile_stats=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward` from a `BlockLayout` and modifier objects (prepared once and cached on them)."""
    check_inputs(q, v)
    B, H, nq, d = q.shape
    nk = k.shape[2]
    layout = (layout or BlockLayout.dense(nq, nk, device=q.device)).to(q.device)
    decay, mix_u = prepare_modifiers(tuple(modifiers), H, nq, nk, q.device)
    stats = None
    if tile_stats is not None:
        stats = torch.zeros(B, H, layout.num_q_blocks, layout.num_k_blocks, dtype=torch.uint8, device=q.device)
    out, lse = forward(
        q, k, v, layout.kernel_view(), _ldims(layout), d**-0.5 if scale is None else float(scale),
        decay, mix_u, stats, 0.0 if tile_stats is None else float(tile_stats.threshold),
    )  # fmt: skip
    if tile_stats is not None:
        tile_stats.needed = stats
    return out, lse


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
    """`backward` from a `BlockLayout` and modifier objects."""
    check_inputs(q, v)
    B, H, nq, d = q.shape
    nk = k.shape[2]
    layout = (layout or BlockLayout.dense(nq, nk, device=q.device)).to(q.device)
    decay, mix_u = prepare_modifiers(tuple(modifiers), H, nq, nk, q.device)
    return backward(
        grad_out, q, k, v, out, lse, layout.kernel_view(backward=True), _ldims(layout),
        d**-0.5 if scale is None else float(scale), decay, mix_u,
    )  # fmt: skip


def _ldims(layout: BlockLayout) -> tuple:
    return (layout.q_len, layout.k_len, layout.block_q, layout.block_k, layout.batch, layout.heads)


# ----------------------------------------------------------------------------- static check
def static_configs() -> Iterator:
    """Every launch configuration (every table entry, every feature flag, every padded head-dim
    class, fp16/bf16/fp32, 64-bit offsets, tiles equal to the layout block) for
    `attn_kernels.static_check`. Arguments mimic a real launch: diffusers-style [B, N, H, D]
    strides seen as [B, H, N, D], int32 lists, fp32 statistics."""
    dims = {64: (64, 64), 128: (128, 128), 256: (256, 256)}
    padded = {64: (48, 48), 128: (80, 80), 256: (160, 160)}  # a padded dim in every class
    ci_pick = {("fwd", "16", 128), ("fwd", "16", 64), ("dkdv", "16", 128), ("dq", "16", 128), ("fwd", "32", 64)}
    for (kind, width, hc), cands in CANDIDATES.items():
        dtypes = (torch.float32,) if width == "32" else (torch.float16, torch.bfloat16)
        for dtype in dtypes:
            for (d, dv), tag in ((dims[hc], ""), (padded[hc], "pad")):
                if tag and dtype == torch.float16:
                    continue  # padding masks are dtype-independent: bf16 covers them
                if kind == "fwd":  # (decay, mix, stats, dense)
                    feats = [(a, b, c, 0) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
                    feats += [(0, 0, 0, 1), (1, 1, 0, 1), (0, 0, 1, 1)]
                else:
                    feats = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (1, 1, 0, 0), (0, 0, 0, 1), (1, 1, 0, 1)]
                if dtype == torch.float16:  # fp16 allocates like bf16: the plain and the heaviest feature set
                    feats = [f for f in feats if f in ((0, 0, 0, 0), (1, 1, 1, 0), (1, 1, 0, 0))]
                for j, (bm, bn, w, st) in enumerate(cands):
                    # (features, layout block, 64-bit offsets): every feature at 128-token blocks;
                    # the plain kernel also at a layout block equal to the tile (SPLIT = 1) and,
                    # for the first entry, with 64-bit offsets
                    variants = [(f, 128, False) for f in feats] + [((0, 0, 0, 0), max(bm, bn), False)]
                    if j == 0:
                        variants.append(((1, 1, 0, 0), 128, True))
                    seen = set()
                    for (decay, mix, stats, dense), blk, i64 in variants:
                        flags = "".join(
                            f",{n}"
                            for n, on in (
                                ("decay", decay),
                                ("mix", mix),
                                ("stats", stats),
                                ("dense", dense),
                                ("i64", i64),
                                (f"blk{blk}", blk != 128),
                            )  # fmt: skip
                            if on
                        )
                        name = f"attn.{kind}[{str(dtype)[6:]},d{d}/{dv},{bm}x{bn},w{w}s{st}{flags}]"
                        on = {"HAS_DECAY": decay, "HAS_MIX": mix}
                        if name in seen or _excluded(kind, width, hc, (bm, bn, w, st), on):
                            continue
                        seen.add(name)
                        ci = (kind, width, hc) in ci_pick and j == 0 and not tag and dtype != torch.float16
                        ci = ci and blk == 128 and not i64 and (decay, mix, stats, dense) in _CI_FEATURES
                        kernel, args, meta = _static_launch(kind, dtype, d, dv, decay, mix, stats, dense, blk, i64)
                        yield LaunchConfig(
                            name, kernel, args, dict(meta, BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st, ci=ci
                        )
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for dv in (64, 80, 128, 256):
            for mix in (0, 1):
                x, f32 = torch.empty(1, dtype=dtype), torch.empty(1, dtype=torch.float32)
                H, N = 12, 32760
                so = (H * N * dv, N * dv, dv, 1)
                sv = (N * H * dv, dv, H * dv, 1)
                args = (x, x, x, f32, f32, *so, *sv, *sv, H, N)
                meta = dict(DV=dv, HEAD_DV=_pad(dv), HAS_MIX=bool(mix), IDX64=False, BLOCK_M=DELTA_TILE["BLOCK_M"])
                name = f"attn.delta[{str(dtype)[6:]},dv{dv}{',mix' if mix else ''}]"
                ci = dtype == torch.bfloat16 and dv == 128
                w, st = DELTA_TILE["num_warps"], DELTA_TILE["num_stages"]
                yield LaunchConfig(name, _bwd_delta_kernel, args, meta, num_warps=w, num_stages=st, ci=ci)


_CI_FEATURES = ((0, 0, 0, 0), (1, 1, 1, 0), (1, 0, 0, 0), (0, 0, 0, 1))


def _static_launch(
    kind: str, dtype: torch.dtype, d: int, dv: int, decay: int, mix: int, stats: int, dense: int, blk: int = 128,
    i64: bool = False,
):  # fmt: skip
    """(kernel, args, constexpr kwargs) of a representative launch: B1 H12 N32760, `blk`-token blocks."""
    x = torch.empty(1, dtype=dtype)
    i32, f32, u8 = (torch.empty(1, dtype=t) for t in (torch.int32, torch.float32, torch.uint8))
    H, N = 12, 32760
    sq = (N * H * d, d, H * d, 1)
    sv = (N * H * dv, dv, H * dv, 1)
    so = (H * N * dv, N * dv, dv, 1)
    nb = -(-N // blk)
    lists = (i32,) * 8
    meta = dict(
        BLOCK_Q=blk, BLOCK_K=blk, D=d, DV=dv, HEAD_D=_pad(d), HEAD_DV=_pad(dv), HAS_DECAY=bool(decay),
        HAS_MIX=bool(mix), DOT_PREC=_dot_prec(dtype, d, dv), DENSE=bool(dense), IDX64=bool(i64),
    )  # fmt: skip
    tune = (_bucket(N), _bucket(N))
    if kind == "fwd":
        args = (x, x, x, x, f32, *lists, f32, 0, i32, i32, f32, u8, -10.0, *sq, *sq, *sv, *so,
                H, N, N, nb, nb, 1, H, 0.127, *tune)  # fmt: skip
        return _fwd_kernel, args, dict(meta, HAS_STATS=bool(stats))
    sdo = (H * N * dv, N * dv, dv, 1)
    tail = (f32, 0, i32, i32, f32, *sq, *sq, *sv, *sdo, H, N, N, nb, nb, 1, H, 0.127, 0.088, *tune)
    if kind == "dkdv":
        return _bwd_dkdv_kernel, (x, x, x, x, f32, f32, x, x, *lists, *tail), meta
    return _bwd_dq_kernel, (x, x, x, x, f32, f32, x, *lists, *tail), meta

"""Fused agent attention (both softmax stages and their combination) in Triton, forward and backward.

    agent_v = softmax(A·Kᵀ·s + B1) · V        A: [B, H, n, D] agents, n small (<= 128)
    out     = softmax(Q·Aᵀ·s + B2) · agent_v

Work split (fills the GPU at batch 1): stage 1 is a reduction over the N keys, split into
``n_split`` token chunks per (batch, head) like flash-decoding: each program keeps partial
softmax statistics (row max, sum, n x D accumulator) and a small kernel combines them into
``agent_v`` and stage 1's log-sum-exp. Stage 2 is independent per query tile: one program per
(query tile, batch, head), all n agents in one tile. The backward pass mirrors it: a query-tile
kernel (dQ, dB2, partial dA and d agent_v over its token chunk), a combine (d agent_v and stage
1's ``delta = rowsum(d agent_v · agent_v)``), a key-tile kernel (dK, dV, dB1, partial dA);
no [N, n] matrix is kept between kernels, bias gradients are written per batch and summed.

Precision: fp16 / bf16 inputs run every ``tl.dot`` on tensor cores (wgmma on sm_90) with 16-bit
operands and fp32 accumulation (probabilities and score gradients are rounded to the input dtype
before their dot, as FlashAttention does); softmax statistics, partials and bias gradients are
fp32. fp32 inputs run on tensor cores in 3xTF32 (``input_precision="tf32x3"``, about fp32
accuracy) for up to 64 agents and head dim <= 64 (see `_FP32_MAX_AGENTS`); larger fp32 problems
use the eager formula. Online softmax in the exp2 domain. Tiles per (kernel, dtype width, agents,
head dim) are in `TILES`; every entry compiles for sm_90a without register spills
(``python -m attn_kernels.static_check --match agent``). Backends ``triton`` and ``reference`` (the
eager formula) are registered in `attn_kernels.backends`; ``auto`` runs the reference on CPU, and
``backend="triton"`` runs the kernels in Triton's interpreter under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backends import SizeRule, choose_backend, define_op, register_backend, resolve_name
from .launch_config import LaunchConfig

__all__ = ["TILES", "agent_attention", "agent_attention_reference", "static_configs"]

_LOG2E = 1.0 / math.log(2.0)
_L2E = tl.constexpr(_LOG2E)  # biases enter the exp2-domain scores times log2(e)
_HEAD_DIMS = (16, 32, 64, 128)
_AGENT_BLOCKS = (16, 32, 64, 128)
#: sizes are not specialised (== 1, % 16): one compile per tile entry covers every launch
_NO_SPEC = ["N", "n_agents", "n_split", "H"]
_NO_SPEC_COMBINE = ["n_split"]


@triton.jit
def _mm(a, b, X3: tl.constexpr):
    """a @ b on tensor cores with fp32 accumulation: 16-bit operands as they are, fp32 ones (X3)
    in 3xTF32 (about fp32 accuracy)."""
    if X3:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_keys_kernel(
    K, V, A, B1, M_ws, L_ws, ACC_ws,
    N, n_agents, stride_bh, ld_b, chunk, n_split, H, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr, X3: tl.constexpr,
):  # fmt: skip
    """Stage 1 over one token chunk: partial (max, sum, acc) of softmax(A Kᵀ s + B1) V, log2 domain."""
    bh = tl.program_id(0)  # batch*head on axis 0 (up to 2**31 - 1 programs), chunks on axis 1
    split = tl.program_id(1)
    h = bh % H
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_D)
    ma = offs_a < n_agents
    a = tl.load(A + bh.to(tl.int64) * n_agents * HEAD_D + offs_a[:, None] * HEAD_D + offs_d[None, :],
                mask=ma[:, None], other=0.0)  # fmt: skip
    base = bh.to(tl.int64) * N * HEAD_D
    b1 = B1 + h.to(tl.int64) * stride_bh + offs_a[:, None] * ld_b
    m_i = tl.full([BLOCK_A], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    acc = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        k = tl.load(K + base + offs_n[:, None] * HEAD_D + offs_d[None, :], mask=mn[:, None], other=0.0)
        s = _mm(a, tl.trans(k), X3) * qk_scale
        s += tl.load(b1 + offs_n[None, :], mask=ma[:, None] & mn[None, :], other=0.0).to(tl.float32) * _L2E
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with every key masked so far (-inf biases)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + offs_n[:, None] * HEAD_D + offs_d[None, :], mask=mn[:, None], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, X3)
        m_i = m_new
    ws = (bh.to(tl.int64) * n_split + split) * BLOCK_A
    tl.store(M_ws + ws + offs_a, m_i)
    tl.store(L_ws + ws + offs_a, l_i)
    tl.store(ACC_ws + (ws + offs_a[:, None]) * HEAD_D + offs_d[None, :], acc)


@triton.jit(do_not_specialize=_NO_SPEC_COMBINE + ["n_agents"])
def _fwd_combine_kernel(
    M_ws, L_ws, ACC_ws, AV, AV_LP, LSE, n_agents, n_split,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr,
):  # fmt: skip
    """Merge the chunks' partial statistics: agent_v (fp32 and input dtype, padded rows zero) and LSE (log2)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)  # noqa: E741
    acc = tl.zeros([BLOCK_R, HEAD_D], tl.float32)
    for s in range(0, n_split):
        ws = (bh.to(tl.int64) * n_split + s) * BLOCK_A + rows
        m_s = tl.load(M_ws + ws)
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # chunks whose keys were all masked
        alpha = tl.exp2(m - m_use)
        beta = tl.exp2(m_s - m_use)
        l = l * alpha + tl.load(L_ws + ws) * beta  # noqa: E741
        acc = acc * alpha[:, None] + tl.load(ACC_ws + ws[:, None] * HEAD_D + offs_d[None, :]) * beta[:, None]
        m = m_new
    av = tl.where((rows < n_agents)[:, None], acc / l[:, None], 0.0)
    out = (bh.to(tl.int64) * BLOCK_A + rows[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(AV + out, av)
    tl.store(AV_LP + out, av.to(AV_LP.dtype.element_ty))
    tl.store(LSE + bh.to(tl.int64) * BLOCK_A + rows, m + tl.log2(l))


@triton.jit(do_not_specialize=[a for a in _NO_SPEC if a not in ("chunk", "n_split")])
def _fwd_query_kernel(
    Q, A, AV_LP, B2, O,
    N, n_agents, stride_bh, ld_b, H, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr, X3: tl.constexpr,
):  # fmt: skip
    """Stage 2 for one query tile: softmax(Q Aᵀ s + B2) agent_v over all agents in one tile."""
    bh = tl.program_id(0)
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_D)
    mm = offs_m < N
    ma = offs_a < n_agents
    rows = bh.to(tl.int64) * N * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :]
    q = tl.load(Q + rows, mask=mm[:, None], other=0.0)
    a = tl.load(A + bh.to(tl.int64) * n_agents * HEAD_D + offs_a[:, None] * HEAD_D + offs_d[None, :],
                mask=ma[:, None], other=0.0)  # fmt: skip
    s = _mm(q, tl.trans(a), X3) * qk_scale
    b2 = B2 + h.to(tl.int64) * stride_bh + offs_m[:, None] * ld_b + offs_a[None, :]
    s += tl.load(b2, mask=mm[:, None] & ma[None, :], other=0.0).to(tl.float32) * _L2E
    s = tl.where(ma[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    l = tl.sum(p, 1)  # noqa: E741
    av = tl.load(AV_LP + (bh.to(tl.int64) * BLOCK_A + offs_a[:, None]) * HEAD_D + offs_d[None, :])
    out = _mm(p.to(av.dtype), av, X3) / l[:, None]
    tl.store(O + rows, out.to(O.dtype.element_ty), mask=mm[:, None])


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_query_kernel(
    Q, A, AV_LP, B2, DO, DQ, DB2, DA_ws, DAV_ws,
    N, n_agents, stride_bh, ld_b, chunk, n_split, H, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr, X3: tl.constexpr,
):  # fmt: skip
    """Stage 2 backward over one token chunk: dQ and dB2 per query tile, partial dA and d agent_v."""
    bh = tl.program_id(0)  # batch*head on axis 0 (up to 2**31 - 1 programs), chunks on axis 1
    split = tl.program_id(1)
    h = bh % H
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_D)
    ma = offs_a < n_agents
    a_off = bh.to(tl.int64) * n_agents * HEAD_D
    a = tl.load(A + a_off + offs_a[:, None] * HEAD_D + offs_d[None, :], mask=ma[:, None], other=0.0)
    av = tl.load(AV_LP + (bh.to(tl.int64) * BLOCK_A + offs_a[:, None]) * HEAD_D + offs_d[None, :])
    base = bh.to(tl.int64) * N * HEAD_D
    Qb, DOb, DQb = Q + base, DO + base, DQ + base
    b2 = B2 + h.to(tl.int64) * stride_bh
    db2 = DB2 + bh.to(tl.int64) * N * ld_b
    da = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    dav = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mm = offs_m < N
        q = tl.load(Qb + offs_m[:, None] * HEAD_D + offs_d[None, :], mask=mm[:, None], other=0.0)
        do = tl.load(DOb + offs_m[:, None] * HEAD_D + offs_d[None, :], mask=mm[:, None], other=0.0)
        s = _mm(q, tl.trans(a), X3) * qk_scale
        bias = tl.load(b2 + offs_m[:, None] * ld_b + offs_a[None, :], mask=mm[:, None] & ma[None, :], other=0.0)
        s = tl.where(ma[None, :], s + bias.to(tl.float32) * _L2E, float("-inf"))
        p = tl.exp2(s - tl.max(s, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        dp = _mm(do, tl.trans(av), X3)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])  # rows past N: q = do = 0, so ds = 0 and p^T do = 0
        ds_lp = ds.to(q.dtype)
        dq = _mm(ds_lp, a, X3) * scale
        da += _mm(tl.trans(ds_lp), q, X3)
        dav += _mm(tl.trans(p.to(do.dtype)), do, X3)
        offs_s = tl.arange(0, BLOCK_M) + start  # store addresses rebuilt here, not kept live across the dots
        ms = offs_s < N
        tl.store(db2 + offs_s[:, None] * ld_b + offs_a[None, :], ds, mask=ms[:, None] & ma[None, :])
        tl.store(DQb + (offs_s * HEAD_D)[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ms[:, None])
    ws = ((bh.to(tl.int64) * n_split + split) * BLOCK_A + offs_a[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(DA_ws + ws, da * scale)
    tl.store(DAV_ws + ws, dav)


@triton.jit(do_not_specialize=_NO_SPEC_COMBINE)
def _bwd_combine_kernel(
    DAV_ws, AV, DAV_LP, DELTA, n_split,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr,
):  # fmt: skip
    """Sum the chunks' d agent_v; delta = rowsum(d agent_v · agent_v) (fp32) for stage 1's softmax backward."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_D)
    acc = tl.zeros([BLOCK_R, HEAD_D], tl.float32)
    for s in range(0, n_split):
        ws = (bh.to(tl.int64) * n_split + s) * BLOCK_A + rows
        acc += tl.load(DAV_ws + ws[:, None] * HEAD_D + offs_d[None, :])
    out = (bh.to(tl.int64) * BLOCK_A + rows[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(DAV_LP + out, acc.to(DAV_LP.dtype.element_ty))
    tl.store(DELTA + bh.to(tl.int64) * BLOCK_A + rows, tl.sum(acc * tl.load(AV + out), 1))


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_keys_kernel(
    K, V, A, LSE, DAV_LP, DELTA, B1, DK, DV, DB1T, DA_ws,
    N, n_agents, stride_bh, ld_b, ld_db, chunk, n_split, H, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr, X3: tl.constexpr,
):  # fmt: skip
    """Stage 1 backward over one token chunk, keys as rows: dK, dV, dB1 (stored [N, n]) and partial dA."""
    bh = tl.program_id(0)  # batch*head on axis 0 (up to 2**31 - 1 programs), chunks on axis 1
    split = tl.program_id(1)
    h = bh % H
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_D)
    ma = offs_a < n_agents
    a_off = bh.to(tl.int64) * n_agents * HEAD_D
    a = tl.load(A + a_off + offs_a[:, None] * HEAD_D + offs_d[None, :], mask=ma[:, None], other=0.0)
    pad = bh.to(tl.int64) * BLOCK_A
    dav = tl.load(DAV_LP + (pad + offs_a[:, None]) * HEAD_D + offs_d[None, :])
    lse = tl.load(LSE + pad + offs_a)
    delta = tl.load(DELTA + pad + offs_a)
    base = bh.to(tl.int64) * N * HEAD_D
    b1t_base = B1 + h.to(tl.int64) * stride_bh + offs_a[:, None] * ld_b
    db1 = DB1T + bh.to(tl.int64) * N * ld_db
    da = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    Kb, Vb, DKb, DVb = K + base, V + base, DK + base, DV + base
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        k = tl.load(Kb + offs_n[:, None] * HEAD_D + offs_d[None, :], mask=mn[:, None], other=0.0)
        v = tl.load(Vb + offs_n[:, None] * HEAD_D + offs_d[None, :], mask=mn[:, None], other=0.0)
        st = _mm(k, tl.trans(a), X3) * qk_scale
        b1t = tl.load(b1t_base + offs_n[None, :], mask=ma[:, None] & mn[None, :], other=0.0)
        st += tl.trans(b1t).to(tl.float32) * _L2E
        pt = tl.where(mn[:, None], tl.exp2(st - lse[None, :]), 0.0)
        dpt = _mm(v, tl.trans(dav), X3)
        dst = pt * (dpt - delta[None, :])
        dv = _mm(pt.to(v.dtype), dav, X3)
        dst_lp = dst.to(k.dtype)
        dk = _mm(dst_lp, a, X3) * scale
        da += _mm(tl.trans(dst_lp), k, X3)
        offs_s = tl.arange(0, BLOCK_N) + start  # store addresses rebuilt here, not kept live across the dots
        ms = offs_s < N
        tl.store(db1 + offs_s[:, None] * ld_db + offs_a[None, :], dst, mask=ms[:, None] & ma[None, :])
        tl.store(DVb + (offs_s * HEAD_D)[:, None] + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=ms[:, None])
        tl.store(DKb + (offs_s * HEAD_D)[:, None] + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=ms[:, None])
    ws = ((bh.to(tl.int64) * n_split + split) * BLOCK_A + offs_a[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(DA_ws + ws, da * scale)


# ----------------------------------------------------------------------------- tiles and work split
#: (kernel, operand width) -> {(BLOCK_A, HEAD_D): (token block, num_warps, num_stages)}. The token
#: block is BLOCK_N keys (fwd_keys, bwd_keys) or BLOCK_M queries (fwd_query, bwd_query) per step.
#: Each entry is the first of a preference list (larger blocks, 4 warps, more stages first) that
#: compiles for sm_90a without register spills; fp32 (3xTF32) has only the two padded shapes it runs.
_T16 = {  # rows: BLOCK_A 16, 32, 64, 128; columns: HEAD_D 16, 32, 64, 128
    "fwd_keys": [
        [(64, 4, 3)] * 4,
        [(64, 4, 3)] * 4,
        [(64, 4, 3)] * 4,
        [(64, 4, 3), (64, 4, 3), (64, 8, 3), (64, 8, 3)],
    ],
    "fwd_query": [[(64, 4, 3)] * 4] * 4,
    "bwd_query": [
        [(64, 4, 2)] * 4,
        [(64, 4, 2), (64, 4, 2), (64, 4, 2), (64, 8, 2)],
        [(64, 4, 2), (64, 4, 2), (64, 4, 2), (32, 8, 2)],
        [(64, 8, 2), (16, 4, 2), (32, 8, 2), (16, 8, 2)],
    ],
    "bwd_keys": [
        [(64, 4, 2), (64, 4, 2), (64, 4, 2), (64, 8, 2)],
        [(64, 4, 2), (64, 4, 2), (64, 4, 2), (64, 8, 2)],
        [(64, 4, 2), (64, 4, 2), (64, 4, 2), (32, 8, 2)],
        [(64, 8, 1), (16, 4, 2), (32, 8, 2), (16, 8, 2)],
    ],
}
_T32 = {  # fp32: BLOCK_A 64 with HEAD_D 32 and 64 only (see `_FP32_MAX_AGENTS`)
    "fwd_keys": {(64, 32): (32, 4, 2), (64, 64): (32, 4, 2)},
    "fwd_query": {(64, 32): (32, 4, 2), (64, 64): (32, 4, 2)},
    "bwd_query": {(64, 32): (16, 4, 2), (64, 64): (16, 8, 2)},
    "bwd_keys": {(64, 32): (16, 8, 2), (64, 64): (16, 4, 2)},
}
TILES: dict[tuple[str, str], dict[tuple[int, int], tuple[int, int, int]]] = {
    **{(k, "16"): {(a, d): rows[i][j] for i, a in enumerate(_AGENT_BLOCKS) for j, d in enumerate(_HEAD_DIMS)}
       for k, rows in _T16.items()},
    **{(k, "32"): table for k, table in _T32.items()},
}  # fmt: skip
_COMBINE = (16, 4, 1)  # (BLOCK_R, num_warps, num_stages)


def _width(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def _x3(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


#: fp32 runs in Triton with at most 64 agents and head dim <= 64, as BLOCK_A 64 x HEAD_D 32 or 64
#: (head dim 16 zero-padded to 32): 3xTF32 dots hold about twice the registers of 16-bit ones and
#: these are the shapes whose kernels all fit without spills. Larger fp32 problems use the eager
#: formula (same math, PyTorch matmuls).
_FP32_MAX_AGENTS, _FP32_MAX_D = 64, 64


def _block_a(n: int, dtype: torch.dtype) -> int:
    return 64 if dtype == torch.float32 else max(16, triton.next_power_of_2(n))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: plan as for an H100


def _split(n_tokens: int, block: int, bh: int, device: torch.device) -> tuple[int, int]:
    """(n_split, chunk): token chunks per (batch, head) so that about 2 programs per SM run,
    each chunk a whole number of blocks and none empty."""
    tiles = triton.cdiv(n_tokens, block)
    want = max(1, min(tiles, triton.cdiv(2 * _sm_count(device), bh)))
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per * block


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned, as every compiled variant assumes."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _bias(b: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """[Hb, r, c] bias (Hb in {1, H}) -> (copy with rows padded to a multiple of 16 elements, head
    stride (0 when shared by the heads), row stride): aligned rows give vector loads."""
    c16 = -(-b.shape[-1] // 16) * 16
    b = _aligned(F.pad(b, (0, c16 - b.shape[-1])) if c16 != b.shape[-1] else b)
    return b, (0 if b.shape[0] == 1 else b.stride(0)), c16


def _forward(q, k, v, agents, b1, b2, scale):
    """Three launches: stage 1 per token chunk, the combine, stage 2 per query tile. b1, b2 come
    from `_bias`. Returns out plus what the backward needs (agent_v fp32 / input dtype, LSE)."""
    B, H, N, D = q.shape
    n = agents.shape[2]
    ba = _block_a(n, q.dtype)
    dev, w, x3 = q.device, _width(q.dtype), _x3(q.dtype)
    f32 = dict(dtype=torch.float32, device=dev)
    qk = float(scale) * _LOG2E
    bn, nw, ns = TILES[("fwd_keys", w)][(ba, D)]
    n_split, chunk = _split(N, bn, B * H, dev)
    m_ws, l_ws = torch.empty(B * H, n_split, ba, **f32), torch.empty(B * H, n_split, ba, **f32)
    acc_ws = torch.empty(B * H, n_split, ba, D, **f32)
    _fwd_keys_kernel[(B * H, n_split)](
        k, v, agents, b1[0], m_ws, l_ws, acc_ws, N, n, b1[1], b1[2], chunk, n_split, H, qk,
        BLOCK_N=bn, BLOCK_A=ba, HEAD_D=D, X3=x3, num_warps=nw, num_stages=ns,
    )  # fmt: skip
    av, lse = torch.empty(B * H, ba, D, **f32), torch.empty(B * H, ba, **f32)
    av_lp = torch.empty(B * H, ba, D, dtype=q.dtype, device=dev)
    br, nw, ns = _COMBINE
    _fwd_combine_kernel[(B * H, ba // br)](
        m_ws, l_ws, acc_ws, av, av_lp, lse, n, n_split, BLOCK_R=br, BLOCK_A=ba, HEAD_D=D, num_warps=nw, num_stages=ns
    )
    out = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    bm, nw, ns = TILES[("fwd_query", w)][(ba, D)]
    _fwd_query_kernel[(B * H, triton.cdiv(N, bm))](
        q, agents, av_lp, b2[0], out, N, n, b2[1], b2[2], H, qk,
        BLOCK_M=bm, BLOCK_A=ba, HEAD_D=D, X3=x3, num_warps=nw, num_stages=ns,
    )  # fmt: skip
    return out, av, av_lp, lse


def _backward(dout, q, k, v, agents, b1, b2, av, av_lp, lse, scale):
    """Three launches: stage 2 backward per token chunk, the combine, stage 1 backward per token
    chunk; then the small sums over chunks (dA) and over the batch (bias gradients, fp32)."""
    B, H, N, D = q.shape
    n = agents.shape[2]
    ba = av.shape[1]
    dev, w, x3 = q.device, _width(q.dtype), _x3(q.dtype)
    f32 = dict(dtype=torch.float32, device=dev)
    qk = float(scale) * _LOG2E
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    db1t, db2 = torch.empty(B, H, N, b2[2], **f32), torch.empty(B, H, N, b2[2], **f32)  # rows padded like b2's
    bm, nw, ns = TILES[("bwd_query", w)][(ba, D)]
    s2, chunk2 = _split(N, bm, B * H, dev)
    da2, dav_ws = torch.empty(B * H, s2, ba, D, **f32), torch.empty(B * H, s2, ba, D, **f32)
    _bwd_query_kernel[(B * H, s2)](
        q, agents, av_lp, b2[0], dout, dq, db2, da2, dav_ws, N, n, b2[1], b2[2], chunk2, s2, H, qk, float(scale),
        BLOCK_M=bm, BLOCK_A=ba, HEAD_D=D, X3=x3, num_warps=nw, num_stages=ns,
    )  # fmt: skip
    dav_lp, delta = torch.empty_like(av_lp), torch.empty(B * H, ba, **f32)
    br, nw, ns = _COMBINE
    _bwd_combine_kernel[(B * H, ba // br)](
        dav_ws, av, dav_lp, delta, s2, BLOCK_R=br, BLOCK_A=ba, HEAD_D=D, num_warps=nw, num_stages=ns
    )
    bn, nw, ns = TILES[("bwd_keys", w)][(ba, D)]
    s1, chunk1 = _split(N, bn, B * H, dev)
    da1 = torch.empty(B * H, s1, ba, D, **f32)
    _bwd_keys_kernel[(B * H, s1)](
        k, v, agents, lse, dav_lp, delta, b1[0], dk, dv, db1t, da1, N, n, b1[1], b1[2], b2[2], chunk1, s1, H, qk,
        float(scale), BLOCK_N=bn, BLOCK_A=ba, HEAD_D=D, X3=x3, num_warps=nw, num_stages=ns,
    )  # fmt: skip
    da = (da1.sum(1) + da2.sum(1))[:, :n].reshape(B, H, n, D)
    db1 = db1t[..., :n].sum(0).transpose(-1, -2)
    db2 = db2[..., :n].sum(0)
    return dq, dk, dv, da, db1, db2


class _AgentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, agents, b1, b2, scale):
        q, k, v, agents = (_aligned(t) for t in (q, k, v, agents))
        b1p, b2p = _bias(b1), _bias(b2)  # padded once, reused by the backward
        out, av, av_lp, lse = _forward(q, k, v, agents, b1p, b2p, scale)
        ctx.save_for_backward(q, k, v, agents, b1p[0], b2p[0], av, av_lp, lse)
        ctx.strides = (b1p[1:], b2p[1:])
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, agents, b1p, b2p, av, av_lp, lse = ctx.saved_tensors
        b1 = (b1p, *ctx.strides[0])
        b2 = (b2p, *ctx.strides[1])
        dq, dk, dv, da, db1, db2 = _backward(_aligned(dout.to(q.dtype)), q, k, v, agents, b1, b2, av, av_lp, lse,
                                             ctx.scale)  # fmt: skip
        if b1p.shape[0] == 1:  # a bias shared by the heads
            db1 = db1.sum(0, keepdim=True)
        if b2p.shape[0] == 1:
            db2 = db2.sum(0, keepdim=True)
        return dq, dk, dv, da.to(agents.dtype), db1.to(b1p.dtype), db2.to(b2p.dtype), None


AGENT_ATTENTION = define_op(
    "agent_attention", dims=("head dim", "agents"), features=("backward",),
    doc="agent attention, both softmax stages (attn_kernels.agent_attn.agent_attention)",
)  # fmt: skip


@register_backend(
    "agent_attention", "reference", priority=10,
    doc="eager formula (PyTorch matmuls, linear in tokens); any device, dtype and size",
)  # fmt: skip
def agent_attention_reference(q, k, v, agents, b1, b2, scale):
    """Eager formula: softmax(q aᵀ s + b2) · (softmax(a kᵀ s + b1) · v); b1 [H, n, N], b2 [H, N, n]."""
    agent_v = torch.softmax(agents @ k.transpose(-1, -2) * scale + b1, -1) @ v
    return torch.softmax(q @ agents.transpose(-1, -2) * scale + b2, -1) @ agent_v


@register_backend(
    "agent_attention", "triton", devices=("cuda",), interpreter=True,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    sizes=(SizeRule("head dim", 0, values=_HEAD_DIMS), SizeRule("agents", 1, min=1, max=_AGENT_BLOCKS[-1])),
    auto_devices=("cuda",), auto_note="on CPU the interpreter is a test tool", priority=0,
    doc="fused Triton kernels, forward and backward (fp32 beyond 64 agents or head dim 64: the eager formula)",
)  # fmt: skip
def _agent_attention_triton(q, k, v, agents, b1, b2, scale):
    """The fused kernels on inputs the registry accepted (biases broadcast over batch, cast here)."""
    B, H, N, D = q.shape
    n = agents.shape[2]
    k, v, agents, b1, b2 = (t.to(q.dtype) for t in (k, v, agents, b1, b2))
    if q.dtype == torch.float32:
        if n > _FP32_MAX_AGENTS or D > _FP32_MAX_D:
            return agent_attention_reference(q, k, v, agents, b1, b2, scale)
        if D < 32:  # zero columns change no score and no output: run the d32 kernels
            pad = lambda t: F.pad(t, (0, 32 - D))  # noqa: E731
            return _agent_attention_triton(pad(q), pad(k), pad(v), pad(agents), b1, b2, scale)[..., :D]
    b1 = b1.reshape(-1, n, N)  # [1 | H, n, N]: a shared bias is read with head stride 0
    b2 = b2.reshape(-1, N, n)
    if b1.shape[0] not in (1, H) or b2.shape[0] not in (1, H):
        raise ValueError(
            f"agent_attention: biases must broadcast over batch, got {b1.shape[0]} and {b2.shape[0]} heads"
        )
    return _AgentAttention.apply(q, k, v, agents, b1, b2, scale)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Agent attention on [B, H, N, D] tensors with n agents [B, H, n, D] and biases b1 [1|H..., n, N],
    b2 [..., N, n] (broadcast over batch; cast to q's dtype). backend: "auto" (Triton on CUDA when it
    fits, else the eager formula) | "triton" | "reference" ("eager": deprecated alias). Triton needs D
    in (16, 32, 64, 128) and n <= 128; fp32 beyond 64 agents or head dim 64 computes the eager formula
    (module docstring). A backend that cannot run raises, listing every backend's reasons."""
    backend = resolve_name("agent_attention", backend)
    flags = 1 if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                              or agents.requires_grad) else 0  # fmt: skip
    chosen = choose_backend("agent_attention", backend, q.device.type, q.dtype, (q.shape[-1], agents.shape[2]), flags)
    return chosen.fn(q, k, v, agents, b1, b2, scale)


# ----------------------------------------------------------------------------- static check
def static_configs() -> Iterator:
    """Every launch configuration for `attn_kernels.static_check`: each kernel, dtype and (agent
    block, head dim) with its `TILES` entry (fp32: the two shapes it runs). Sizes (N, n, chunks,
    heads) are not specialised and the padded bias strides are always multiples of 16, so one
    compile per entry covers every launch; arguments mimic ViT-S at 1024 px (N 4097, 6 heads)."""
    H, N = 6, 4097
    n16 = lambda n: -(-n // 16) * 16  # noqa: E731
    kinds = ("fwd_keys", "fwd_combine", "fwd_query", "bwd_query", "bwd_combine", "bwd_keys")
    ci_pick = {(torch.bfloat16, 64, 64), (torch.float16, 128, 128), (torch.float32, 64, 64)}
    f = torch.empty(1, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.empty(1, dtype=dtype)
        w, x3 = _width(dtype), _x3(dtype)
        for ba, d in TILES[("fwd_keys", w)]:
            n = ba * 3 // 4 + 1
            sb1, ld1, sb2, ld2 = n * n16(N), n16(N), N * n16(n), n16(n)
            qk, sc = 0.125 * _LOG2E, 0.125
            for kind in kinds:
                if kind.endswith("combine"):
                    blk, nw, ns = _COMBINE
                    meta = dict(BLOCK_R=blk, BLOCK_A=ba, HEAD_D=d)
                    if kind == "fwd_combine":
                        kern, args = _fwd_combine_kernel, (f, f, f, f, x, f, n, 3)
                    else:
                        kern, args = _bwd_combine_kernel, (f, f, x, f, 3)
                else:
                    blk, nw, ns = TILES[(kind, w)][(ba, d)]
                    meta = dict(BLOCK_A=ba, HEAD_D=d, X3=x3)
                    meta["BLOCK_M" if "query" in kind else "BLOCK_N"] = blk
                    c = 8 * blk
                    kern, args = {
                        "fwd_keys": (_fwd_keys_kernel, (x, x, x, x, f, f, f, N, n, sb1, ld1, c, 3, H, qk)),
                        "fwd_query": (_fwd_query_kernel, (x, x, x, x, x, N, n, sb2, ld2, H, qk)),
                        "bwd_query": (
                            _bwd_query_kernel,
                            (x, x, x, x, x, x, f, f, f, N, n, sb2, ld2, c, 3, H, qk, sc),
                        ),
                        "bwd_keys": (
                            _bwd_keys_kernel,
                            (x, x, x, f, x, f, x, x, x, f, f, N, n, sb1, ld1, ld2, c, 3, H, qk, sc),
                        ),
                    }[kind]
                name = f"agent.{kind}[{str(dtype)[6:]},a{ba},d{d},{blk},w{nw}s{ns}]"
                ci = (dtype, ba, d) in ci_pick and not kind.endswith("combine")  # CI: the tensor-core kernels
                yield LaunchConfig(name, kern, args, meta, num_warps=nw, num_stages=ns, ci=ci)

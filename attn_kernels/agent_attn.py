"""Fused agent attention (both softmax stages and their combination) in Triton.

    agent_v = softmax(A·Kᵀ·s + B1) · V        A: [B, H, n, D] agents, n small (<= 128)
    out     = softmax(Q·Aᵀ·s + B2) · agent_v

One program per (batch, head): stage 1 streams the N keys once with an online softmax and
keeps the n x D agent values in registers; stage 2 streams the N queries once against all n
agents (one tile). Q, K, V are each read once and the output written once; no [N, n] matrix
touches memory. The backward kernel, also one program per (batch, head), recomputes stage 1's
softmax statistics, then streams the queries (stage-2 gradients) and the keys (stage-1
gradients) once each; the bias gradients are written per batch and summed over it. CPU uses
the eager formula unless ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["agent_attention", "agent_attention_reference"]


@triton.jit
def _agent_fwd_kernel(
    Q, K, V, A, B1, B2, O,
    H, N, n_agents, scale,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    h = bh % H
    base = bh.to(tl.int64) * N * HEAD_D
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_D)
    ma = offs_a < n_agents
    a = tl.load(
        A + bh.to(tl.int64) * n_agents * HEAD_D + offs_a[:, None] * HEAD_D + offs_d[None, :],
        mask=ma[:, None],
        other=0.0,
    )
    b1_base = B1 + h.to(tl.int64) * n_agents * N
    b2_base = B2 + h.to(tl.int64) * N * n_agents
    # stage 1: agent_v = softmax(a k^T s + b1) v, online over the N keys
    m_i = tl.full([BLOCK_A], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    acc = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        k = tl.load(K + base + offs_n[None, :] * HEAD_D + offs_d[:, None], mask=mn[None, :], other=0.0)
        s = tl.dot(a, k, input_precision="ieee") * scale
        s += tl.load(b1_base + offs_a[:, None] * N + offs_n[None, :], mask=ma[:, None] & mn[None, :], other=0.0)
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + offs_n[:, None] * HEAD_D + offs_d[None, :], mask=mn[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    agent_v = acc / l_i[:, None]
    agent_v = tl.where(ma[:, None], agent_v, 0.0)
    # stage 2: out = softmax(q a^T s + b2) agent_v, all agents in one tile
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        q = tl.load(Q + base + offs_n[:, None] * HEAD_D + offs_d[None, :], mask=mn[:, None], other=0.0)
        s = tl.dot(q, tl.trans(a), input_precision="ieee") * scale
        s += tl.load(b2_base + offs_n[:, None] * n_agents + offs_a[None, :], mask=mn[:, None] & ma[None, :], other=0.0)
        s = tl.where(ma[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        out = tl.dot(p, agent_v, input_precision="ieee")
        tl.store(O + base + offs_n[:, None] * HEAD_D + offs_d[None, :], out.to(O.dtype.element_ty), mask=mn[:, None])


@triton.jit
def _agent_bwd_kernel(
    Q, K, V, A, B1, B2, DO, DQ, DK, DV, DA, DB1, DB2,
    H, N, n_agents, scale,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HEAD_D: tl.constexpr,
):  # fmt: skip
    """Backward of `_agent_fwd_kernel` for one (batch, head); bias grads are written per batch."""
    bh = tl.program_id(0)
    h = bh % H
    base = bh.to(tl.int64) * N * HEAD_D
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_D)
    ma = offs_a < n_agents
    a_ptrs = bh.to(tl.int64) * n_agents * HEAD_D + offs_a[:, None] * HEAD_D + offs_d[None, :]
    a = tl.load(A + a_ptrs, mask=ma[:, None], other=0.0).to(tl.float32)
    b1_base = B1 + h.to(tl.int64) * n_agents * N
    b2_base = B2 + h.to(tl.int64) * N * n_agents
    db1_base = DB1 + bh.to(tl.int64) * n_agents * N
    db2_base = DB2 + bh.to(tl.int64) * N * n_agents
    # pass 1: recompute stage 1 (row max, normaliser, agent values)
    m1 = tl.full([BLOCK_A], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_A], tl.float32)
    av = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        k = tl.load(K + base + offs_n[None, :] * HEAD_D + offs_d[:, None], mask=mn[None, :], other=0.0).to(tl.float32)
        s1 = tl.dot(a, k, input_precision="ieee") * scale
        s1 += tl.load(b1_base + offs_a[:, None] * N + offs_n[None, :], mask=ma[:, None] & mn[None, :], other=0.0)
        s1 = tl.where(mn[None, :], s1, float("-inf"))
        m_new = tl.maximum(m1, tl.max(s1, 1))
        alpha = tl.exp(m1 - m_new)
        p = tl.exp(s1 - m_new[:, None])
        l1 = l1 * alpha + tl.sum(p, 1)
        v = tl.load(V + base + offs_n[:, None] * HEAD_D + offs_d[None, :], mask=mn[:, None], other=0.0).to(tl.float32)
        av = av * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m1 = m_new
    av = tl.where(ma[:, None], av / l1[:, None], 0.0)
    # pass 2: stage 2 backward over the queries
    da = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    dav = tl.zeros([BLOCK_A, HEAD_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        rows = base + offs_n[:, None] * HEAD_D + offs_d[None, :]
        q = tl.load(Q + rows, mask=mn[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + rows, mask=mn[:, None], other=0.0).to(tl.float32)
        s2 = tl.dot(q, tl.trans(a), input_precision="ieee") * scale
        s2 += tl.load(b2_base + offs_n[:, None] * n_agents + offs_a[None, :], mask=mn[:, None] & ma[None, :], other=0.0)
        s2 = tl.where(ma[None, :], s2, float("-inf"))
        p2 = tl.exp(s2 - tl.max(s2, 1)[:, None])
        p2 = p2 / tl.sum(p2, 1)[:, None]
        p2 = tl.where(mn[:, None], p2, 0.0)
        dp2 = tl.dot(do, tl.trans(av), input_precision="ieee")
        ds2 = p2 * (dp2 - tl.sum(dp2 * p2, 1)[:, None])
        tl.store(DQ + rows, tl.dot(ds2, a, input_precision="ieee") * scale, mask=mn[:, None])
        da += tl.dot(tl.trans(ds2), q, input_precision="ieee") * scale
        dav += tl.dot(tl.trans(p2), do, input_precision="ieee")
        tl.store(db2_base + offs_n[:, None] * n_agents + offs_a[None, :], ds2, mask=mn[:, None] & ma[None, :])
    # pass 3: stage 1 backward over the keys
    delta1 = tl.sum(dav * av, 1)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        rows = base + offs_n[:, None] * HEAD_D + offs_d[None, :]
        k = tl.load(K + rows, mask=mn[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + rows, mask=mn[:, None], other=0.0).to(tl.float32)
        s1 = tl.dot(a, tl.trans(k), input_precision="ieee") * scale
        s1 += tl.load(b1_base + offs_a[:, None] * N + offs_n[None, :], mask=ma[:, None] & mn[None, :], other=0.0)
        p1 = tl.exp(s1 - m1[:, None]) / l1[:, None]
        p1 = tl.where(ma[:, None] & mn[None, :], p1, 0.0)
        dp1 = tl.dot(dav, tl.trans(v), input_precision="ieee")
        ds1 = p1 * (dp1 - delta1[:, None])
        tl.store(DV + rows, tl.dot(tl.trans(p1), dav, input_precision="ieee"), mask=mn[:, None])
        tl.store(DK + rows, tl.dot(tl.trans(ds1), a, input_precision="ieee") * scale, mask=mn[:, None])
        da += tl.dot(ds1, k, input_precision="ieee") * scale
        tl.store(db1_base + offs_a[:, None] * N + offs_n[None, :], ds1, mask=ma[:, None] & mn[None, :])
    tl.store(DA + a_ptrs, da, mask=ma[:, None])


def agent_attention_reference(q, k, v, agents, b1, b2, scale):
    """Eager formula: softmax(q aᵀ s + b2) · (softmax(a kᵀ s + b1) · v); b1 [H, n, N], b2 [H, N, n]."""
    agent_v = torch.softmax(agents @ k.transpose(-1, -2) * scale + b1, -1) @ v
    return torch.softmax(q @ agents.transpose(-1, -2) * scale + b2, -1) @ agent_v


def _launch(q, k, v, agents, b1, b2, scale):
    B, H, N, D = q.shape
    n = agents.shape[2]
    q, k, v, agents = (t.contiguous() for t in (q, k, v, agents))
    out = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)  # contiguous, as the kernel writes it
    b1, b2 = b1.float().contiguous(), b2.float().contiguous()
    block_a = max(16, triton.next_power_of_2(n))
    _agent_fwd_kernel[(B * H,)](q, k, v, agents, b1, b2, out, H, N, n, float(scale), BLOCK_N=64 if N >= 64 else 16,
                                BLOCK_A=block_a, HEAD_D=D)  # fmt: skip
    return out


class _AgentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, agents, b1, b2, scale):
        ctx.save_for_backward(q, k, v, agents, b1, b2)
        ctx.scale = scale
        return _launch(q, k, v, agents, b1, b2, scale)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, agents, b1, b2 = ctx.saved_tensors
        B, H, N, D = q.shape
        n = agents.shape[2]
        q, k, v, agents = (t.contiguous() for t in (q, k, v, agents))
        f32 = dict(dtype=torch.float32, device=q.device)
        dq, dk, dv = (torch.empty(B, H, N, D, **f32) for _ in range(3))
        da = torch.empty(B, H, n, D, **f32)
        db1 = torch.zeros(B, H, n, N, **f32)
        db2 = torch.zeros(B, H, N, n, **f32)
        _agent_bwd_kernel[(B * H,)](
            q, k, v, agents, b1.float().contiguous(), b2.float().contiguous(), dout.contiguous(),
            dq, dk, dv, da, db1, db2, H, N, n, float(ctx.scale),
            BLOCK_N=64 if N >= 64 else 16, BLOCK_A=max(16, triton.next_power_of_2(n)), HEAD_D=D,
        )  # fmt: skip
        cast = lambda t, like: t.to(like.dtype)  # noqa: E731
        return (cast(dq, q), cast(dk, k), cast(dv, v), cast(da, agents), cast(db1.sum(0), b1), cast(db2.sum(0), b2),
                None)  # fmt: skip


def agent_attention(q, k, v, agents, b1, b2, scale: float, backend: str = "auto") -> torch.Tensor:
    """Agent attention on [B, H, N, D] tensors with n agents [B, H, n, D] and biases b1 [1|H..., n, N],
    b2 [..., N, n] (broadcast over batch). backend: "auto" (Triton on CUDA) | "triton" | "eager"."""
    if backend not in ("auto", "triton", "eager"):
        raise ValueError(f"agent_attention: backend must be 'auto', 'triton' or 'eager', got {backend!r}")
    B, H, N, D = q.shape
    n = agents.shape[2]
    can = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "eager" or (backend == "auto" and not q.is_cuda):
        return agent_attention_reference(q, k, v, agents, b1, b2, scale)
    if not can:
        raise RuntimeError("agent_attention(backend='triton') needs CUDA tensors or TRITON_INTERPRET=1")
    if D not in (16, 32, 64, 128) or n > 128:
        raise ValueError(f"agent_attention: Triton kernel needs head dim in (16, 32, 64, 128) and <= 128 agents, "
                         f"got D={D}, n={n}")  # fmt: skip
    b1 = b1.reshape(-1, n, N).expand(H, n, N)
    b2 = b2.reshape(-1, N, n).expand(H, N, n)
    return _AgentAttention.apply(q, k, v, agents, b1, b2, scale)

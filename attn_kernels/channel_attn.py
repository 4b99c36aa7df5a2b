"""Fused ECA (efficient channel attention) in Triton: forward and backward.

Forward reads the feature map twice and writes it once, the minimum for a global gate:
(1) a per-(batch, channel) mean over H*W, (2) ``out = x * gate`` where the tiny middle step —
the 1-D conv over channels and the gate, on a [B, C] tensor — runs in PyTorch. Backward is two
passes as well: per-(b, c) ``sum(dy * x)``, then ``dx = dy * gate + dmean / HW``; the small
middle step is differentiated by autograd. Gates: ``sigmoid`` (paper) or ``2·sigmoid``
(attnplug's identity-at-init mode). On CPU the eager path is used unless ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["eca_fused", "eca_reference"]


@triton.jit
def _rowsum_kernel(X, Y, OUT, HW, scale, BLOCK: tl.constexpr, HAS_Y: tl.constexpr):
    """OUT[row] = scale * sum_j X[row, j] (* Y[row, j]) over a contiguous [rows, HW] view."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * HW
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < HW
        x = tl.load(X + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            x = x * tl.load(Y + base + offs, mask=m, other=0.0).to(tl.float32)
        acc += x
    tl.store(OUT + row, tl.sum(acc, 0) * scale)


@triton.jit
def _scale_add_kernel(X, G, A, OUT, HW, inv_hw, BLOCK: tl.constexpr, HAS_A: tl.constexpr):
    """OUT[row, j] = X[row, j] * G[row] (+ A[row] * inv_hw)."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    base = row.to(tl.int64) * HW
    g = tl.load(G + row)
    y = tl.load(X + base + offs, mask=m, other=0.0).to(tl.float32) * g
    if HAS_A:
        y += tl.load(A + row) * inv_hw
    tl.store(OUT + base + offs, y.to(OUT.dtype.element_ty), mask=m)


def _rowsum(x: torch.Tensor, y: torch.Tensor | None, scale: float) -> torch.Tensor:
    rows, hw = x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    _rowsum_kernel[(rows,)](x, x if y is None else y, out, hw, scale, BLOCK=256, HAS_Y=y is not None)
    return out.view(x.shape[0], x.shape[1])


def _scale(x: torch.Tensor, g: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    rows, hw = x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]
    out = torch.empty_like(x)
    grid = (rows, triton.cdiv(hw, 256))
    gf = g.float().contiguous()
    a = gf if add is None else add.float().contiguous()
    _scale_add_kernel[grid](x, gf, a, out, hw, 1.0 / hw, BLOCK=256, HAS_A=add is not None)
    return out


def _gate(mean: torch.Tensor, weight: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """The small middle step on [B, C]: conv1d over channels, then gate_scale * sigmoid."""
    k = weight.shape[-1]
    z = F.conv1d(mean.unsqueeze(1), weight.to(mean.dtype), padding=(k - 1) // 2).squeeze(1)
    return gate_scale * torch.sigmoid(z)


class _EcaFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gate_scale):
        x = x.contiguous()
        mean = _rowsum(x, None, 1.0 / (x.shape[2] * x.shape[3]))
        g = _gate(mean, weight, gate_scale)
        ctx.save_for_backward(x, weight, mean)
        ctx.gate_scale = gate_scale
        return _scale(x, g, None)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean = ctx.saved_tensors
        dy = dy.contiguous()
        with torch.enable_grad():
            m = mean.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(weight.requires_grad)
            g = _gate(m, w, ctx.gate_scale)
        dg = _rowsum(dy, x, 1.0)  # dL/dgate[b, c] = sum_hw dy * x
        inputs = (m, w) if weight.requires_grad else (m,)
        grads = torch.autograd.grad(g, inputs, dg)
        dmean = grads[0]
        dx = _scale(dy, g.detach(), dmean)  # dy * g + dmean / HW
        return dx, (grads[1] if weight.requires_grad else None), None


def eca_reference(x: torch.Tensor, weight: torch.Tensor, gate_scale: float = 1.0) -> torch.Tensor:
    """Eager ECA: ``x * gate_scale * sigmoid(conv1d(mean_hw(x)))``."""
    return x * _gate(x.mean((2, 3)), weight, gate_scale)[:, :, None, None].to(x.dtype)


def eca_fused(x: torch.Tensor, weight: torch.Tensor, gate_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """ECA on ``x`` [B, C, H, W] with conv weight [1, 1, k]; backend "auto" | "triton" | "eager"."""
    import os

    if x.dim() != 4:
        raise ValueError(f"eca_fused: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[:2] != (1, 1) or weight.shape[-1] % 2 == 0:
        raise ValueError(f"eca_fused: weight must be [1, 1, k] with k odd, got shape {tuple(weight.shape)}")
    can = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and not can:
        raise RuntimeError("eca_fused(backend='triton') needs CUDA tensors or TRITON_INTERPRET=1")
    if backend not in ("auto", "triton", "eager"):
        raise ValueError(f"eca_fused: backend must be 'auto', 'triton' or 'eager', got {backend!r}")
    if backend == "eager" or (backend == "auto" and not x.is_cuda):
        return eca_reference(x, weight, gate_scale)
    return _EcaFused.apply(x, weight, float(gate_scale))

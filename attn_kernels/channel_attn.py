"""Fused ECA and coordinate attention in Triton: forward and backward.

Forward reads the feature map twice and writes it once, the minimum for a global gate:
(1) a per-(batch, channel) mean over H*W, (2) ``out = x * gate`` where the tiny middle step —
the 1-D conv over channels and the gate, on a [B, C] tensor — runs in PyTorch. Backward is two
passes as well: per-(b, c) ``sum(dy * x)``, then ``dx = dy * gate + dmean / HW``; the small
middle step is differentiated by autograd. Gates: ``sigmoid`` (paper) or ``2·sigmoid``
(attnplug's identity-at-init mode). Coordinate attention likewise: forward one read for both
strip poolings (row and column means), the small conv/BN/gate part on [B, C, H+W] in PyTorch,
one fused rescale ``x * a_h * a_w``; backward one read of x and dy for both gate gradients
(``sum_w dy·x·a_w`` and ``sum_h dy·x·a_h``), autograd through the small part, and one fused
``dx = dy·a_h·a_w + dmean_h/W + dmean_w/H``. On CPU the eager path is used unless
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["coord_fused", "eca_fused", "eca_reference"]


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


def _block(hw: int) -> int:
    """Lanes per program: the plane size rounded up to a power of two, within [16, 1024] (a 7x7
    map uses 64 lanes, not 256 mostly masked ones)."""
    return max(16, min(1024, triton.next_power_of_2(hw)))


def _rowsum(x: torch.Tensor, y: torch.Tensor | None, scale: float) -> torch.Tensor:
    rows, hw = x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    _rowsum_kernel[(rows,)](x, x if y is None else y, out, hw, scale, BLOCK=_block(hw), HAS_Y=y is not None)
    return out.view(x.shape[0], x.shape[1])


def _scale(x: torch.Tensor, g: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    rows, hw = x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]
    out = torch.empty_like(x)
    block = _block(hw)
    grid = (rows, triton.cdiv(hw, block))
    gf = g.float().contiguous()
    a = gf if add is None else add.float().contiguous()
    _scale_add_kernel[grid](x, gf, a, out, hw, 1.0 / hw, BLOCK=block, HAS_A=add is not None)
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


# ---------------------------------------------------------------------------------------------
# Coordinate attention: x * a_h[b, c, h] * a_w[b, c, w]
# ---------------------------------------------------------------------------------------------
@triton.jit
def _hw_sums_kernel(X, Y, SH, SW, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HAS_Y: tl.constexpr):
    """For one (b, c) plane: SH[h] = sum_w X*Y (or X), SW[w] = sum_h X*Y, in a single read."""
    plane = tl.program_id(0)
    base = plane.to(tl.int64) * H * W
    cols = tl.arange(0, BLOCK_W)
    mc = cols < W
    col_acc = tl.zeros([BLOCK_W], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        m = (rows[:, None] < H) & mc[None, :]
        offs = base + rows[:, None] * W + cols[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            x = x * tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(SH + plane.to(tl.int64) * H + rows, tl.sum(x, 1), mask=rows < H)
        col_acc += tl.sum(x, 0)
    tl.store(SW + plane.to(tl.int64) * W + cols, col_acc, mask=mc)


@triton.jit
def _hw_scale_kernel(X, AH, AW, GH, GW, OUT, H, W, inv_h, inv_w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                     HAS_ADD: tl.constexpr):  # fmt: skip
    """OUT = X * AH[h] * AW[w] (+ GH[h] / W + GW[w] / H) for one (b, c) plane, row chunk program_id(1)."""
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    mr, mc = rows < H, cols < W
    m = mr[:, None] & mc[None, :]
    offs = plane.to(tl.int64) * H * W + rows[:, None] * W + cols[None, :]
    ah = tl.load(AH + plane.to(tl.int64) * H + rows, mask=mr, other=0.0)
    aw = tl.load(AW + plane.to(tl.int64) * W + cols, mask=mc, other=0.0)
    y = tl.load(X + offs, mask=m, other=0.0).to(tl.float32) * ah[:, None] * aw[None, :]
    if HAS_ADD:
        gh = tl.load(GH + plane.to(tl.int64) * H + rows, mask=mr, other=0.0)
        gw = tl.load(GW + plane.to(tl.int64) * W + cols, mask=mc, other=0.0)
        y += gh[:, None] * inv_w + gw[None, :] * inv_h
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=m)


def _hw_blocks(W: int) -> tuple[int, int]:
    bw = triton.next_power_of_2(W)
    return max(1, min(64, 4096 // bw)), bw


def _hw_sums(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    sh = torch.empty(B, C, H, dtype=torch.float32, device=x.device)
    sw = torch.empty(B, C, W, dtype=torch.float32, device=x.device)
    bh, bw = _hw_blocks(W)
    _hw_sums_kernel[(B * C,)](x, x if y is None else y, sh, sw, H, W, BLOCK_H=bh, BLOCK_W=bw, HAS_Y=y is not None)
    return sh, sw


def _hw_scale(x, ah, aw, gh=None, gw=None) -> torch.Tensor:
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    bh, bw = _hw_blocks(W)
    ah, aw = ah.float().contiguous(), aw.float().contiguous()
    add = gh is not None
    _hw_scale_kernel[(B * C, triton.cdiv(H, bh))](
        x, ah, aw, gh.contiguous() if add else ah, gw.contiguous() if add else aw, out, H, W, 1.0 / H, 1.0 / W,
        BLOCK_H=bh, BLOCK_W=bw, HAS_ADD=add,
    )  # fmt: skip
    return out


@triton.jit
def _hw_grad_kernel(X, DY, AH, AW, DAH, DAW, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Gate gradients of ``out = x * a_h * a_w`` for one (b, c) plane in a single read of x and dy:
    DAH[h] = sum_w dy*x*a_w[w], DAW[w] = sum_h dy*x*a_h[h]."""
    plane = tl.program_id(0)
    base = plane.to(tl.int64) * H * W
    cols = tl.arange(0, BLOCK_W)
    mc = cols < W
    aw = tl.load(AW + plane.to(tl.int64) * W + cols, mask=mc, other=0.0)
    col_acc = tl.zeros([BLOCK_W], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        mr = rows < H
        m = mr[:, None] & mc[None, :]
        offs = base + rows[:, None] * W + cols[None, :]
        p = tl.load(X + offs, mask=m, other=0.0).to(tl.float32) * tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        ah = tl.load(AH + plane.to(tl.int64) * H + rows, mask=mr, other=0.0)
        tl.store(DAH + plane.to(tl.int64) * H + rows, tl.sum(p * aw[None, :], 1), mask=mr)
        col_acc += tl.sum(p * ah[:, None], 0)
    tl.store(DAW + plane.to(tl.int64) * W + cols, col_acc, mask=mc)


def _hw_grad(x: torch.Tensor, dy: torch.Tensor, ah: torch.Tensor, aw: torch.Tensor):
    B, C, H, W = x.shape
    dah = torch.empty(B, C, H, dtype=torch.float32, device=x.device)
    daw = torch.empty(B, C, W, dtype=torch.float32, device=x.device)
    bh, bw = _hw_blocks(W)
    _hw_grad_kernel[(B * C,)](x, dy, ah, aw, dah, daw, H, W, BLOCK_H=bh, BLOCK_W=bw)
    return dah, daw


class _CoordFused(torch.autograd.Function):
    """x -> x * a_h * a_w, where (a_h, a_w) = gates(mean over W, mean over H) computed by `gates_fn`.

    Passes over the [B, C, H, W] map: forward one read (both strip means) + one read/write (the
    rescale); backward one read of x and dy (both gate gradients) + one read of dy / write of dx.
    """

    @staticmethod
    def forward(ctx, x, gates_fn, *params):
        x = x.contiguous()
        sh, sw = _hw_sums(x, None)
        mh, mw = sh / x.shape[3], sw / x.shape[2]
        with torch.enable_grad():
            mh_, mw_ = mh.detach().requires_grad_(True), mw.detach().requires_grad_(True)
            ah, aw = gates_fn(mh_, mw_)
        ctx.save_for_backward(x, *params)
        ctx.graph = (mh_, mw_, ah, aw)
        return _hw_scale(x, ah.detach(), aw.detach())

    @staticmethod
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        mh, mw, ah, aw = ctx.graph
        ctx.graph = None
        dy = dy.contiguous()
        ah_d, aw_d = ah.detach().float().contiguous(), aw.detach().float().contiguous()
        dah, daw = _hw_grad(x, dy, ah_d, aw_d)
        inputs = [mh, mw] + [p for p in params if p.requires_grad]
        grads = torch.autograd.grad((ah, aw), inputs, (dah.to(ah.dtype), daw.to(aw.dtype)), allow_unused=True)
        gmh, gmw = (torch.zeros_like(mh) if g is None else g for g in grads[:2])
        dx = _hw_scale(dy, ah_d, aw_d, gmh.float(), gmw.float())  # dy*a_h*a_w + dmean_h/W + dmean_w/H
        it = iter(grads[2:])
        dparams = [next(it) if p.requires_grad else None for p in params]
        return (dx, None, *dparams)


def coord_fused(x: torch.Tensor, module: torch.nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm `CoordAttn` forward with the pooling and the rescale fused in Triton (the small
    conv/BN/gate part on [B, C, H+W] runs in PyTorch). backend: "auto" | "triton" | "eager"."""
    import os

    if backend not in ("auto", "triton", "eager"):
        raise ValueError(f"coord_fused: backend must be 'auto', 'triton' or 'eager', got {backend!r}")
    if x.dim() != 4:
        raise ValueError(f"coord_fused: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if backend == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("coord_fused(backend='triton') needs CUDA tensors or TRITON_INTERPRET=1")
    if getattr(module, "has_skip", False):
        if backend == "triton":
            raise ValueError("coord_fused: modules with has_skip=True are not supported by the fused kernel")
        return module(x)
    if backend == "eager" or (backend == "auto" and not x.is_cuda):
        return module(x)
    H, W = x.shape[2], x.shape[3]

    def gates(mh: torch.Tensor, mw: torch.Tensor):  # mh [B,C,H], mw [B,C,W] -> a_h, a_w
        y = torch.cat([mh, mw], dim=2).unsqueeze(-1).to(x.dtype)  # [B, C, H+W, 1]
        y = module.act(module.bn1(module.conv1(y)))
        yh, yw = torch.split(y, [H, W], dim=2)
        a_h = module.gate(module.conv_h(yh)).squeeze(-1)
        a_w = module.gate(module.conv_w(yw)).squeeze(-1)
        return a_h, a_w

    return _CoordFused.apply(x, gates, *[p for p in module.parameters()])

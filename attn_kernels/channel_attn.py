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
``dx = dy·a_h·a_w + dmean_h/W + dmean_w/H``.

Work split: the reductions run one program per (b, c) plane, and when B*C planes alone give
fewer than about 4 programs per SM (batch 1, few channels) each plane's reduction is split into
chunks whose fp32 partials are summed afterwards (deterministic, no atomics); the rescales are
tiled over the plane anyway. All arithmetic is fp32 whatever the input dtype. Every launch
configuration (lane counts, flags, plane-size specialisations) compiles for sm_90a without
register spills (``python -m attn_kernels.static_check --match 'eca|coord'``). Backends ``triton``
and ``reference`` are registered in `attn_kernels.backends`; ``auto`` runs the reference on CPU, and
``backend="triton"`` runs the kernels in Triton's interpreter under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backends import SizeRule, choose_backend, define_op, register_backend, resolve_name
from .launch_config import LaunchConfig

__all__ = ["MAX_W", "coord_fused", "eca_fused", "eca_reference", "static_configs"]


@triton.jit(do_not_specialize=["n_split"])
def _rowsum_kernel(X, Y, OUT, HW, chunk, n_split, scale, BLOCK: tl.constexpr, HAS_Y: tl.constexpr):
    """OUT[row, split] = scale * sum_j X[row, j] (* Y[row, j]) over one chunk of a contiguous [rows, HW] view."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = row.to(tl.int64) * HW
    acc = tl.zeros([BLOCK], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, HW)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < HW
        x = tl.load(X + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            x = x * tl.load(Y + base + offs, mask=m, other=0.0).to(tl.float32)
        acc += x
    tl.store(OUT + row.to(tl.int64) * n_split + split, tl.sum(acc, 0) * scale)


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


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: plan as for an H100


def _split(length: int, block: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(n_split, chunk): split a per-plane reduction of `length` into whole-block chunks when
    `programs` planes alone give fewer than about 4 programs per SM (B*C small at batch 1)."""
    blocks = triton.cdiv(length, block)
    want = max(1, min(blocks, triton.cdiv(4 * _sm_count(device), programs)))
    per = triton.cdiv(blocks, want)
    return triton.cdiv(blocks, per), per * block


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned, as every compiled variant assumes."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _rowsum(x: torch.Tensor, y: torch.Tensor | None, scale: float) -> torch.Tensor:
    rows, hw = x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]
    block = _block(hw)
    n_split, chunk = _split(hw, block, rows, x.device)
    out = torch.empty(rows, n_split, dtype=torch.float32, device=x.device)
    _rowsum_kernel[(rows, n_split)](x, x if y is None else y, out, hw, chunk, n_split, scale, BLOCK=block,
                                    HAS_Y=y is not None)  # fmt: skip
    return (out if n_split == 1 else out.sum(1)).view(x.shape[0], x.shape[1])


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
        x = _aligned(x)
        mean = _rowsum(x, None, 1.0 / (x.shape[2] * x.shape[3]))
        g = _gate(mean, weight, gate_scale)
        ctx.save_for_backward(x, weight, mean)
        ctx.gate_scale = gate_scale
        return _scale(x, g, None)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean = ctx.saved_tensors
        dy = _aligned(dy.to(x.dtype))
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


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
ECA = define_op("eca", features=("backward",), doc="ECA gate (attn_kernels.channel_attn.eca_fused)")


@register_backend("eca", "reference", priority=10, doc="eager formula; any device and dtype")
def eca_reference(x: torch.Tensor, weight: torch.Tensor, gate_scale: float = 1.0) -> torch.Tensor:
    """Eager ECA: ``x * gate_scale * sigmoid(conv1d(mean_hw(x)))``."""
    return x * _gate(x.mean((2, 3)), weight, gate_scale)[:, :, None, None].to(x.dtype)


@register_backend(
    "eca", "triton", devices=("cuda",), interpreter=True, dtypes=_FLOATS, auto_devices=("cuda",),
    auto_note="on CPU the interpreter is a test tool", doc="fused mean and rescale, forward and backward",
)  # fmt: skip
def _eca_triton(x: torch.Tensor, weight: torch.Tensor, gate_scale: float = 1.0) -> torch.Tensor:
    return _EcaFused.apply(x, weight, float(gate_scale))


def _grad_flag(x: torch.Tensor, module_or_weight) -> int:
    """Feature bit 0 ("backward"): a gradient will be taken through the call."""
    if not torch.is_grad_enabled():
        return 0
    if x.requires_grad:
        return 1
    if isinstance(module_or_weight, torch.Tensor):
        return int(module_or_weight.requires_grad)
    return int(any(p.requires_grad for p in module_or_weight.parameters()))


def eca_fused(x: torch.Tensor, weight: torch.Tensor, gate_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """ECA on ``x`` [B, C, H, W] with conv weight [1, 1, k]; backend "auto" (Triton on CUDA) |
    "triton" | "reference" ("eager": deprecated alias); one that cannot run raises with every reason."""
    if x.dim() != 4:
        raise ValueError(f"eca_fused: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[:2] != (1, 1) or weight.shape[-1] % 2 == 0:
        raise ValueError(f"eca_fused: weight must be [1, 1, k] with k odd, got shape {tuple(weight.shape)}")
    backend = resolve_name("eca_fused", backend)
    chosen = choose_backend("eca", backend, x.device.type, x.dtype, (), _grad_flag(x, weight))
    return chosen.fn(x, weight, gate_scale)


# ---------------------------------------------------------------------------------------------
# Coordinate attention: x * a_h[b, c, h] * a_w[b, c, w]
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "n_split"])
def _hw_sums_kernel(X, SH, SW, H, W, chunk, n_split, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """For rows [split*chunk, +chunk) of one (b, c) plane, in a single read: SH[h] = sum_w X and
    the partial column sums SW[split, w] = sum_h X."""
    plane = tl.program_id(0)
    split = tl.program_id(1)
    base = plane.to(tl.int64) * H * W
    cols = tl.arange(0, BLOCK_W)
    mc = cols < W
    col_acc = tl.zeros([BLOCK_W], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, H)
    for h0 in range(lo, hi, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        m = (rows[:, None] < H) & mc[None, :]
        x = tl.load(X + base + rows[:, None] * W + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(SH + plane.to(tl.int64) * H + rows, tl.sum(x, 1), mask=rows < H)
        col_acc += tl.sum(x, 0)
    tl.store(SW + (plane.to(tl.int64) * n_split + split) * W + cols, col_acc, mask=mc)


@triton.jit(do_not_specialize=["H"])
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


#: widest plane the coordinate-attention kernels take (one row of lanes per program row)
MAX_W = 4096


def _hw_blocks(W: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps): a whole row of lanes, up to 4096 elements per tile; 8 warps
    from 2048 (4 warps spill there with unaligned rows: one 64-bit address per element)."""
    bw = triton.next_power_of_2(W)
    bh = max(1, min(64, 4096 // bw))
    return bh, bw, 8 if bh * bw >= 2048 else 4


def _hw_plan(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps, n_split, chunk): row tiles, split over H when the B*C planes
    alone underfill the GPU."""
    B, C, H, W = x.shape
    bh, bw, nw = _hw_blocks(W)
    n_split, chunk = _split(H, bh, B * C, x.device)
    return bh, bw, nw, n_split, chunk


def _hw_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    bh, bw, nw, n_split, chunk = _hw_plan(x)
    sh = torch.empty(B, C, H, dtype=torch.float32, device=x.device)
    sw = torch.empty(B, C, n_split, W, dtype=torch.float32, device=x.device)
    _hw_sums_kernel[(B * C, n_split)](x, sh, sw, H, W, chunk, n_split, BLOCK_H=bh, BLOCK_W=bw, num_warps=nw)
    return sh, sw.sum(2) if n_split > 1 else sw.view(B, C, W)


def _hw_scale(x, ah, aw, gh=None, gw=None) -> torch.Tensor:
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    bh, bw, nw = _hw_blocks(W)
    ah, aw = ah.float().contiguous(), aw.float().contiguous()
    add = gh is not None
    _hw_scale_kernel[(B * C, triton.cdiv(H, bh))](
        x, ah, aw, gh.contiguous() if add else ah, gw.contiguous() if add else aw, out, H, W, 1.0 / H, 1.0 / W,
        BLOCK_H=bh, BLOCK_W=bw, HAS_ADD=add, num_warps=nw,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["H", "n_split"])
def _hw_grad_kernel(X, DY, AH, AW, DAH, DAW, H, W, chunk, n_split, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Gate gradients of ``out = x * a_h * a_w`` for rows [split*chunk, +chunk) of one (b, c) plane in a
    single read of x and dy: DAH[h] = sum_w dy*x*a_w[w], partial DAW[split, w] = sum_h dy*x*a_h[h]."""
    plane = tl.program_id(0)
    split = tl.program_id(1)
    base = plane.to(tl.int64) * H * W
    cols = tl.arange(0, BLOCK_W)
    mc = cols < W
    aw = tl.load(AW + plane.to(tl.int64) * W + cols, mask=mc, other=0.0)
    col_acc = tl.zeros([BLOCK_W], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, H)
    for h0 in range(lo, hi, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        mr = rows < H
        m = mr[:, None] & mc[None, :]
        offs = base + rows[:, None] * W + cols[None, :]
        p = tl.load(X + offs, mask=m, other=0.0).to(tl.float32) * tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        ah = tl.load(AH + plane.to(tl.int64) * H + rows, mask=mr, other=0.0)
        tl.store(DAH + plane.to(tl.int64) * H + rows, tl.sum(p * aw[None, :], 1), mask=mr)
        col_acc += tl.sum(p * ah[:, None], 0)
    tl.store(DAW + (plane.to(tl.int64) * n_split + split) * W + cols, col_acc, mask=mc)


def _hw_grad(x: torch.Tensor, dy: torch.Tensor, ah: torch.Tensor, aw: torch.Tensor):
    B, C, H, W = x.shape
    bh, bw, nw, n_split, chunk = _hw_plan(x)
    dah = torch.empty(B, C, H, dtype=torch.float32, device=x.device)
    daw = torch.empty(B, C, n_split, W, dtype=torch.float32, device=x.device)
    _hw_grad_kernel[(B * C, n_split)](x, dy, ah, aw, dah, daw, H, W, chunk, n_split, BLOCK_H=bh, BLOCK_W=bw,
                                      num_warps=nw)  # fmt: skip
    return dah, daw.sum(2) if n_split > 1 else daw.view(B, C, W)


class _CoordFused(torch.autograd.Function):
    """x -> x * a_h * a_w, where (a_h, a_w) = gates(mean over W, mean over H) computed by `gates_fn`.

    Passes over the [B, C, H, W] map: forward one read (both strip means) + one read/write (the
    rescale); backward one read of x and dy (both gate gradients) + one read of dy / write of dx.
    """

    @staticmethod
    def forward(ctx, x, gates_fn, *params):
        x = _aligned(x)
        sh, sw = _hw_sums(x)
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
        dy = _aligned(dy.to(x.dtype))
        ah_d, aw_d = ah.detach().float().contiguous(), aw.detach().float().contiguous()
        dah, daw = _hw_grad(x, dy, ah_d, aw_d)
        inputs = [mh, mw] + [p for p in params if p.requires_grad]
        grads = torch.autograd.grad((ah, aw), inputs, (dah.to(ah.dtype), daw.to(aw.dtype)), allow_unused=True)
        gmh, gmw = (torch.zeros_like(mh) if g is None else g for g in grads[:2])
        dx = _hw_scale(dy, ah_d, aw_d, gmh.float(), gmw.float())  # dy*a_h*a_w + dmean_h/W + dmean_w/H
        it = iter(grads[2:])
        dparams = [next(it) if p.requires_grad else None for p in params]
        return (dx, None, *dparams)


COORD = define_op(
    "coord", dims=("plane width",), features=("backward", "skip"),
    doc="coordinate attention (attn_kernels.channel_attn.coord_fused)",
)  # fmt: skip


@register_backend("coord", "reference", priority=10, doc="the module's own eager forward; any device and dtype")
def _coord_reference(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    return module(x)


@register_backend(
    "coord", "triton", devices=("cuda",), interpreter=True, dtypes=_FLOATS, features=("backward",),
    sizes=(SizeRule("plane width", 0, min=1, max=MAX_W, explain="the fused kernel takes planes up to {max} wide, "
                    "got W={value}"),),
    auto_devices=("cuda",), auto_note="on CPU the interpreter is a test tool",
    doc="fused strip pooling and rescale, forward and backward (modules without has_skip)",
)  # fmt: skip
def _coord_triton(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    H, W = x.shape[2], x.shape[3]

    def gates(mh: torch.Tensor, mw: torch.Tensor):  # mh [B,C,H], mw [B,C,W] -> a_h, a_w
        y = torch.cat([mh, mw], dim=2).unsqueeze(-1).to(x.dtype)  # [B, C, H+W, 1]
        y = module.act(module.bn1(module.conv1(y)))
        yh, yw = torch.split(y, [H, W], dim=2)
        a_h = module.gate(module.conv_h(yh)).squeeze(-1)
        a_w = module.gate(module.conv_w(yw)).squeeze(-1)
        return a_h, a_w

    return _CoordFused.apply(x, gates, *[p for p in module.parameters()])


def coord_fused(x: torch.Tensor, module: torch.nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm `CoordAttn` forward with the pooling and the rescale fused in Triton (the small
    conv/BN/gate part on [B, C, H+W] runs in PyTorch). backend: "auto" (Triton on CUDA when it fits,
    else the module's forward) | "triton" | "reference" ("eager": deprecated alias); a backend that
    cannot run (has_skip, planes wider than `MAX_W`, ...) raises with every reason."""
    backend = resolve_name("coord_fused", backend)
    if x.dim() != 4:
        raise ValueError(f"coord_fused: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    flags = _grad_flag(x, module) | (2 if getattr(module, "has_skip", False) else 0)
    chosen = choose_backend("coord", backend, x.device.type, x.dtype, (x.shape[3],), flags)
    return chosen.fn(x, module)


# ----------------------------------------------------------------------------- static check
def _size_cases(block: int) -> list[tuple[str, int]]:
    """Sizes that give distinct compiles for a power-of-two lane count: == 1, % 16 == 0, neither."""
    cases = [("one", 1)] if block == 1 else []
    if block >= 16:
        cases.append(("a16", block))
    if block > 1:
        cases.append(("odd", block * 3 // 4 + 1 if block >= 4 else block))
    return cases


def static_configs() -> Iterator:
    """Every launch configuration for `attn_kernels.static_check`: per dtype, every lane count
    (`_block`, `_hw_blocks` up to `MAX_W`), each feature flag, and each specialisation of the
    plane size (== 1, divisible by 16, neither); heights, chunks and splits are not specialised."""
    f = torch.empty(1, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.empty(1, dtype=dtype)
        dt = str(dtype)[6:]
        for block in (16, 32, 64, 128, 256, 512, 1024):
            cases = _size_cases(block) if block < 1024 else [("a16", 3136), ("odd", 3025)]  # 56x56, 55x55
            for tag, hw in ([("one", 1)] if block == 16 else []) + cases:
                ci = dtype == torch.bfloat16 and block == 1024 and tag == "a16"
                for flag in (False, True):
                    name = f"[{dt},{block},hw_{tag}"
                    args = (x, x, f, hw, 4 * block, 3, 0.5)
                    yield LaunchConfig(f"eca.rowsum{name}{',y' * flag}]", _rowsum_kernel, args,
                                       dict(BLOCK=block, HAS_Y=flag), ci=ci)  # fmt: skip
                    args = (x, f, f, x, hw, 1.0 / hw)
                    yield LaunchConfig(f"eca.scale{name}{',add' * flag}]", _scale_add_kernel, args,
                                       dict(BLOCK=block, HAS_A=flag), ci=ci)  # fmt: skip
        W = 1
        while W <= MAX_W:
            bh, bw, nw = _hw_blocks(W)
            for tag, w in _size_cases(bw):
                meta = dict(BLOCK_H=bh, BLOCK_W=bw)
                kw = dict(num_warps=nw, ci=dtype == torch.bfloat16 and bw == 64 and tag == "a16")
                name = f"[{dt},{bh}x{bw},w_{tag},w{nw}"
                yield LaunchConfig(f"coord.sums{name}]", _hw_sums_kernel, (x, f, f, 56, w, 4 * bh, 3), meta, **kw)
                args = (x, x, f, f, f, f, 56, w, 4 * bh, 3)
                yield LaunchConfig(f"coord.grad{name}]", _hw_grad_kernel, args, meta, **kw)
                for add in (False, True):
                    args = (x, f, f, f, f, x, 56, w, 1 / 56, 1 / w)
                    yield LaunchConfig(f"coord.scale{name}{',add' * add}]", _hw_scale_kernel, args,
                                       dict(meta, HAS_ADD=add), **kw)  # fmt: skip
            W *= 2

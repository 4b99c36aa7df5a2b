"""The one entry point, `attention`, and its torch custom op.

`attention` checks shapes (never values: no host sync), picks a backend and calls the custom op
``torch.ops.attnplug.block_sparse_attention`` (so `torch.compile` traces through it, with a
fake implementation for shapes and a registered autograd formula). What crosses the op boundary
is what the kernels read: the layout's cached `KernelLayout` lists and the modifiers' cached
device tensors, passed through as they are. Nothing is rebuilt or re-validated per call; the
reference backend finds the layout / modifier objects behind those tensors in a small registry
(so their host-side caches are reused too).
"""

from __future__ import annotations

import functools
import os

import torch

from .backends import BACKEND_NAMES, Inputs, backends_for, choose_backend, define_op, register_backend
from .layout import BlockLayout, KernelLayout, owner_of
from .modifiers import LogitDecay, OutputMix, TileStats, check_modifiers, prepare_modifiers
from .reference import reference_attention

__all__ = ["attention", "BACKENDS", "triton_available"]

#: the names `attention(backend=...)` takes (the one vocabulary of `attn_kernels.backends`)
BACKENDS = BACKEND_NAMES

#: the op's feature flags, bit i = ATTENTION.features[i] (`_flags` builds them per call)
ATTENTION = define_op(
    "attention",
    dims=("head dim q/k", "head dim v"),
    features=("layout", "element_mask", "logit_decay", "output_mix", "tile_stats", "lse", "backward"),
    doc="block-sparse attention (attn_kernels.attention)",
)
register_backend(
    "attention", "reference", auto_devices=("cpu",), priority=10,
    auto_note="it materialises the scores: never a silent slow path on a GPU",
    doc="exact PyTorch reference (fused SDPA over the gathered key blocks); any device, dtype and head dim",
)(reference_attention)  # fmt: skip


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """True when the Triton kernels can be imported."""
    try:
        from . import triton_attention  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _triton_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run these tensors (None when it can): every reason, joined.
    For tests and tools; calls go through the cached chooser."""
    triton = backends_for("attention").get("triton")
    if triton is None:
        return "the Triton kernels could not be imported (is triton installed?)"
    facts = Inputs(q.device.type, q.dtype, (q.shape[-1], v.shape[-1]), interpret=_interpret())
    return "; ".join(triton.not_supported_reasons(facts)) or None


def _validate(q, k, v, layout, scale, backend) -> None:
    """Shape / dtype / device checks (never values); the common case is one expression, the
    detailed messages come from `_validate_slow` when it fails."""
    try:
        qs, ks, vs = q.shape, k.shape, v.shape
        ok = (
            len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and q.dtype == k.dtype == v.dtype
            and q.is_floating_point() and q.device == k.device == v.device
            and qs[:2] == ks[:2] == vs[:2] and ks[3] == qs[3] and vs[2] == ks[2] and backend in BACKENDS
            and (scale is None or (type(scale) in (int, float) and scale > 0))
            and (layout is None or (type(layout) is BlockLayout and layout.q_len == qs[2] and layout.k_len == ks[2]
                                    and layout.batch in (1, qs[0]) and layout.heads in (1, qs[1])))
        )  # fmt: skip
    except (AttributeError, TypeError):
        ok = False
    if not ok or not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        _validate_slow(q, k, v, layout, scale, backend)


def _validate_slow(q, k, v, layout, scale, backend) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor [B, H, N, D], got {getattr(t, 'shape', t)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, nq, d = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(
            f"attention: batch and heads must match (no GQA): q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape[3] != d:
        raise ValueError(f"attention: q and k head dims differ ({d} vs {k.shape[3]})")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: k and v lengths differ ({k.shape[2]} vs {v.shape[2]})")
    if scale is not None and (not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"attention: scale must be a positive float, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    if layout is not None:
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"attention: layout must be a BlockLayout or None, got {type(layout).__name__}")
        if layout.q_len != nq or layout.k_len != k.shape[2]:
            raise ValueError(
                f"attention: layout is for q_len={layout.q_len}, k_len={layout.k_len} but q has {nq} and k "
                f"{k.shape[2]} tokens"
            )
        if layout.batch not in (1, B) or layout.heads not in (1, H):
            raise ValueError(
                f"attention: layout batch/heads ({layout.batch}, {layout.heads}) must be 1 or equal to "
                f"the tensors' ({B}, {H})"
            )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None = None,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
    return_lse: bool = False,
    tile_stats: TileStats | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention ``softmax(q kᵀ·scale + mask) v`` with fused modifiers.

    q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]``, v ``[B, H, Nk, Dv]`` (D, Dv <= 256); layout:
    `BlockLayout` or None (dense). modifiers: `LogitDecay` / `OutputMix`. tile_stats: `TileStats`
    to receive LiteAttention's per-tile feedback (inference only). backend: "auto" (Triton on
    CUDA, the reference on CPU), "triton" or "reference"; an explicit backend that cannot run
    raises, and so does "auto" on CUDA when Triton cannot take the call (never a silent slow
    path). Rows that see no key give 0 (lse -inf). In steady state (same layout and modifier
    objects) a call does no host work: build layouts once per (shape, phase) and reuse them.
    """
    _validate(q, k, v, layout, scale, backend)
    modifiers = tuple(modifiers)
    B, H, nq, d = q.shape
    nk = k.shape[2]
    checked = check_modifiers(modifiers, nq, nk, H) if modifiers else (None, None)
    if tile_stats is not None and not isinstance(tile_stats, TileStats):
        raise TypeError(f"attention: tile_stats must be a TileStats or None, got {type(tile_stats).__name__}")
    need_bwd = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    decay_m, mix_m = checked
    # feature flags, bit i = ATTENTION.features[i]: layout, element_mask, logit_decay, output_mix,
    # tile_stats, lse, backward (the chooser's cache key; both backends take every feature today)
    flags = 0 if layout is None else 1 if layout.elem_mask is None else 3
    if decay_m is not None:
        flags |= 4
    if mix_m is not None:
        flags |= 8
    if tile_stats is not None:
        flags |= 16
    if return_lse:
        flags |= 32
    if need_bwd:
        flags |= 64
    chosen = _choose(backend, q.device.type, q.dtype, d, v.shape[3], flags)
    scale_f = d**-0.5 if scale is None else float(scale)
    if tile_stats is not None:  # inference-only side output, through its own op (no autograd)
        layout = (layout if layout is not None else BlockLayout.dense(nq, nk, device=q.device)).to(q.device)
        decay, mix_u = prepare_modifiers(modifiers, H, nq, nk, q.device)
        dec = [None, -1, None, None] if decay is None else list(decay)
        with torch.no_grad():
            out, lse, needed = torch.ops.attnplug.block_sparse_attention_stats(
                q, k, v, list(layout.kernel_view()), _ldims(layout), *dec, mix_u, scale_f, chosen,
                float(tile_stats.threshold),
            )  # fmt: skip
        tile_stats.needed = needed
        return (out, lse) if return_lse else out
    if layout is not None:
        layout = layout.to(q.device)
    decay = None if decay_m is None else decay_m.prepare(H, nq, nk, q.device)
    mix_u = None if mix_m is None else mix_m.prepare(H, q.device)
    if chosen == "triton" and not torch.compiler.is_compiling():
        # eager fast path: the same kernels without the custom op's dispatch (torch.compile traces
        # the op below); an autograd.Function only when a gradient is wanted
        if layout is None:  # dense: the kernels walk every key block without reading lists
            kl, ldims = None, (nq, nk, 128, 128, 1, 1)
        else:
            kl, ldims = layout.kernel_view(backward=need_bwd), layout.ldims
        if need_bwd:
            out, lse = _TritonAttention.apply(q, k, v, kl, ldims, scale_f, decay, mix_u)
        else:
            out, lse = _ta().forward(q, k, v, kl, ldims, scale_f, decay, mix_u)
        return (out, lse) if return_lse else out
    if layout is None:
        lay, ldims = [], [nq, nk, 128, 128, 1, 1]
    else:
        lay, ldims = list(layout.kernel_view(backward=need_bwd and chosen == "triton")), list(layout.ldims)
    dec = [None, -1, None, None] if decay is None else list(decay)
    out, lse = torch.ops.attnplug.block_sparse_attention(q, k, v, lay, ldims, *dec, mix_u, scale_f, chosen)
    return (out, lse) if return_lse else out


@functools.cache
def _ta():
    """The Triton module (imported on first use: importing triton is optional on CPU)."""
    from . import triton_attention

    return triton_attention


class _TritonAttention(torch.autograd.Function):
    """Eager autograd of the Triton path (the custom op's formula, without its dispatch)."""

    @staticmethod
    def forward(ctx, q, k, v, kl, ldims, scale, decay, mix_u):  # type: ignore[override]
        from .triton_attention import forward

        out, lse = forward(q, k, v, kl, ldims, scale, decay, mix_u)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (kl, ldims, scale, decay, mix_u)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # type: ignore[override]
        from .triton_attention import backward

        q, k, v, out, lse = ctx.saved_tensors
        kl, ldims, scale, decay, mix_u = ctx.args
        if kl is not None and not kl.has_backward:  # forward ran with grad mode off in sight: build now
            kl = _layout_of(kl, list(ldims)).kernel_view(backward=True)
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, kl, ldims, scale, decay, mix_u)
        return dq, dk, dv, None, None, None, None, None


@torch.compiler.assume_constant_result  # torch.compile: decided once at trace time, never traced into
def _choose(backend: str, device: str, dtype: torch.dtype, d: int, dv: int, flags: int) -> str:
    """The backend name for this call: `choose_backend`'s decision, cached per (device type, dtype,
    head dims, feature flags); its error lists every backend with every reason."""
    return choose_backend("attention", backend, device, dtype, (d, dv), flags).name


def _ldims(layout: BlockLayout) -> list[int]:
    return list(layout.ldims)


# ---------------------------------------------------------------------- objects behind op tensors
def _layout_of(kl: KernelLayout, ldims: list[int]) -> BlockLayout:
    """The BlockLayout behind a kernel view (rebuilt from the merged lists if not registered)."""
    lay = owner_of(kl.all_idx)
    if isinstance(lay, BlockLayout):
        return lay
    q_len, k_len, bq, bk, bl, hl = ldims  # slow path (tensors that were copied): one host pass
    nqb, nkb = -(-q_len // bq), -(-k_len // bk)
    begin, end, idx = kl.all_begin.cpu(), kl.all_end.cpu(), kl.all_idx.cpu().long()
    mask = torch.zeros(bl * hl * nqb, nkb, dtype=torch.bool)
    part = torch.full((bl * hl * nqb, nkb), -1, dtype=torch.int32)
    pm = kl.all_mask.cpu()
    for r in range(bl * hl * nqb):
        cols = idx[int(begin[r]) : int(end[r])]
        mask[r, cols] = True
        part[r, cols] = pm[int(begin[r]) : int(end[r])]
    block_mask = mask.view(bl, hl, nqb, nkb)
    lay = BlockLayout.from_block_mask(block_mask, q_len, k_len, bq, bk)
    if kl.elem_mask is not None:
        lay = BlockLayout(
            lay.row_ptr, lay.col_idx, q_len=q_len, k_len=k_len, block_q=bq, block_k=bk, batch=bl, heads=hl,
            partial=part.view(bl, hl, nqb, nkb)[block_mask].contiguous(), elem_mask=kl.elem_mask.cpu(),
        )  # fmt: skip
    return lay.to(kl.all_idx.device)


def _modifiers_of(decay_f, decay_t, q_pos, k_pos, mix_u) -> tuple:
    mods: list = []
    if decay_f is not None:
        m = owner_of(decay_f)
        mods.append(m if isinstance(m, LogitDecay) else LogitDecay(decay_f, int(decay_t), q_pos, k_pos))
    if mix_u is not None:
        m = owner_of(mix_u)
        mods.append(m if isinstance(m, OutputMix) else OutputMix(mix_u))
    return tuple(mods)


# ---------------------------------------------------------------------- custom op plumbing
@torch.library.custom_op("attnplug::block_sparse_attention", mutates_args=())
def _block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lay: list[torch.Tensor | None],
    ldims: list[int],
    decay_factor: torch.Tensor | None,
    decay_threshold: int,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    mix_u: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kl = KernelLayout(*lay) if lay else None
    if backend == "triton":
        from .triton_attention import forward

        decay = None if decay_factor is None else (decay_factor, decay_threshold, q_pos, k_pos)
        out, lse = forward(q, k, v, kl, tuple(ldims), scale, decay, mix_u)
    else:
        layout = None if kl is None else _layout_of(kl, ldims)
        mods = _modifiers_of(decay_factor, decay_threshold, q_pos, k_pos, mix_u)
        out, lse = reference_attention(q, k, v, layout, scale=scale, modifiers=mods, return_lse=True)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("attnplug::block_sparse_attention_stats", mutates_args=())
def _block_sparse_attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lay: list[torch.Tensor | None],
    ldims: list[int],
    decay_factor: torch.Tensor | None,
    decay_threshold: int,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    mix_u: torch.Tensor | None,
    scale: float,
    backend: str,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward with LiteAttention's tile statistics as a third output (uint8 [B, H, nqb, nkb])."""
    kl = KernelLayout(*lay)
    B, H, nq, _ = q.shape
    q_len, k_len, bq, bk = ldims[:4]
    if backend == "triton":
        from .triton_attention import forward

        decay = None if decay_factor is None else (decay_factor, decay_threshold, q_pos, k_pos)
        needed = torch.zeros(B, H, -(-q_len // bq), -(-k_len // bk), dtype=torch.uint8, device=q.device)
        out, lse = forward(q, k, v, kl, tuple(ldims), scale, decay, mix_u, needed, threshold)
    else:
        stats = TileStats(threshold)
        mods = _modifiers_of(decay_factor, decay_threshold, q_pos, k_pos, mix_u)
        out, lse = reference_attention(
            q, k, v, _layout_of(kl, ldims), scale=scale, modifiers=mods, return_lse=True, tile_stats=stats
        )
        needed = stats.needed
    return out.contiguous(), lse.contiguous(), needed.contiguous()


@_block_sparse_attention_stats.register_fake
def _(q, k, v, lay, ldims, decay_factor, decay_threshold, q_pos, k_pos, mix_u, scale, backend, threshold):
    B, H, nq, _ = q.shape
    nqb, nkb = -(-ldims[0] // ldims[2]), -(-ldims[1] // ldims[3])
    return (
        q.new_empty(B, H, nq, v.shape[-1]),
        q.new_empty(B, H, nq, dtype=torch.float32),
        q.new_empty(B, H, nqb, nkb, dtype=torch.uint8),
    )


@_block_sparse_attention.register_fake
def _(q, k, v, lay, ldims, decay_factor, decay_threshold, q_pos, k_pos, mix_u, scale, backend):
    B, H, nq, _ = q.shape
    return q.new_empty(B, H, nq, v.shape[-1]), q.new_empty(B, H, nq, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, lay, ldims, decay_f, decay_t, q_pos, k_pos, mix_u, scale, backend = inputs
    out, lse = output
    # torch's custom-op autograd treats a list holding None as one leaf (its grad: None) and a list
    # of tensors as a list (its grad: a list of None)
    ctx.lay_grad = [None] * len(lay) if all(t is not None for t in lay) else None
    ctx.save_for_backward(q, k, v, out, lse, decay_f, q_pos, k_pos, mix_u, *lay)
    ctx.ldims, ctx.decay_t, ctx.scale, ctx.backend = list(ldims), decay_t, scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, decay_f, q_pos, k_pos, mix_u, *lay = ctx.saved_tensors
    kl = KernelLayout(*lay) if lay else None
    if ctx.backend == "triton":
        from .triton_attention import backward

        if kl is not None and not kl.has_backward:  # forward ran without grad mode in sight: build (once) now
            kl = _layout_of(kl, ctx.ldims).kernel_view(backward=True)
        decay = None if decay_f is None else (decay_f, ctx.decay_t, q_pos, k_pos)
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, kl, tuple(ctx.ldims), ctx.scale, decay, mix_u)
    else:  # reference: differentiate the reference itself
        layout = None if kl is None else _layout_of(kl, ctx.ldims)
        mods = _modifiers_of(decay_f, ctx.decay_t, q_pos, k_pos, mix_u)
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = reference_attention(qq, kk, vv, layout, scale=ctx.scale, modifiers=mods)
            dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), grad_out.to(o.dtype))
    return dq, dk, dv, ctx.lay_grad, None, None, None, None, None, None, None, None


_block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)

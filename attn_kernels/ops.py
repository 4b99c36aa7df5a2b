"""The one entry point, `attention`, and its torch custom op.

`attention` validates its inputs, picks a backend and calls the custom op
``torch.ops.attnplug.block_sparse_attention`` (so `torch.compile` traces through it, with a
fake implementation for shapes and a registered autograd formula). The layout and modifiers
are flattened to tensors and scalars at the op boundary and rebuilt inside.
"""

from __future__ import annotations

import os
import warnings

import torch

from .layout import BlockLayout
from .modifiers import LogitDecay, OutputMix, TileStats, check_modifiers
from .reference import reference_attention

__all__ = ["attention", "BACKENDS", "triton_available"]

BACKENDS = ("auto", "triton", "reference")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when the Triton kernels can be imported."""
    try:
        from . import triton_attention  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _triton_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run these tensors (None when it can)."""
    if not (q.is_cuda or _interpret()):
        return f"tensors are on {q.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter)"
    if not triton_available():
        return "the Triton kernels could not be imported (is triton installed?)"
    from .triton_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]}/{v.shape[-1]} is not one of the supported {SUPPORTED_HEAD_DIMS}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of the supported {SUPPORTED_DTYPES}"
    return None


def _validate(q, k, v, layout, scale, backend) -> None:
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

    q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]``, v ``[B, H, Nk, Dv]``; layout: `BlockLayout` or
    None (dense). modifiers: `LogitDecay` / `OutputMix`. tile_stats: `TileStats` to receive
    LiteAttention's per-tile feedback (inference only). backend: "auto" (Triton on CUDA, the
    reference on CPU), "triton" or "reference"; an explicit backend that cannot run raises.
    Rows that see no key give 0 (lse -inf).
    """
    _validate(q, k, v, layout, scale, backend)
    modifiers = tuple(modifiers)
    B, H, nq, d = q.shape
    check_modifiers(modifiers, nq, k.shape[2], H)
    if tile_stats is not None and not isinstance(tile_stats, TileStats):
        raise TypeError(f"attention: tile_stats must be a TileStats or None, got {type(tile_stats).__name__}")
    if tile_stats is not None and layout is None:
        layout = BlockLayout.dense(nq, k.shape[2])
    if layout is not None and layout.device != q.device:
        layout = layout.to(q.device)

    if backend == "triton":
        why = _triton_unsupported(q, v)
        if why is not None:
            raise RuntimeError(f"attention(backend='triton') cannot run: {why}")
        chosen = "triton"
    elif backend == "auto":
        why = _triton_unsupported(q, v) if q.is_cuda else "cpu"
        if q.is_cuda and why is not None:
            warnings.warn(f"attention(backend='auto'): using the PyTorch reference because {why}", stacklevel=2)
        chosen = "triton" if why is None else "reference"
    else:
        chosen = "reference"

    if tile_stats is not None:  # inference-only side output: call the implementation directly
        with torch.no_grad():
            out, lse = _impl(chosen, q, k, v, layout, scale, modifiers, tile_stats)
    else:
        args = _flatten(layout, modifiers, H)
        out, lse = torch.ops.attnplug.block_sparse_attention(
            q, k, v, *args, -1.0 if scale is None else float(scale), chosen
        )
    return (out, lse) if return_lse else out


def _impl(chosen, q, k, v, layout, scale, modifiers, tile_stats=None):
    if chosen == "triton":
        from .triton_attention import triton_attention_forward

        return triton_attention_forward(q, k, v, layout, scale=scale, modifiers=modifiers, tile_stats=tile_stats)
    return reference_attention(
        q, k, v, layout, scale=scale, modifiers=modifiers, return_lse=True, tile_stats=tile_stats
    )


# ---------------------------------------------------------------------- custom op plumbing
def _flatten(layout: BlockLayout | None, modifiers: tuple, heads: int) -> list:
    decay = next((m for m in modifiers if isinstance(m, LogitDecay)), None)
    mix = next((m for m in modifiers if isinstance(m, OutputMix)), None)
    if layout is None:
        lay = [None, None, None, None, [0, 0, 0, 0, 0, 0]]
    else:
        lay = [
            layout.row_ptr,
            layout.col_idx,
            layout.partial,
            layout.elem_mask,
            [layout.q_len, layout.k_len, layout.block_q, layout.block_k, layout.batch, layout.heads],
        ]
    dev = layout.device if layout is not None else None
    dec = [None, -1, None, None]
    if decay is not None:
        dec = [decay.factors(heads).to(dev) if dev else decay.factors(heads), decay.threshold, decay.q_pos, decay.k_pos]
    u = None if mix is None else (mix.weights(heads).to(dev) if dev else mix.weights(heads))
    return [*lay, *dec, u]


def _rebuild(row_ptr, col_idx, partial, elem_mask, dims, decay_f, decay_t, q_pos, k_pos, mix_u):
    layout = None
    if row_ptr is not None:
        q_len, k_len, bq, bk, bl, hl = dims
        layout = BlockLayout(
            row_ptr,
            col_idx,
            q_len=q_len,
            k_len=k_len,
            block_q=bq,
            block_k=bk,
            batch=bl,
            heads=hl,
            partial=partial,
            elem_mask=elem_mask,
        )
    mods: list = []
    if decay_f is not None:
        mods.append(LogitDecay(decay_f.cpu(), int(decay_t), q_pos, k_pos))
    if mix_u is not None:
        mods.append(OutputMix(mix_u.cpu()))
    return layout, tuple(mods)


@torch.library.custom_op("attnplug::block_sparse_attention", mutates_args=())
def _block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_ptr: torch.Tensor | None,
    col_idx: torch.Tensor | None,
    partial: torch.Tensor | None,
    elem_mask: torch.Tensor | None,
    dims: list[int],
    decay_factor: torch.Tensor | None,
    decay_threshold: int,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    mix_u: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout, mods = _rebuild(
        row_ptr, col_idx, partial, elem_mask, dims, decay_factor, decay_threshold, q_pos, k_pos, mix_u
    )
    out, lse = _impl(backend, q, k, v, layout, None if scale < 0 else scale, mods)
    return out.contiguous(), lse.contiguous()


@_block_sparse_attention.register_fake
def _(
    q,
    k,
    v,
    row_ptr,
    col_idx,
    partial,
    elem_mask,
    dims,
    decay_factor,
    decay_threshold,
    q_pos,
    k_pos,
    mix_u,
    scale,
    backend,
):
    B, H, nq, _ = q.shape
    return q.new_empty(B, H, nq, v.shape[-1]), q.new_empty(B, H, nq, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, row_ptr, col_idx, partial, elem_mask, dims, decay_f, decay_t, q_pos, k_pos, mix_u, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, row_ptr, col_idx, partial, elem_mask, decay_f, q_pos, k_pos, mix_u)
    ctx.dims, ctx.decay_t, ctx.scale, ctx.backend = list(dims), decay_t, scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, row_ptr, col_idx, partial, elem_mask, decay_f, q_pos, k_pos, mix_u = ctx.saved_tensors
    layout, mods = _rebuild(row_ptr, col_idx, partial, elem_mask, ctx.dims, decay_f, ctx.decay_t, q_pos, k_pos, mix_u)
    scale = None if ctx.scale < 0 else ctx.scale
    if ctx.backend == "triton":
        from .triton_attention import triton_attention_backward

        dq, dk, dv = triton_attention_backward(grad_out, q, k, v, out, lse, layout, scale=scale, modifiers=mods)
    else:  # reference: differentiate the reference itself
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = reference_attention(qq, kk, vv, layout, scale=scale, modifiers=mods)
            dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), grad_out.to(o.dtype))
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)

"""Exact PyTorch reference of the block-sparse attention kernel (every feature), chunked.

Computes in fp32 one query block (or, without a layout, one chunk of query rows) at a time, so
memory is ``B*H*chunk*Nk`` instead of ``B*H*Nq*Nk``. Differentiable through autograd. Used on
CPU and as the test oracle of the Triton kernel.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout
from .modifiers import TileStats, check_modifiers

__all__ = ["reference_attention"]

_LOG2E = 1.0 / math.log(2.0)


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
    """Reference of `attn_kernels.attention` (same arguments); rows with no key give 0 / lse -inf."""
    B, H, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    decay, mix = check_modifiers(tuple(modifiers), nq, nk, H)
    if decay is not None:
        qpos, kpos = decay.positions(nq, nk, q.device)
        factors = decay.factors(H)
    kf, vf = k.float(), v.float()
    if layout is None:
        step = max(1, chunk)
        starts = range(0, nq, step)
    else:
        step = layout.block_q
        starts = range(0, layout.num_q_blocks * step, step)
        if tile_stats is not None:
            nkb = layout.num_k_blocks
            needed = torch.zeros(B, H, layout.num_q_blocks, nkb, dtype=torch.uint8, device=q.device)
    if tile_stats is not None and layout is None:
        raise ValueError("tile_stats needs a BlockLayout (tiles are the layout's blocks)")
    outs, lses = [], []
    for i, r0 in enumerate(starts):
        r1 = min(r0 + step, nq)
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, r0:r1].float(), kf) * scale
        if decay is not None:
            s = decay.reference_scores(s, qpos[r0:r1], kpos, factors)
        if layout is not None:
            allowed = layout.row_token_mask(i)[:, :, : r1 - r0]  # [Bl,Hl,rows,Nk]
            s = s.masked_fill(~allowed, float("-inf"))
            if tile_stats is not None:
                needed[:, :, i] = _tile_needed(s.detach(), layout, tile_stats.threshold)
        m = s.amax(-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m_safe)
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("bhqk,bhkd->bhqd", p, vf) / denom.clamp_min(1e-30)
        o = torch.where(denom > 0, o, torch.zeros_like(o))
        if mix is not None:
            o = mix.reference_output(o, vf[:, :, r0:r1], H)
        outs.append(o)
        lses.append(torch.where(denom[..., 0] > 0, m_safe[..., 0] + torch.log(denom[..., 0]), float("-inf")))
    out = torch.cat(outs, 2).to(q.dtype)
    if tile_stats is not None:
        tile_stats.needed = needed
    if return_lse:
        return out, torch.cat(lses, 2)
    return out


def _tile_needed(s: torch.Tensor, layout: BlockLayout, threshold: float) -> torch.Tensor:
    """LiteAttention rule on one query block: s [B,H,rows,Nk] masked logits -> uint8 [B,H,nkb]."""
    B, H, rows, nk = s.shape
    bk, nkb = layout.block_k, layout.num_k_blocks
    pad = nkb * bk - nk
    sp = torch.nn.functional.pad(s, (0, pad), value=float("-inf")) if pad else s
    tile_max = sp.view(B, H, rows, nkb, bk).amax(-1)  # [B,H,rows,nkb]; -inf where unvisited/masked
    # running max before each tile, tiles visited in ascending key-block order
    run = torch.cummax(tile_max, dim=-1).values
    before = torch.cat([torch.full_like(run[..., :1], float("-inf")), run[..., :-1]], -1)
    need_row = tile_max * _LOG2E > before * _LOG2E + threshold  # False for -inf tiles, True after -inf
    return need_row.any(2).to(torch.uint8)

"""Neighborhood attention / Generalized Neighborhood Attention (GNA) over (frames, height, width).

Semantics are NATTEN 0.21's (`natten.na3d` / `na2d`, its flex backend's mask rule), per
dimension with extent n, kernel k, stride s, dilation d (our own code):

* dilation: token x belongs to dilation group x % d and sits at x // d inside it; a query only
  sees keys of its own group, and the group's length is the dimension's extent for the window
  rules below.
* non-causal: queries are grouped by stride (x // s); the group's leader is its centre query
  (right-hand centre for even s, at most the last token); the window centre is the leader clamped
  to [k // 2, n_g - 1 - (k // 2 + k % 2 - 1)] and the window spans k // 2 to the left and
  k // 2 + k % 2 - 1 to the right (window start clamped at borders).
* causal: the leader is the last query of the stride group; a query sees keys at or before
  itself and no more than k - 1 before its leader.

Text tokens attend to everything and every token attends to them. For speed the visual tokens
are permuted so that 3-D tiles of `block_size` tokens are contiguous blocks (GNA's token
permutation; the tile shape is chosen pad-free when the grid allows); the text goes last. Blocks
that are only partly inside the neighbourhood carry element-level masks
(`BlockLayout.from_mask_mod`). The layout, permutation and inverse are built on the host at the
first call of each (token layout, device) and cached; later calls do no host work.

Options are ints (broadcast to every dimension whose extent is > 1; a dimension of extent 1, e.g.
the frames of an image, then gets kernel 1) or 3-tuples (frames, height, width). Ranges are
checked when the layout is known: 1 <= kernel_size <= extent, 1 <= stride <= kernel_size,
kernel_size * dilation <= extent. kernel_size 1 is allowed (NATTEN needs >= 2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch

from attn_kernels import BlockLayout
from attn_kernels.layout import _pack_bits
from attn_spec import Range

from .base import AttnContext, AttnPlan, BlockSize, TokenLayout, Variant, check_options, register_variant

__all__ = [
    "Neighborhood",
    "na_1d_mask",
    "na_token_mask",
    "choose_tile_shape",
    "tile_permutation",
    "separable_block_layout",
]

_DIMS = ("frames", "height", "width")
#: an int >= 1 per grid dimension (an int: the same for all three)
_PerDim = Range(1, None, labels=_DIMS)


def na_1d_mask(n: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = False) -> torch.Tensor:
    """bool [n, n]: query x (rows) sees key y (columns) along one dimension, NATTEN's rule."""
    q = torch.arange(n).view(-1, 1)
    kv = torch.arange(n).view(1, -1)
    q_di, kv_di = q // dilation, kv // dilation
    q_g, kv_g = q % dilation, kv % dilation
    pad = 1 - ((q_g + (dilation - (n % dilation))) // dilation)
    n_g = n // dilation + pad  # extent of the query's dilation group
    same_group = q_g == kv_g
    if causal:
        leader = torch.minimum((q_di // stride) * stride + stride - 1, n_g - 1)
        return (q_di - kv_di >= 0) & (leader - kv_di < kernel) & same_group
    left = kernel // 2
    right = kernel // 2 + (kernel % 2 - 1)
    leader = torch.minimum((q_di // stride) * stride + stride // 2, n_g - 1)
    # torch.clamp(leader, min=left, max=n_g - 1 - right) semantics: the max bound wins
    center = torch.minimum(torch.maximum(leader, torch.full_like(leader, left)), n_g - 1 - right)
    w0 = center - kv_di
    w1 = kv_di - center
    return (((w0 >= 0) & (w0 <= left)) | ((w1 >= 0) & (w1 <= right))) & same_group


def na_token_mask(
    grid: tuple[int, int, int],
    kernel_size: tuple[int, int, int],
    stride: tuple[int, int, int] = (1, 1, 1),
    dilation: tuple[int, int, int] = (1, 1, 1),
    is_causal: tuple[bool, bool, bool] = (False, False, False),
) -> torch.Tensor:
    """bool [N, N] over visual tokens in raster (frames, height, width) order (small grids only)."""
    ms = [na_1d_mask(n, k, s, d, c) for n, k, s, d, c in zip(grid, kernel_size, stride, dilation, is_causal)]
    full = (
        ms[0][:, None, None, :, None, None] & ms[1][None, :, None, None, :, None] & ms[2][None, None, :, None, None, :]
    )
    n = math.prod(grid)
    return full.reshape(n, n)


def _tile_counts(mask: torch.Tensor, tile: int) -> int:
    """Number of (query tile, key tile) pairs along one dimension with some visible element."""
    n = mask.shape[0]
    nt = -(-n // tile)
    padded = torch.zeros(nt * tile, nt * tile, dtype=torch.bool)
    padded[:n, :n] = mask
    return int(padded.view(nt, tile, nt, tile).any(3).any(1).sum())


def choose_tile_shape(
    grid: tuple[int, int, int], block_size: int, dim_masks: list[torch.Tensor] | None = None
) -> tuple[int, int, int]:
    """Tile (power-of-2 sides, each <= extent) with the largest volume <= block_size; among those
    prefer tiles dividing the grid (pad-free, one tile = one block), then the fewest visited tiles."""
    sides = [[2**e for e in range(int(math.log2(block_size)) + 1) if 2**e <= n] for n in grid]
    best: tuple[Any, ...] | None = None
    for cand in itertools.product(*sides):
        vol = math.prod(cand)
        if vol > block_size:
            continue
        divides = all(n % t == 0 for n, t in zip(grid, cand))
        visited = 0
        if dim_masks is not None:
            visited = math.prod(_tile_counts(m, t) for m, t in zip(dim_masks, cand))
        key = (-vol, not divides, visited, cand)
        if best is None or key < best:
            best = key
    assert best is not None
    return tuple(best[3])  # type: ignore[return-value]


def tile_permutation(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """int64 [N]: raster visual indices ordered tile by tile (raster over tiles, then inside a tile)."""
    f, h, w = grid
    t = torch.arange(f).view(-1, 1, 1).expand(f, h, w)
    y = torch.arange(h).view(1, -1, 1).expand(f, h, w)
    x = torch.arange(w).view(1, 1, -1).expand(f, h, w)
    nth, ntw = -(-h // tile[1]), -(-w // tile[2])
    tile_id = ((t // tile[0]) * nth + y // tile[1]) * ntw + x // tile[2]
    inner = ((t % tile[0]) * tile[1] + y % tile[1]) * tile[2] + x % tile[2]
    key = (tile_id * math.prod(tile) + inner).reshape(-1)
    return torch.argsort(key, stable=True)


def separable_block_layout(
    dim_masks: list[torch.Tensor], layout: TokenLayout, perm: torch.Tensor | None, block_size: int
) -> Any:
    """The BlockLayout of a separable visual mask (outer AND of per-dimension masks, text global) on the
    (permuted) sequence, without evaluating the N x N token mask: equal to `BlockLayout.from_mask_mod` of
    `Neighborhood.mask_mod` (same blocks, partial blocks and element masks).

    Per query block Q the visible pairs with every key block are counted at once: T_Q[t, y, x] =
    sum over Q's visual queries of A[t_q, t] B[y_q, y] C[x_q, x] is one (frames * height) x |Q| x width
    matrix product, and a key block's count is the sum of T_Q over its keys (text pairs are all visible).
    A block is visited when the count is > 0 and full when it equals its valid pairs; only partial blocks
    get element masks. HunyuanVideo's 30 x 48 x 80 grid: seconds instead of evaluating 1.3e10 pairs."""
    n, b = layout.seq_len, block_size
    f, h, w = layout.grid
    nv, v0 = layout.num_visual, layout.visual_slice.start
    order = perm if perm is not None else torch.arange(n)
    vis_idx = order - v0
    is_vis = (vis_idx >= 0) & (vis_idx < nv)
    vi = vis_idx.clamp(0, nv - 1)
    ct, ch, cw = vi // (h * w), (vi // w) % h, vi % w
    a_m, b_m, c_m = (m.to(torch.float32) for m in dim_masks)
    nb = -(-n // b)
    pad = nb * b - n
    valid = torch.nn.functional.pad(torch.ones(n), (0, pad)).view(nb, b).sum(1)  # valid tokens per block
    n_vis = torch.nn.functional.pad(is_vis.float(), (0, pad)).view(nb, b).sum(1)
    vis_f = is_vis.float()
    counts = torch.empty(nb, nb)
    for qb in range(nb):
        rows = torch.arange(qb * b, min((qb + 1) * b, n))
        rows = rows[is_vis[rows]]
        if rows.numel() == 0:
            counts[qb] = 0.0
            continue
        x = (a_m[ct[rows]][:, :, None] * b_m[ch[rows]][:, None, :]).reshape(rows.numel(), f * h)
        t_q = (x.T @ c_m[cw[rows]]).reshape(-1)  # [f * h * w] raster: visible queries of Q per key position
        per_key = t_q[vi] * vis_f
        counts[qb] = torch.nn.functional.pad(per_key, (0, pad)).view(nb, b).sum(1)
    total = valid[:, None] * valid[None, :]
    counts = counts + total - n_vis[:, None] * n_vis[None, :]
    block_mask = counts > 0
    partial = block_mask & (counts < total)
    bl = BlockLayout.from_block_mask(block_mask, n, n, b, b)
    if not bool(partial.any()):
        return bl
    mask_mod = _separable_mask_mod(dim_masks, layout, order)
    pidx = torch.full((nb, nb), -1, dtype=torch.int32)
    bits, n_partial = [], 0
    cols = torch.arange(b)
    for qb in torch.nonzero(partial.any(1)).flatten().tolist():
        kbs = torch.nonzero(partial[qb]).flatten()
        q = torch.arange(qb * b, (qb + 1) * b)
        kv = (kbs[:, None] * b + cols[None, :]).reshape(-1)
        m = mask_mod(q.clamp(max=n - 1)[:, None], kv.clamp(max=n - 1)[None, :])
        m = m & (q < n)[:, None] & (kv < n)[None, :]
        m = m.view(b, kbs.numel(), b).permute(1, 0, 2)  # [partial blocks, block_q, block_k]
        pidx[qb, kbs] = torch.arange(n_partial, n_partial + kbs.numel(), dtype=torch.int32)
        n_partial += kbs.numel()
        bits.append(_pack_bits(m))
    return BlockLayout(
        bl.row_ptr, bl.col_idx, q_len=n, k_len=n, block_q=b, block_k=b,
        partial=pidx[block_mask].to(torch.int32), elem_mask=torch.cat(bits, 0),
    )  # fmt: skip


def _separable_mask_mod(
    dim_masks: list[torch.Tensor], layout: TokenLayout, order: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """mask(q_idx, kv_idx) on the (permuted) sequence: per-dimension masks ANDed, text pairs visible."""
    f, h, w = layout.grid
    nv = layout.num_visual
    vis_idx = order - layout.visual_slice.start
    is_vis = (vis_idx >= 0) & (vis_idx < nv)
    vi = vis_idx.clamp(0, nv - 1)
    ct, ch, cw = vi // (h * w), (vi // w) % h, vi % w

    def mask(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        m = dim_masks[0][ct[q], ct[kv]] & dim_masks[1][ch[q], ch[kv]] & dim_masks[2][cw[q], cw[kv]]
        return m | ~is_vis[q] | ~is_vis[kv]

    return mask


def _as3(name: str, value: Any, kind: type) -> tuple[Any, ...]:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return (value,) * 3
    if isinstance(value, (tuple, list)) and len(value) == 3:
        for i, v in enumerate(value):
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise TypeError(f"Neighborhood.{name}[{i}] ({_DIMS[i]}) must be {kind.__name__}, got {v!r}")
        return tuple(value)
    raise TypeError(f"Neighborhood.{name} must be {kind.__name__} or a 3-tuple (frames, height, width), got {value!r}")


@register_variant
@dataclass
class Neighborhood(Variant):
    """NATTEN-style neighborhood attention (GNA with stride) on the visual tokens; text global.

    kernel_size, stride, dilation: int or (frames, height, width); is_causal: bool or 3-tuple
    (causal in time is `(True, False, False)`); block_size: tile volume / kernel block;
    tile_shape: explicit tile (None = automatic); permute: reorder tokens into tiles.
    """

    name: ClassVar[str] = "gna"
    aliases: ClassVar[tuple[str, ...]] = ("neighborhood",)
    approximates_dense: ClassVar[bool] = True
    role: ClassVar[str] = "sparsity"
    families: ClassVar[tuple[str, ...] | None] = None

    kernel_size: Annotated[int | tuple[int, int, int], _PerDim] = 7
    stride: Annotated[int | tuple[int, int, int], _PerDim] = 1
    dilation: Annotated[int | tuple[int, int, int], _PerDim] = 1
    is_causal: bool | tuple[bool, bool, bool] = False
    block_size: BlockSize = 128
    tile_shape: Annotated[tuple[int, int, int] | None, _PerDim] = None
    permute: bool = True

    def __post_init__(self) -> None:
        self._cache: dict = {}  # static plans per (layout, device); not a dataclass field
        for name in ("kernel_size", "stride", "dilation", "is_causal", "tile_shape"):
            if isinstance(getattr(self, name), list):  # YAML / JSON lists -> tuples
                setattr(self, name, tuple(getattr(self, name)))
        for name in ("kernel_size", "stride", "dilation"):  # types and shapes; ranges below
            _as3(name, getattr(self, name), int)
        if self.tile_shape is not None:
            self.tile_shape = _as3("tile_shape", self.tile_shape, int)  # type: ignore[assignment]
        _as3("is_causal", self.is_causal, bool)
        check_options(self)  # the ranges declared on the fields above
        if not isinstance(self.permute, bool):
            raise TypeError(f"Neighborhood.permute must be bool, got {self.permute!r}")

    def resolved(self, grid: tuple[int, int, int]) -> dict[str, tuple]:
        """Per-dimension (kernel, stride, dilation, causal) for `grid`, validated against it."""
        out: dict[str, list] = {}
        for name, kind in (("kernel_size", int), ("stride", int), ("dilation", int), ("is_causal", bool)):
            raw = getattr(self, name)
            vals = list(_as3(name, raw, kind))
            if not isinstance(raw, (tuple, list)):  # broadcast int: extent-1 dims are trivial
                neutral = False if kind is bool else 1
                vals = [neutral if n == 1 else v for v, n in zip(vals, grid)]
            out[name] = vals
        for i, n in enumerate(grid):
            k, s, d = out["kernel_size"][i], out["stride"][i], out["dilation"][i]
            dim = f"[{i}] ({_DIMS[i]}, extent {n})"
            if k > n:
                raise ValueError(f"Neighborhood.kernel_size{dim} must be in [1, {n}], got {k}")
            if s > k:
                raise ValueError(f"Neighborhood.stride{dim} must be in [1, kernel_size={k}], got {s}")
            if k * d > n:
                raise ValueError(
                    f"Neighborhood.dilation{dim} must be in [1, {n // k}] (kernel_size*dilation <= extent), got {d}"
                )
        return {k: tuple(v) for k, v in out.items()}

    def dim_masks(self, grid: tuple[int, int, int]) -> list[torch.Tensor]:
        """The three 1-D masks [n, n] whose outer AND is the visual token mask."""
        r = self.resolved(grid)
        return [
            na_1d_mask(n, k, s, d, c)
            for n, k, s, d, c in zip(grid, r["kernel_size"], r["stride"], r["dilation"], r["is_causal"])
        ]

    def token_mask(self, layout: TokenLayout) -> torch.Tensor:
        """bool [N, N] on the ORIGINAL token order (text global); small layouts only."""
        ms = self.dim_masks(layout.grid)
        f, h, w = layout.grid
        vis = (
            ms[0][:, None, None, :, None, None]
            & ms[1][None, :, None, None, :, None]
            & ms[2][None, None, :, None, None, :]
        )
        nv = layout.num_visual
        full = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
        vs = layout.visual_slice
        full[vs, vs] = vis.reshape(nv, nv)
        return full

    def permutation(self, layout: TokenLayout) -> tuple[torch.Tensor | None, tuple[int, int, int] | None]:
        """(perm over the whole sequence or None, tile shape or None): visual tiles first, text last."""
        if not self.permute:
            return None, None
        grid = layout.grid
        if self.tile_shape is not None:
            for i, (t, n) in enumerate(zip(self.tile_shape, grid)):
                if t > n:
                    raise ValueError(f"Neighborhood.tile_shape[{i}] ({_DIMS[i]}) must be in [1, {n}], got {t}")
            tile = tuple(self.tile_shape)
        else:
            tile = choose_tile_shape(grid, self.block_size, self.dim_masks(grid))
        vis = tile_permutation(grid, tile) + layout.visual_slice.start  # type: ignore[arg-type]
        text = torch.arange(layout.text_slice.start, layout.text_slice.stop)
        perm = torch.cat([vis, text])
        if torch.equal(perm, torch.arange(layout.seq_len)):
            return None, tile  # type: ignore[return-value]
        return perm, tile  # type: ignore[return-value]

    def mask_mod(
        self, layout: TokenLayout, perm: torch.Tensor | None, device: torch.device | str = "cpu"
    ) -> Callable[..., torch.Tensor]:
        """FlexAttention-style mask_mod(b, h, q_idx, kv_idx) on the (permuted) sequence."""
        grid = layout.grid
        ms = [m.to(device) for m in self.dim_masks(grid)]
        n = layout.seq_len
        order = perm if perm is not None else torch.arange(n)
        vis_idx = order - layout.visual_slice.start
        is_vis = (vis_idx >= 0) & (vis_idx < layout.num_visual)
        vi = vis_idx.clamp(0, layout.num_visual - 1)
        f, h, w = grid
        ct = torch.where(is_vis, vi // (h * w), -1).to(device)
        ch = torch.where(is_vis, (vi // w) % h, -1).to(device)
        cw = torch.where(is_vis, vi % w, -1).to(device)

        def mask_mod(b, hh, q_idx, kv_idx):
            out_device = q_idx.device
            q_idx, kv_idx = q_idx.to(ct.device), kv_idx.to(ct.device)
            tq, tk = ct[q_idx], ct[kv_idx]
            text = (tq < 0) | (tk < 0)
            m = ms[0][tq.clamp(min=0), tk.clamp(min=0)]
            m = m & ms[1][ch[q_idx].clamp(min=0), ch[kv_idx].clamp(min=0)]
            m = m & ms[2][cw[q_idx].clamp(min=0), cw[kv_idx].clamp(min=0)]
            return (m | text).to(out_device)

        return mask_mod

    def build(self, layout: TokenLayout, device: torch.device | str = "cpu") -> tuple[Any, torch.Tensor | None]:
        """(BlockLayout on the permuted sequence, perm) — cached per layout."""
        return self._static(layout, device)[:2]

    def _static(self, layout: TokenLayout, device: torch.device | str) -> tuple[Any, Any, Any]:
        """(BlockLayout, perm, inverse perm), built on the host once per (layout, device) and
        cached; every later call is a dict lookup (no host work, traceable by Dynamo)."""
        key = (layout, str(device))
        hit = self._cache.get(key)
        if hit is None:
            self.resolved(layout.grid)  # validate first: clear errors before any work
            perm, _ = self.permutation(layout)
            bl = separable_block_layout(self.dim_masks(layout.grid), layout, perm, self.block_size).to(device)
            inv = None if perm is None else torch.argsort(perm).to(device)
            hit = self._cache[key] = (bl, None if perm is None else perm.to(device), inv)
        return hit

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        plan.layout, plan.perm, plan.inv = self._static(ctx.layout, ctx.device)
        return plan

    def reset(self) -> None:
        """Static mask: nothing per generation."""

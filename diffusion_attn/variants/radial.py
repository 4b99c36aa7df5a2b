"""Radial attention (Li et al. 2025, mit-han-lab/radial-attention) as a static block-sparse mask.

The mask follows the official `radial_attn/attn_mask.py` rules (our own code):

* s = visual tokens per frame, d = |i - j| for latent frames i, j, g = d.bit_length(),
  L = 2**bitlen(s) / 2**g.
* Frame pair (i, j): dense when d <= 1 (and, for Wan, every query frame -> frame 0, the attention
  sink); otherwise a band |k - l| <= w over the in-frame token indices k, l with
  w = max(L * decay_factor, block_size).
* Far frame pairs are thinned: when L < block_size the pair is kept only if
  d % int(block_size / L) == 0 (applied to every pair except the Wan sink, as in the official code).
* Each frame pair's token mask is reduced to blocks on its own, exactly like the official
  `shrinkMaskStrict`: the pair is placed at its in-block offset inside ceil(s / block_size) blocks
  (rows of the frame past those blocks are cut, as in the official code); a block is kept when
  > 60% of its non-empty columns have density > 1/3 (density = visible rows / block_size); the
  block masks of all pairs are OR-ed. Text rows and columns (from the block holding the first text
  token on) are dense.
* Empty block rows: the official rule itself leaves block rows without any key where a frame
  boundary falls inside a block and neither frame's share of that block passes the density rule
  (e.g. 416x624 Wan: 1014 tokens per frame, block rows 15, 23, 31, ... of the official mask are
  empty), and for frames much smaller than a block. Such a row keeps its diagonal block, so no
  query is left without keys (our guard, not in the official code).

Differences from the official code (which needs token counts that are multiples of 128): any
token count and resolution, any block size in {16, 32, 64, 128} (the official 128 is used for
both the minimum band width and the thinning threshold), and text placed before the visual tokens
is moved behind them with `AttnPlan.perm` so the mask is the official [visual, text] one. Every
full block row is the official mask. The partial last block row (visual tokens not a multiple of
the block size, no text after them) has only n_tail < block_size real rows: it gets the same
per-pair rule over its real rows with density = visible rows / n_tail (the official density
would score it as if it had block_size rows and drop it: its tokens would see only themselves);
the kernel masks the missing rows and columns.

The layout is built on the host at the first sparse call of each (token layout, options,
device) and cached with its permutation and inverse; every later call is a dict lookup with no
host work (what CUDA-graph capture and torch.compile need: warm it up with `handle.prepare`).

Schedule: the first `dense_steps` denoising steps, the first `dense_layers` layers and
optionally the last `dense_last_steps` steps run dense. Defaults (None) come from the layout's
family: Wan2.1 (1 layer, 12 steps, decay 0.2, sink), HunyuanVideo (0 layers, 12 steps, decay 0.95).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch

from attn_kernels import BlockLayout
from attn_spec import Range

from .base import AttnContext, AttnPlan, BlockSize, TokenLayout, Variant, check_options, register_variant

__all__ = ["Radial", "radial_block_mask"]


def _pair_rule(i: int, j: int, s: int, decay: float, block: int, sink: bool) -> float | None:
    """Band half-width of frame pair (i, j) (math.inf = dense), or None when the pair is dropped."""
    if sink and j == 0:
        return math.inf
    d = abs(i - j)
    g = d.bit_length()
    length = 2 ** s.bit_length() / 2**g  # official `decay_length` without decay factor
    if length < block and d % int(block / length) != 0:
        return None  # official get_diagonal_split_mask -> zeros
    if d <= 1:
        return math.inf
    return max(length * decay, block)


def _frame_pair_blocks(rr: int, rc: int, s: int, width: float, block: int) -> torch.Tensor:
    """Official per-pair shrink: the s x s band placed at offsets (rr, rc) in nbs x nbs blocks."""
    nbs = -(-s // block)
    w = s if math.isinf(width) else min(int(math.floor(width)), s)
    # rows of row-block R in local coordinates: [R*b - rr, R*b - rr + b) ∩ [0, s)
    starts = torch.arange(nbs) * block - rr
    r_lo = starts.clamp(min=0).view(nbs, 1)
    r_hi = (starts + block).clamp(max=s).view(nbs, 1)  # exclusive
    cols = torch.arange(nbs * block) - rc  # local column index of each padded column
    c = cols.view(1, -1)
    lo = torch.maximum(r_lo, c - w)
    hi = torch.minimum(r_hi, c + w + 1)
    count = (hi - lo).clamp(min=0)
    count = torch.where((c >= 0) & (c < s), count, torch.zeros_like(count))  # [nbs, nbs*b]
    count = count.view(nbs, nbs, block)
    nonzero = (count > 0).sum(-1)
    high = (count * 3 > block).sum(-1)  # density > 1/3
    return high * 5 > nonzero * 3  # > 60% of the non-empty columns (0 non-empty -> False)


def _tail_row(frames: int, s: int, nv: int, nb: int, b: int, decay: float, sink: bool) -> torch.Tensor:
    """Block row of the partial last block (rows [nv // b * b, nv)): per frame pair, a key block is
    kept when > 60% of its non-empty columns are visible from > 1/3 of the block's n_tail real rows."""
    r0 = (nv // b) * b
    n_tail = nv - r0
    row = torch.zeros(nb, dtype=torch.bool)
    cols = torch.arange(s)
    for i in range(r0 // s, frames):
        a, e = max(r0, i * s) - i * s, min((i + 1) * s, nv) - i * s  # the frame's local rows in the tail
        if a >= e:
            continue
        for j in range(frames):
            width = _pair_rule(i, j, s, decay, b, sink)
            if width is None:
                continue
            if math.isinf(width):
                count = torch.full((s,), e - a)
            else:
                w = min(int(math.floor(width)), s)
                count = (torch.minimum(torch.tensor(e), cols + w + 1) - torch.maximum(torch.tensor(a), cols - w)).clamp(
                    min=0
                )
            blk = (j * s + cols) // b
            nonzero = torch.zeros(nb, dtype=torch.long).index_add_(0, blk, (count > 0).long())
            high = torch.zeros(nb, dtype=torch.long).index_add_(0, blk, (count * 3 > n_tail).long())
            row |= high * 5 > nonzero * 3
    return row


def radial_block_mask(
    grid: tuple[int, int, int],
    text_len: int = 0,
    *,
    decay_factor: float,
    attention_sink: bool,
    block_size: int = 128,
) -> torch.Tensor:
    """Block mask [nb, nb] (bool, CPU) of radial attention on the sequence [visual, text].

    `grid` = (frames, height, width) of visual tokens; nb = ceil((visual + text) / block_size).
    """
    frames = int(grid[0])
    s = int(grid[1]) * int(grid[2])
    nv = frames * s
    n = nv + text_len
    b = block_size
    nb = -(-n // b)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    if text_len > 0:
        border = nv // b  # official: the block holding the video/text border is dense too
        out[border:] = True
        out[:, border:] = True
    memo: dict[tuple[int, int, float], torch.Tensor] = {}
    nbs = -(-s // b)
    for i in range(frames):
        r0 = (i * s) // b
        rr = (i * s) % b
        for j in range(frames):
            width = _pair_rule(i, j, s, decay_factor, b, attention_sink)
            if width is None:
                continue
            rc = (j * s) % b
            key = (rr, rc, width)
            blk = memo.get(key)
            if blk is None:
                blk = memo[key] = _frame_pair_blocks(rr, rc, s, width, b)
            c0 = (j * s) // b
            r1, c1 = min(r0 + nbs, nb), min(c0 + nbs, nb)
            out[r0:r1, c0:c1] |= blk[: r1 - r0, : c1 - c0]
    tail = nv - (nv // b) * b
    if text_len == 0 and tail:  # partial last block row: the rule over its real rows only
        out[nv // b] = _tail_row(frames, s, nv, nb, b, decay_factor, attention_sink)
    # Guard (not in the official code): the official rule can leave a block row without any key
    # (a frame boundary inside the block with too few rows of each frame for the density rule, e.g.
    # 1014-token frames at 416x624; or frames much smaller than a block). Such a row keeps its
    # diagonal block, so no query is left without keys. Rows the official mask keeps are unchanged.
    empty = ~out.any(1)
    if bool(empty.any()):
        idx = torch.nonzero(empty).flatten()
        out[idx, idx] = True
    return out


@register_variant
@dataclass
class Radial(Variant):
    """Radial attention: static O(n log n) spatio-temporal block mask with dense warm-up.

    decay_factor: band width multiplier (> 0); dense_steps: first denoising steps run dense;
    dense_layers: first hooked layers run dense; dense_last_steps: last steps run dense (needs
    `num_steps`, the generation's number of denoising steps); attention_sink: every query sees
    frame 0 (Wan). None picks the family default (`official_defaults["radial"]` of the family's adapter).
    """

    name: ClassVar[str] = "radial"
    approximates_dense: ClassVar[bool] = True
    role: ClassVar[str] = "sparsity"
    families: ClassVar[tuple[str, ...] | None] = None
    # family_defaults: the adapters' official_defaults["radial"]; other families: give the four options

    decay_factor: Annotated[float | None, Range(1e-6, None)] = None
    dense_steps: Annotated[int | None, Range(0, None)] = None
    dense_layers: Annotated[int | None, Range(0, None)] = None
    dense_last_steps: Annotated[int, Range(0, None)] = 0
    num_steps: Annotated[int | None, Range(1, None)] = None
    attention_sink: bool | None = None
    block_size: BlockSize = 128

    def __post_init__(self) -> None:
        check_options(self)  # the ranges declared on the fields above
        self._cache: dict = {}  # static plans per (layout, device); not a dataclass field
        self._resolved: dict[str, dict[str, Any]] = {}  # family -> settings (see resolved)
        if self.attention_sink is not None and not isinstance(self.attention_sink, bool):
            raise TypeError(f"Radial.attention_sink must be bool or None, got {self.attention_sink!r}")

    # -- resolved settings ------------------------------------------------------------------
    def resolved(self, family: str) -> dict[str, Any]:
        """The effective settings for an adapter family (None options replaced by its official defaults;
        ValueError when the family has none and an option is None)."""
        hit = self._resolved.get(family)
        if hit is None:  # once per family: the adapters' tables are read on the host, never per (compiled) call
            hit = self._resolved[family] = self.family_values(family)
        return hit

    def is_dense(self, ctx: AttnContext) -> bool:
        """True when this call runs dense (warm-up step, dense layer or dense last step)."""
        cfg = self.resolved(ctx.layout.family)
        if ctx.step < cfg["dense_steps"] or ctx.layer < cfg["dense_layers"]:
            return True
        if self.dense_last_steps > 0:
            total = self.num_steps if self.num_steps is not None else ctx.num_steps
            if total is None:
                raise ValueError(self._needs_steps_message())
            if ctx.step >= total - self.dense_last_steps:
                return True
        return False

    def _needs_steps_message(self) -> str:
        return (
            f"Radial.dense_last_steps={self.dense_last_steps} needs the number of denoising steps: pass "
            "apply(..., num_steps=N) or Radial(num_steps=N), or run the diffusers pipeline given to apply()"
        )

    def missing_num_steps(self, num_steps: int | None) -> str | None:
        if self.dense_last_steps > 0 and self.num_steps is None and num_steps is None:
            return self._needs_steps_message()
        return None

    def inactive_reason(self, family: str, num_steps: int | None, num_layers: int) -> str | None:
        """Every layer or every step dense: the variant changes nothing."""
        cfg = self.resolved(family)
        if num_layers and cfg["dense_layers"] >= num_layers:
            return (
                f"Radial: dense_layers={cfg['dense_layers']} >= the {num_layers} hooked attention layers: "
                "every layer runs dense, Radial does nothing"
            )
        total = self.num_steps if self.num_steps is not None else num_steps
        if total is not None and cfg["dense_steps"] + self.dense_last_steps >= total:
            return (
                f"Radial: dense_steps={cfg['dense_steps']} + dense_last_steps={self.dense_last_steps} cover all "
                f"{total} denoising steps: every step runs dense, Radial does nothing"
            )
        return None

    def phase_steps(self, family: str, num_steps: int | None = None) -> tuple[int, ...]:
        """Dense warm-up step 0 (if any), the first sparse step and the first dense last step."""
        first_sparse = self.resolved(family)["dense_steps"]
        steps = {0, first_sparse}
        total = self.num_steps if self.num_steps is not None else num_steps
        if self.dense_last_steps > 0 and total is not None:
            steps.add(max(0, total - self.dense_last_steps))
        return tuple(sorted(steps))

    def block_mask(self, layout: TokenLayout) -> torch.Tensor:
        """Block mask [nb, nb] on the sequence [visual, text] (cached per layout and options)."""
        cfg = self.resolved(layout.family)
        return radial_block_mask(
            layout.grid,
            layout.text_len,
            decay_factor=cfg["decay_factor"],
            attention_sink=cfg["attention_sink"],
            block_size=self.block_size,
        )

    def _static(self, layout: TokenLayout, device: torch.device) -> tuple[Any, Any, Any]:
        """(BlockLayout, perm, inverse perm) on `device`, built on the host once per (layout, options,
        device) and cached; every later call is a dict lookup (no host work, traceable by Dynamo)."""
        cfg = self.resolved(layout.family)
        key = (layout, cfg["decay_factor"], cfg["attention_sink"], self.block_size, str(device))
        hit = self._cache.get(key)
        if hit is None:
            bm = self.block_mask(layout)
            n = layout.seq_len
            bl = BlockLayout.from_block_mask(bm[None, None], n, n, block_q=self.block_size, block_k=self.block_size).to(
                device
            )
            perm = inv = None
            if layout.text_first and layout.text_len > 0:
                perm = torch.cat([torch.arange(layout.text_len, n), torch.arange(layout.text_len)])
                inv = torch.argsort(perm).to(device)
                perm = perm.to(device=device, dtype=torch.int64)
            hit = self._cache[key] = (bl, perm, inv)
        return hit

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        if self.is_dense(ctx):
            return plan
        plan.layout, plan.perm, plan.inv = self._static(ctx.layout, ctx.device)
        return plan

    def reset(self) -> None:
        """The mask is static; nothing per generation (the layout cache is kept)."""

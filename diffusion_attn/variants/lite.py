"""LiteAttention (moonmath-ai/LiteAttention): skip decisions that evolve across denoising steps.

During attention the kernel reports, per visited (query block, key block) tile, whether some
row's tile maximum came within `threshold` (log2 domain) of that row's running maximum
(`attn_kernels.TileStats`). Tiles that were visited but not needed are added to the layer's
skip set; later calls visit only the surviving tiles, so the skipped set only grows (until
`reset`, a new generation, or a recalibration). There is no separate profiling pass.

Our choices (the official code is an FA3 fork with per-instance state):
* State lives in `ctx.state` (per layer and cache-context branch, so sequential CFG keeps one skip
  set for "cond" and one for "uncond"; cleared at a new generation) as a bool skip set
  [B, H, nqb, nkb] per batch size, so batched CFG keeps one set per sample and head. It lives on
  the attention's device and is updated in place. Under Ulysses context parallelism H is this
  rank's heads.
* `warmup_steps` (default 1): steps before it visit every tile; the stats of the last warm-up
  step seed the skip set (with 1, step 0 is dense and seeds it, like the official first call).
* `recalibrate_every` (None = never): every that many steps after warm-up, all tiles are visited
  again and the skip set is rebuilt from that call's stats.
* Text: every block containing a text token (as query or key) is always visited.
* `must_do` / `must_skip`: half-open ranges [start, end) on the KEY axis (like the official
  must_do_list / must_skip_list), in visual frames (`range_unit="frame"`, default) or visual
  tokens (`"token"`). Key blocks overlapping a must-do range are never skipped; key blocks lying
  entirely inside must-skip ranges (and holding no text) are never visited, warm-up included
  (the official code also drops blocks that only partly overlap a must-skip range; we keep them so
  no key outside the range is ever dropped).

What runs where: the static parts (always / never block masks, whether any block is never
visited, the layout of a call that visits every allowed tile) are built on the host once per
(token layout, device) and kept across generations. Per call, nothing is read on the host: the
visited-tile mask is computed on the device from the skip set and turned into kernel lists with
`BlockLayout.from_device_block_mask` (device ops only), and the `after` callback folds the
kernel's `TileStats.needed` into the skip set with device ops. A steady-state call can therefore
be captured in a CUDA graph (Triton backend) or traced by torch.compile (the statistics come back
through their own custom op, `attnplug::block_sparse_attention_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch

from attn_kernels import BlockLayout, TileStats
from attn_spec import OneOf, Ordered, Range

from .base import AttnContext, AttnPlan, BlockSize, TokenLayout, Variant, check_options, register_variant

__all__ = ["LiteAttention"]


def _check_pairs(name: str, ranges: Any) -> tuple[tuple[int, int], ...]:
    """`ranges` as a tuple of (start, end) int pairs (TypeError naming the option otherwise); their bounds are
    declared on the field (start >= 0, start < end: `_Ranges`) and checked by `check_options`."""
    if ranges is None:
        return ()
    if not isinstance(ranges, (tuple, list)):
        raise TypeError(f"LiteAttention.{name} must be a sequence of (start, end) pairs, got {ranges!r}")
    for i, r in enumerate(ranges):
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(x, int) for x in r)):
            raise TypeError(f"LiteAttention.{name}[{i}] must be an (start, end) int pair, got {r!r}")
    return tuple((int(a), int(b)) for a, b in ranges)


#: LiteAttention.must_do / must_skip: (start, end) key ranges, 0 <= start < end
_Ranges = Annotated[
    tuple[tuple[int, int], ...], Range(0, None), Ordered((0, 1), size=2, text="a (start, end) pair with start < end")
]


@register_variant
@dataclass
class LiteAttention(Variant):
    """Evolutionary tile skipping: tiles found negligible stay skipped for the rest of the generation.

    threshold: log2-domain skip threshold (< 0; official default -10, integrations use -6);
    warmup_steps: leading steps that visit every tile (>= 1); recalibrate_every: revisit all tiles
    every that many steps (None = never); must_do / must_skip: key ranges, see module docstring;
    block_size: tile size of the kernel.
    """

    name: ClassVar[str] = "lite"
    role: ClassVar[str] = "sparsity"
    families: ClassVar[tuple[str, ...] | None] = None

    threshold: Annotated[float, Range(None, -1e-9)] = -10.0
    warmup_steps: Annotated[int, Range(1, None)] = 1
    recalibrate_every: Annotated[int | None, Range(1, None)] = None
    must_do: _Ranges = ()
    must_skip: _Ranges = ()
    range_unit: Annotated[str, OneOf("frame", "token")] = "frame"
    block_size: BlockSize = 128

    def __post_init__(self) -> None:
        self.must_do = _check_pairs("must_do", self.must_do)
        self.must_skip = _check_pairs("must_skip", self.must_skip)
        check_options(self)  # the ranges declared on the fields above
        self._cache: dict = {}  # static masks and layouts per (layout, device); not a dataclass field

    # -- static parts -----------------------------------------------------------------------
    def _key_ranges(self, layout: TokenLayout, ranges: tuple[tuple[int, int], ...], name: str) -> torch.Tensor:
        """bool [N]: sequence positions covered by visual key ranges."""
        n = layout.seq_len
        unit = layout.tokens_per_frame if self.range_unit == "frame" else 1
        limit = layout.frames if self.range_unit == "frame" else layout.num_visual
        cover = torch.zeros(n, dtype=torch.bool)
        v0 = layout.visual_slice.start
        for i, (a, b) in enumerate(ranges):
            if b > limit:
                raise ValueError(
                    f"LiteAttention.{name}[{i}] = ({a}, {b}) must lie in [0, {limit}] {self.range_unit}s of this layout"
                )
            cover[v0 + a * unit : v0 + b * unit] = True
        return cover

    def static_masks(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(always [nqb, nkb], never [nqb, nkb], key_text [nkb]) block masks of the layout.

        always: blocks with text (row or column) or a must-do key; never: key blocks inside must-skip
        (unless they hold text or must-do keys)."""
        n, b = layout.seq_len, self.block_size
        nb = -(-n // b)
        pad = nb * b - n
        text = torch.zeros(n, dtype=torch.bool)
        text[layout.text_slice] = True
        text_blk = torch.nn.functional.pad(text, (0, pad)).view(nb, b).any(1)
        do = self._key_ranges(layout, self.must_do, "must_do")
        do_blk = torch.nn.functional.pad(do, (0, pad)).view(nb, b).any(1)
        skip = self._key_ranges(layout, self.must_skip, "must_skip")
        skip_blk = torch.nn.functional.pad(skip, (0, pad), value=True).view(nb, b).all(1)
        always = text_blk[:, None] | (text_blk | do_blk)[None, :]
        never = (skip_blk & ~text_blk & ~do_blk)[None, :].expand(nb, nb) & ~text_blk[:, None]
        return always, never.clone(), text_blk

    def _static(self, layout: TokenLayout, device: torch.device) -> dict[str, Any]:
        """Per (layout, device), built on the host once and kept across generations: the always /
        never block masks on `device`, whether any block is never visited, and the layout of a
        call that visits every allowed tile (warm-up, recalibration). Later calls: a dict lookup."""
        key = (layout, str(device))
        hit = self._cache.get(key)
        if hit is None:
            always, never, _ = self.static_masks(layout)
            n, b = layout.seq_len, self.block_size
            full = (~never | always)[None, None]  # [1, 1, nqb, nkb]: shared by every sample and head
            hit = self._cache[key] = {
                "always": always.to(device),
                "never": never.to(device),
                "has_never": bool(never.any()),  # host tensor, once per layout
                "full_mask": full.to(device),
                "full_layout": BlockLayout.from_device_block_mask(full.to(device), n, n, b, b),
                "blocks": always.shape[0],
            }
        return hit

    # -- per call ---------------------------------------------------------------------------
    def _visit_all(self, ctx: AttnContext) -> bool:
        if ctx.step < self.warmup_steps:
            return True
        if self.recalibrate_every is not None:
            return (ctx.step - self.warmup_steps + 1) % self.recalibrate_every == 0 and ctx.step >= self.warmup_steps
        return False

    def phase_steps(self, family: str, num_steps: int | None = None) -> tuple[int, ...]:
        """Warm-up (0), the seeding step, the first steady step and the first recalibration."""
        w = self.warmup_steps
        steps = {0, w - 1, w}
        if self.recalibrate_every is not None:
            steps.add(w - 1 + self.recalibrate_every)
        return tuple(sorted(steps))

    def inactive_reason(self, family: str, num_steps: int | None, num_layers: int) -> str | None:
        """Warm-up covering every step: no tile is ever skipped."""
        if num_steps is not None and self.warmup_steps >= num_steps:
            return (
                f"LiteAttention: warmup_steps={self.warmup_steps} >= {num_steps} denoising steps: every step "
                "visits every tile, LiteAttention does nothing"
            )
        return None

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        layout = ctx.layout
        static = self._static(layout, ctx.device)
        key = ("lite", layout, ctx.batch, ctx.heads, self.block_size)
        st = ctx.state.get(key)
        if st is None:  # new generation (or batch / head count): empty skip set, on the device
            nb = static["blocks"]
            st = ctx.state[key] = {
                "skip": torch.zeros(ctx.batch, ctx.heads, nb, nb, dtype=torch.bool, device=ctx.device),
                "updates": 0,
            }
        visit_all = self._visit_all(ctx)
        update = ctx.step >= self.warmup_steps - 1  # early warm-up steps neither mark nor need stats
        if not update and not static["has_never"]:
            return plan  # plain dense call (the adapter may use the model's own attention)
        if visit_all:  # static: the cached layout
            visit = static["full_mask"]
            plan.layout = static["full_layout"]
        else:  # the surviving tiles, as kernel lists built with device ops only (no host sync)
            n, b = layout.seq_len, self.block_size
            visit = (~st["skip"] & ~static["never"]) | static["always"]
            plan.layout = BlockLayout.from_device_block_mask(visit, n, n, b, b)
        if not update:
            return plan
        stats = TileStats(threshold=self.threshold)
        plan.tile_stats = stats
        rebuild = visit_all
        always = static["always"]

        def after(out: Any, p: AttnPlan, st: dict = st, visit: torch.Tensor = visit) -> None:
            needed = stats.needed
            if needed is None:
                raise RuntimeError("LiteAttention: the kernel did not fill TileStats.needed")
            newly = visit & ~needed.to(device=visit.device, dtype=torch.bool) & ~always
            if rebuild:  # in place: the skip set keeps its storage (CUDA graphs, compiled graphs)
                st["skip"].copy_(newly)
            else:
                st["skip"].logical_or_(newly)
            st["updates"] += 1

        plan.after.append(after)
        return plan

    def cache_conflict(self, caches: dict[str, bool]) -> str | None:
        """A cache that skips attention calls or blocks leaves the skip set as the calls that ran made it (the
        set evolves from fewer steps: cooperation), but it may skip the steps `recalibrate_every` rebuilds the
        set at, which would then silently never happen."""
        if self.recalibrate_every is None:
            return None
        return (
            f"recalibrate_every={self.recalibrate_every} rebuilds the skip set at fixed steps, and the cache may skip "
            "the attention calls of those steps (the recalibration would silently not happen); use "
            "recalibrate_every=None with a cache"
        )

    def skip_set(self, ctx_state: dict) -> list[torch.Tensor]:
        """The current skip sets (bool [B, H, nqb, nkb]) stored in a layer's state dict."""
        return [v["skip"] for k, v in ctx_state.items() if isinstance(k, tuple) and k and k[0] == "lite"]

    def reset(self) -> None:
        """State lives in ctx.state, which the handle clears on reset."""

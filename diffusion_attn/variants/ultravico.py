"""UltraViCo (thu-ml/DiT-Extrapolation): video length extrapolation by decaying attention beyond the training window.

On the pre-softmax logits s = q.k * scale of visual query/key pairs whose token distance |m - n|
exceeds the training window, positive logits are multiplied by alpha; negative logits are untouched;
text tokens are exempt (as queries and as keys). The window is tokens_per_frame * train_frames / 2
(floored), with tokens_per_frame from the ACTUAL token grid of the call, so any resolution and frame
count works (the official code hard-codes 1560 x 21 for Wan 480p). Token distance is the distance in
the visual (frames x height x width, row-major) order, whatever the family puts text before or after.

HunyuanVideo adds beta on pairs near RoPE-harmonic distances: where the frame distance is within
`harmonic_width` frames of a multiple of the intrinsic RoPE period (50 latent frames: RIFLEx's N_k for
HunyuanVideo, theta 256, temporal rope dim 16, k = 4), positive logits are multiplied by beta instead
(official ultra-hunyuan kernel: token distances [46, 54], [96, 104], ... x tokens_per_frame, text
exempt). The kernel has one logit-decay factor per call, so these pairs run as a second kernel pass over
a disjoint block layout (`AttnPlan.extra`) merged with the main pass by log-sum-exp: exactly the
softmax over all keys. Layouts are built once per token layout (block rows classified by distance
ranges, element masks only on the band edges) and cached.

Family defaults (train_frames in token frames: the family's diffusers pipeline default length, which
is the official setting where one exists): Wan 21 (81 frames; official), HunyuanVideo 33 (129 frames;
official) with beta 0.6, period 50, width 4; CogVideoX 13 (49 frames; CogVideoX1.5 needs 11), LTX-Video
21 (161 frames).

`only_beyond_training=True` (default): a call whose video is not longer than `train_frames` runs the
model's own attention unchanged (UltraViCo is an extrapolation method; this makes it a no-op at the
training length). False applies the rule at every length, like the official kernels. Not reproduced:
the official Wan kernel's extra mask of first-frame queries against keys beyond 21 frames.

Composes with a sparsity variant in one `apply` (its layout and token permutation are kept; positions
follow the permutation). The beta band needs its own layouts and is refused with a sparsity variant.
Under Ulysses context parallelism with text tokens (CogVideoX) the gathered order differs: not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch

from attn_kernels import BlockLayout, LogitDecay
from attn_spec import Range, require

from .base import (
    AttnContext,
    AttnPlan,
    BlockSize,
    FamiliesWhere,
    TokenLayout,
    Variant,
    check_options,
    register_variant,
)

__all__ = ["UltraViCo", "ultravico_positions", "harmonic_bands"]


#: a factor applied to positive logits: in (0, 1]
_Factor = Range(0, 1, lo_open=True, words=True, note="(a logit multiplier)")


def ultravico_positions(layout: TokenLayout) -> torch.Tensor:
    """int32 [N]: each token's index in the visual order, -1 for text (exempt from every decay)."""
    pos = torch.full((layout.seq_len,), -1, dtype=torch.int32)
    vs = layout.visual_slice
    pos[vs] = torch.arange(layout.num_visual, dtype=torch.int32)
    return pos


def harmonic_bands(frames: int, tokens_per_frame: int, period: int, width: int) -> list[tuple[int, int]]:
    """Inclusive token-distance ranges [(j*period - width) * tpf, (j*period + width) * tpf] (j >= 1) that a
    video of `frames` frames reaches."""
    max_d = frames * tokens_per_frame - 1
    out = []
    j = 1
    while (j * period - width) * tokens_per_frame <= max_d:
        out.append(((j * period - width) * tokens_per_frame, (j * period + width) * tokens_per_frame))
        j += 1
    return out


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., bk] -> int32 [..., ceil(bk / 32)], bit j of word w = column 32 w + j (BlockLayout's format)."""
    bk = mask.shape[-1]
    words = -(-bk // 32)
    m = torch.nn.functional.pad(mask, (0, words * 32 - bk)).reshape(*mask.shape[:-1], words, 32).to(torch.int64)
    packed = (m << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


_CHUNK = 2048  # partial blocks per element-mask chunk (~200 MB of temporaries at block 128)


def band_layouts(layout: TokenLayout, bands: list[tuple[int, int]], block: int) -> tuple[Any, Any]:
    """(main, band) BlockLayouts on the canonical sequence: `band` holds the visual pairs whose token distance
    lies in `bands`, `main` every other pair. Blocks are classified from their distance ranges; element masks
    are computed only for blocks that straddle a band edge or the text."""
    n = layout.seq_len
    nb = -(-n // block)
    v0, nv = layout.visual_slice.start, layout.num_visual
    starts = torch.arange(nb) * block
    ends = torch.clamp(starts + block, max=n)  # exclusive
    vlo = torch.clamp(starts, min=v0) - v0  # visual index range of each block (empty when vlo > vhi)
    vhi = torch.clamp(ends, max=v0 + nv) - 1 - v0
    has_vis = vlo <= vhi
    all_vis = has_vis & (starts >= v0) & (ends <= v0 + nv)
    qlo, qhi, klo, khi = vlo[:, None], vhi[:, None], vlo[None, :], vhi[None, :]
    dmin = torch.clamp(torch.maximum(qlo - khi, klo - qhi), min=0)
    dmax = torch.maximum(qhi - klo, khi - qlo)
    both = has_vis[:, None] & has_vis[None, :]
    hit = torch.zeros(nb, nb, dtype=torch.bool)
    inside = torch.zeros(nb, nb, dtype=torch.bool)
    for a, b in bands:
        hit |= (dmin <= b) & (dmax >= a)
        inside |= (dmin >= a) & (dmax <= b)
    hit &= both
    band_full = hit & inside & all_vis[:, None] & all_vis[None, :]
    partial = hit & ~band_full
    pos = ultravico_positions(layout).long()
    pad = torch.full((nb * block - n,), -1, dtype=torch.long)
    pos = torch.cat([pos, pad]).view(nb, block)
    qi, ki = partial.nonzero(as_tuple=True)  # row-major = CSR order
    pos = pos.to(torch.int32)
    band_bits, main_bits = [], []
    for c0 in range(0, qi.numel(), _CHUNK):  # element masks in chunks: bounded memory at 4x HunyuanVideo's length
        pq, pk = pos[qi[c0 : c0 + _CHUNK]][:, :, None], pos[ki[c0 : c0 + _CHUNK]][:, None, :]
        d = (pq - pk).abs()
        in_band = torch.zeros(d.shape, dtype=torch.bool)
        for a, b in bands:
            in_band |= (d >= a) & (d <= b)
        in_band &= (pq >= 0) & (pk >= 0)
        band_bits.append(_pack(in_band))
        main_bits.append(_pack(~in_band))
        del d, in_band

    def build(block_mask: torch.Tensor, part: torch.Tensor, bits: list) -> Any:
        base = BlockLayout.from_block_mask(block_mask[None, None], n, n, block, block)
        if not bool(part.any()):
            return base
        pidx = torch.full((nb, nb), -1, dtype=torch.int32)
        pidx[part] = torch.arange(int(part.sum()), dtype=torch.int32)
        return BlockLayout(
            base.row_ptr, base.col_idx, q_len=n, k_len=n, block_q=block, block_k=block,
            partial=pidx[block_mask].to(torch.int32), elem_mask=torch.cat(bits, 0),
        )  # fmt: skip

    band = build(band_full | partial, partial, band_bits)
    main = build(~band_full, partial, main_bits)
    return main, band


@register_variant
@dataclass
class UltraViCo(Variant):
    """Decay positive logits beyond the training window by alpha (and near RoPE harmonics by beta).

    alpha: in (0, 1] (official 0.9); beta: in (0, 1] or None (the family's: 0.6 on HunyuanVideo, none
    elsewhere; beta == alpha drops the band); train_frames: training length in token frames (None: the
    family's); window: token distance (None: tokens_per_frame * train_frames // 2 of the actual grid);
    harmonic_period / harmonic_width: frames of the beta band (None: the family's); only_beyond_training:
    leave calls at or below the training length untouched; block_size: block of the beta band layouts.
    """

    name: ClassVar[str] = "ultravico"
    role: ClassVar[str] = "modifier"
    # the video families (an adapter with `default_fps`); their official train_frames (token frames), beta and
    # harmonic_period are the adapters' official_defaults["ultravico"]
    families: ClassVar[tuple[str, ...] | None] = FamiliesWhere(lambda a: a.default_fps is not None, "video")
    family_optional: ClassVar[tuple[str, ...]] = ("beta", "harmonic_period")  # None: no beta band

    alpha: Annotated[float, _Factor] = 0.9
    beta: Annotated[float | None, _Factor] = None
    train_frames: Annotated[int | None, Range(1, None, words=True)] = None
    window: Annotated[int | None, Range(0, None, words=True)] = None
    harmonic_period: Annotated[int | None, Range(1, None, words=True)] = None
    harmonic_width: Annotated[int, Range(0, None, words=True)] = 4
    only_beyond_training: bool = True
    block_size: BlockSize = 128

    def __post_init__(self) -> None:
        check_options(self)  # the ranges declared on the fields above
        period = self.harmonic_period
        ok = period is None or self.harmonic_width < period
        require(ok, "UltraViCo.harmonic_width", f"< harmonic_period ({period})", self.harmonic_width)
        if not isinstance(self.only_beyond_training, bool):
            raise TypeError(f"UltraViCo.only_beyond_training must be True or False, got {self.only_beyond_training!r}")
        self._cache: dict = {}

    def resolved(self, family: str) -> dict[str, Any]:
        """Options with the family's defaults filled in (train_frames, beta, harmonic_period)."""
        return self.family_values(family)

    def threshold(self, layout: TokenLayout) -> int:
        """The window (token distance) of a call: pairs farther apart are decayed."""
        if self.window is not None:
            return self.window
        return layout.tokens_per_frame * self.resolved(layout.family)["train_frames"] // 2

    def applies(self, layout: TokenLayout) -> bool:
        """Whether this call is decayed (False at or below the training length with only_beyond_training)."""
        return not (self.only_beyond_training and layout.frames <= self.resolved(layout.family)["train_frames"])

    def bands(self, layout: TokenLayout) -> list[tuple[int, int]]:
        """Token-distance ranges where beta applies (empty without beta, or when the video is too short)."""
        r = self.resolved(layout.family)
        if r["beta"] is None or r["beta"] == self.alpha or r["harmonic_period"] is None:
            return []
        if self.harmonic_width >= r["harmonic_period"]:
            raise ValueError(
                f"UltraViCo.harmonic_width must be < harmonic_period ({r['harmonic_period']}), "
                f"got {self.harmonic_width}"
            )
        return harmonic_bands(layout.frames, layout.tokens_per_frame, r["harmonic_period"], self.harmonic_width)

    def check_apply(self, family: str, modules: list, variants: tuple) -> None:
        r = self.resolved(family)
        if r["harmonic_period"] is not None and self.harmonic_width >= r["harmonic_period"]:
            raise ValueError(
                f"UltraViCo.harmonic_width must be < harmonic_period ({r['harmonic_period']}), "
                f"got {self.harmonic_width}"
            )
        beta = r["beta"]
        sparse = [v.name for v in variants if v.role == "sparsity"]
        if sparse and beta is not None and beta != self.alpha and r["harmonic_period"] is not None:
            raise ValueError(
                f"UltraViCo.beta={beta} ({family}'s RoPE-harmonic band) runs as its own block layout and cannot be "
                f"combined with the sparsity variant {sparse[0]!r}; pass UltraViCo(beta={self.alpha}) (alpha) to drop "
                f"the band, or apply UltraViCo without {sparse[0]!r}"
            )

    def check_layout(self, layout: TokenLayout) -> None:
        """Pre-load check of `attnplug generate` (nothing grid-dependent can be wrong: any grid works)."""
        self.resolved(layout.family)

    def inactive_reason(self, family: str, num_steps: int | None, num_layers: int) -> str | None:
        if self.alpha == 1.0 and self.resolved(family)["beta"] in (None, 1.0):
            return "UltraViCo(alpha=1) multiplies logits by 1: it changes nothing"
        return None

    # -- per call ----------------------------------------------------------------------------------------
    def _entry(self, ctx: AttnContext, perm: Any) -> tuple:
        lay = ctx.layout
        key = (lay, str(ctx.device))
        for p, entry in self._cache.get(key, ()):
            if p is perm:
                return entry
        pos = ultravico_positions(lay)
        if perm is not None:
            pos = pos[perm.cpu()]
        pos = pos.to(ctx.device)
        decay = LogitDecay(self.alpha, self.threshold(lay), pos, pos)
        extra: tuple = ()
        main = None
        bands = self.bands(lay)
        if bands:
            if perm is not None:
                raise RuntimeError("attnplug UltraViCo: the beta band cannot run on a permuted (sparse) sequence")
            main, band = band_layouts(lay, bands, self.block_size)
            main, band = main.to(ctx.device), band.to(ctx.device)
            extra = ((band, (LogitDecay(self.resolved(lay.family)["beta"], 0, pos, pos),)),)
        entry = (decay, main, extra)
        self._cache.setdefault(key, []).append((perm, entry))
        return entry

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        if not self.applies(ctx.layout):
            return plan
        decay, main, extra = self._entry(ctx, plan.perm)
        if extra:
            if plan.layout is not None:
                raise RuntimeError(
                    "attnplug UltraViCo: the beta band needs its own layouts; it cannot run with a sparse layout"
                )
            plan.layout = main
            plan.extra = (*plan.extra, *extra)
        plan.modifiers = (*plan.modifiers, decay)
        return plan

"""Draw the attention mask a diffusion variant plans for a token layout: attnplug's one mask renderer.

Two ways, one look (dark = visited, rows are queries, columns keys, original token order):

* `render_plan` (`attnplug show-mask`): bounded memory, for any layout size (below).
* `draw_layout` / `render_variant_mask` / `variant_token_mask`: build the N x N token mask, for small
  layouts (`benchmarks/draw_masks.py`, and the reference the tests compare `render_plan` with).

`render_plan` in detail:
The variant plans one call (`Variant.plan`: a BlockLayout on a possibly permuted sequence); the
picture evaluates that plan at (query, key) token pairs in the ORIGINAL token order by looking
each pair up in the layout's CSR block lists and bit-packed element masks
(docs/internal-api.md, BlockLayout storage). Every pair is evaluated when a pixel covers at most
4 x 4 tokens; larger layouts are sampled at 4 x 4 evenly spaced pairs per pixel. The N x N token
mask is never allocated (a Wan 480p grid has 32760 tokens: 1 GB as bools, 4 GB as floats), so
memory stays bounded by the variant's own layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion_attn.variants.base import AttnContext, AttnPlan, TokenLayout, Variant

__all__ = ["MAX_TOKENS", "plan_call", "find_sparse_call", "PairMask", "render_plan", "add_title", "draw_layout"]
__all__ += ["variant_token_mask", "render_variant_mask"]

#: Sequences longer than this are refused: a variant's block layout alone grows with N^2 / 128^2.
MAX_TOKENS = 1 << 20
_ON = np.array([25, 45, 110], dtype=np.float32)  # visited
_OFF = np.array([245, 245, 240], dtype=np.float32)  # skipped
_SAMPLES = 4  # per pixel and axis
_BAND_PAIRS = 1 << 21  # pairs evaluated at once


def plan_call(
    variant: Any,
    layout: Any,
    step: int,
    layer: int,
    state: dict | None = None,
    *,
    num_layers: int | None = None,
    batch: int = 1,
    heads: int = 1,
) -> Any:
    """The variant's AttnPlan for one attention call (default batch 1, one head; CPU) at (step, layer)."""
    ctx = AttnContext(
        layer=layer,
        num_layers=num_layers if num_layers is not None else layer + 1,
        step=step,
        timestep=None,
        layout=layout,
        batch=batch,
        heads=heads,
        head_dim=64,
        device=torch.device("cpu"),
        dtype=torch.float32,
        state={} if state is None else state,
    )
    return variant.plan(ctx, AttnPlan())


def find_sparse_call(
    variant: Any, layout: Any, step: int | None, layer: int | None, max_layer: int = 64
) -> tuple[int, int, Any]:
    """(step, layer, plan) of the first call that is not dense, trying the variant's phase steps and
    layers 0.. in order; a given step / layer is kept as is. Dense everywhere: the first candidate."""
    if step is not None:
        steps: Iterable[int] = (step,)
    else:
        phases = getattr(variant, "phase_steps", None)
        steps = sorted(set(phases(layout.family))) if callable(phases) else (0,)
    layers = (layer,) if layer is not None else range(max_layer)
    first = None
    for s in steps:
        for lay in layers:
            plan = plan_call(variant, layout, s, lay)
            if first is None:
                first = (s, lay, plan)
            if plan.layout is not None:
                return s, lay, plan
    assert first is not None
    return first


class PairMask:
    """Visibility of (query, key) token pairs under a plan, in the original token order, for any pairs."""

    def __init__(self, plan: Any, n: int) -> None:
        self.n = n
        self.layout = bl = plan.layout
        perm = getattr(plan, "perm", None)
        self.inv = None if perm is None else torch.argsort(perm.cpu().long())
        if bl is None:
            return
        nqb, self.nkb = bl.num_q_blocks, bl.num_k_blocks
        row_ptr = bl.row_ptr.cpu().long()[: nqb + 1]  # batch 0, head 0
        counts = row_ptr[1:] - row_ptr[:-1]
        end = int(row_ptr[-1])
        rows = torch.repeat_interleave(torch.arange(nqb), counts)
        self.keys = rows * self.nkb + bl.col_idx.cpu().long()[:end]  # ascending (CSR sorted per row)
        self.partial = None if bl.partial is None else bl.partial.cpu().long()[:end]
        self.elem = None if bl.elem_mask is None else bl.elem_mask.cpu()

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """bool [len(q), len(k)]: query token q[i] sees key token k[j] (original indices)."""
        if self.layout is None:
            return torch.ones(len(q), len(k), dtype=torch.bool)
        if self.inv is not None:
            q, k = self.inv[q], self.inv[k]
        bq, bk = self.layout.block_q, self.layout.block_k
        key = (q // bq)[:, None] * self.nkb + (k // bk)[None, :]
        if self.keys.numel() == 0:
            return torch.zeros(key.shape, dtype=torch.bool)
        idx = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
        hit = self.keys[idx] == key
        if self.partial is not None:
            pid = self.partial[idx]
            part = hit & (pid >= 0)
            if bool(part.any()):
                r = (q % bq)[:, None].expand_as(key)[part]
                c = (k % bk)[None, :].expand_as(key)[part]
                word = self.elem[pid[part], r, c // 32].long()
                hit[part] = ((word >> (c % 32)) & 1).bool()
        return hit


def _samples(n: int, f: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index and validity of s samples in each of ceil(n / f) pixels of f tokens: [P * s]."""
    p = -(-n // f)
    offs = (2 * torch.arange(s) + 1) * f // (2 * s)
    idx = (torch.arange(p)[:, None] * f + offs[None, :]).reshape(-1)
    return idx.clamp(max=n - 1), idx < n


def render_plan(plan: Any, layout: Any, *, max_size: int = 768) -> tuple[Image.Image, float, bool]:
    """(RGB image, density, exact): the plan's mask, one pixel per token pair up to `max_size` tokens.

    `density` is the fraction of visible pairs (over the sampled pairs when `exact` is False).
    """
    n = layout.seq_len
    f = max(1, -(-n // max_size))
    s = min(f, _SAMPLES)
    cell = max(1, max_size // n) if f == 1 else 1
    idx, valid = _samples(n, f, s)
    p = len(idx) // s
    pairs = PairMask(plan, n)
    band = max(1, _BAND_PAIRS // (s * s * p))
    frac = np.empty((p, p), dtype=np.float32)
    weight = valid.float().view(p, s)
    wk = weight.sum(1)
    seen = total = 0.0
    for r0 in range(0, p, band):
        r1 = min(p, r0 + band)
        m = pairs(idx[r0 * s : r1 * s], idx).float().view(r1 - r0, s, p, s)
        m = m * weight[r0:r1, :, None, None] * weight[None, None, :, :]
        cnt = m.sum((1, 3))
        norm = wk[r0:r1, None] * wk[None, :]
        frac[r0:r1] = (cnt / norm).numpy()
        seen += float(cnt.sum())
        total += float(norm.sum())
    rgb = (_OFF * (1 - frac[..., None]) + _ON * frac[..., None]).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if cell > 1:
        img = img.resize((img.width * cell, img.height * cell), Image.NEAREST)
    if layout.frames > 1 and layout.text_len == 0:  # frame boundaries
        d = ImageDraw.Draw(img)
        every = layout.tokens_per_frame
        for t in range(every, n, every):
            x = int(round(t / f * cell))
            d.line([(x, 0), (x, img.height)], fill=(220, 60, 60), width=1)
            d.line([(0, x), (img.width, x)], fill=(220, 60, 60), width=1)
    return img, seen / max(total, 1.0), s == f


def add_title(img: Image.Image, title: str) -> Image.Image:
    """`img` under a 16-pixel caption strip."""
    out = Image.new("RGB", (img.width, img.height + 16), (255, 255, 255))
    out.paste(img, (0, 16))
    ImageDraw.Draw(out).text((2, 2), title, fill=(0, 0, 0))
    return out


# -- the N x N token-mask path (small layouts) -------------------------------------------------------------------------
def _as_token_mask(obj: Any, b: int, h: int) -> torch.Tensor:
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        m = obj
        if m.dim() == 4:
            m = m[min(b, m.shape[0] - 1), min(h, m.shape[1] - 1)]
        if m.dim() != 2:
            raise ValueError(f"token mask must be [Nq, Nk] or [B, H, Nq, Nk], got shape {tuple(obj.shape)}")
        return m.bool().cpu()
    if hasattr(obj, "to_token_mask"):
        bl, hl = obj.to_block_mask().shape[:2]
        return obj.to_token_mask(min(b, bl - 1), min(h, hl - 1)).bool().cpu()
    raise TypeError(f"draw_layout needs a BlockLayout or a bool tensor, got {type(obj).__name__}")


def draw_layout(
    layout_or_mask: Any,
    *,
    b: int = 0,
    h: int = 0,
    max_size: int = 768,
    grid_every: int | None = None,
    grid_color: tuple[int, int, int] = (220, 60, 60),
    title: str | None = None,
) -> Image.Image:
    """Render a BlockLayout (batch b, head h) or a bool token mask as an RGB image.

    Each token pair becomes `max_size // N` pixels (at least 1); larger masks are average-pooled
    (grey = partly visited). grid_every draws lines every that many tokens (e.g. tokens per frame
    or the block size); title adds a caption strip on top.
    """
    m = _as_token_mask(layout_or_mask, b, h).float()
    nq, nk = m.shape
    if max(nq, nk) > max_size:
        f = -(-max(nq, nk) // max_size)
        pq, pk = (-nq) % f, (-nk) % f
        m = torch.nn.functional.pad(m, (0, pk, 0, pq))
        m = m.view(m.shape[0] // f, f, m.shape[1] // f, f).mean((1, 3))
        cell, step = 1, f
    else:
        cell, step = max(1, max_size // max(nq, nk)), 1
    frac = m.numpy()[..., None]
    rgb = (_OFF * (1 - frac) + _ON * frac).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if cell > 1:
        img = img.resize((img.width * cell, img.height * cell), Image.NEAREST)
    if grid_every:
        d = ImageDraw.Draw(img)
        px = cell / step
        for t in range(grid_every, max(nq, nk), grid_every):
            x = int(round(t * px))
            if t < nk:
                d.line([(x, 0), (x, img.height)], fill=grid_color, width=1)
            if t < nq:
                d.line([(0, x), (img.width, x)], fill=grid_color, width=1)
    return add_title(img, title) if title else img


def variant_token_mask(
    variant: Variant,
    layout: TokenLayout,
    *,
    step: int = 0,
    layer: int = 0,
    num_layers: int | None = None,
    batch: int = 1,
    heads: int = 1,
    state: dict | None = None,
    b: int = 0,
    h: int = 0,
) -> torch.Tensor:
    """bool [N, N] token mask the variant plans for one call, in the ORIGINAL token order (N x N memory: small
    layouts only; `render_plan` draws any size)."""
    plan = plan_call(variant, layout, step, layer, state, num_layers=num_layers, batch=batch, heads=heads)
    n = layout.seq_len
    if plan.layout is None:
        m = torch.ones(n, n, dtype=torch.bool)
    else:
        m = _as_token_mask(plan.layout, b, h)
    if plan.perm is not None:
        perm = plan.perm.cpu()
        out = torch.zeros_like(m)
        out[perm[:, None], perm[None, :]] = m
        m = out
    return m


def render_variant_mask(
    variant: Variant,
    layout: TokenLayout,
    step: int = 0,
    layer: int = 0,
    *,
    state: dict | None = None,
    heads: int = 1,
    batch: int = 1,
    head: int = 0,
    max_size: int = 768,
    title: str | None = None,
    **plan_kw: Any,
) -> Image.Image:
    """Draw the mask `variant` plans at (step, layer) for `layout`, frame boundaries in red."""
    m = variant_token_mask(
        variant, layout, step=step, layer=layer, state=state, heads=heads, batch=batch, h=head, **plan_kw
    )
    if title is None:
        dens = m.float().mean().item()
        title = f"{variant.name} grid={layout.grid} text={layout.text_len} step={step} layer={layer} density={dens:.2f}"
    every = layout.tokens_per_frame if layout.frames > 1 and layout.text_len == 0 else None
    return draw_layout(m, max_size=max_size, grid_every=every, title=title)

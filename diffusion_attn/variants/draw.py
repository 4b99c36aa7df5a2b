"""Pictures of attention masks: which (query, key) token pairs a layout visits.

`draw_layout` draws a BlockLayout or a token mask; `render_variant_mask` runs a variant's `plan`
for a TokenLayout (any step / layer / state) and draws the mask in the original token order. Rows are
queries, columns keys; dark = computed. These build the N x N token mask (`variant_token_mask`, the
tests' reference), so they suit small layouts (`benchmarks/draw_masks.py`); `attnplug show-mask` draws
from the block layout pair by pair in bounded memory instead (`attn_pipelines/maskdraw.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .base import AttnContext, AttnPlan, TokenLayout, Variant

__all__ = ["draw_layout", "render_variant_mask", "variant_token_mask"]

_ON = np.array([25, 45, 110], dtype=np.float32)  # visited
_OFF = np.array([245, 245, 240], dtype=np.float32)  # skipped


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
    if title:
        strip = 16
        out = Image.new("RGB", (img.width, img.height + strip), (255, 255, 255))
        out.paste(img, (0, strip))
        ImageDraw.Draw(out).text((2, 2), title, fill=(0, 0, 0))
        img = out
    return img


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
    """bool [N, N] token mask the variant plans for one call, in the ORIGINAL token order."""
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
    plan = variant.plan(ctx, AttnPlan())
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

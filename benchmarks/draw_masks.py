"""Regenerate the mask pictures under assets/masks/ (small layouts, CPU, a few seconds).

    python benchmarks/draw_masks.py [--out assets/masks]

radial_wan_8x4x6.png      radial, Wan family (frame-0 sink), 8 frames x 4x6 tokens, 16-token blocks
radial_hunyuan_8x4x6_text.png   radial, HunyuanVideo family, 12 text tokens after the video
gna_8x4x6.png             neighborhood attention kernel (3, 3, 5), original token order
gna_8x4x6_stride.png      GNA kernel (3, 3, 5), stride (1, 3, 5)
gna_8x4x6_permuted.png    the same NA on the tile-permuted sequence (what the kernel sees)
lite_8x4x6_step4.png      LiteAttention skip set after 5 synthetic denoising steps (head 0)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attn_pipelines.maskdraw import draw_layout, render_variant_mask  # noqa: E402
from diffusion_attn.variants import (  # noqa: E402
    AttnContext,
    AttnPlan,
    LiteAttention,
    Neighborhood,
    Radial,
    TokenLayout,
)


def lite_state(layout: TokenLayout, steps: int = 5, heads: int = 2, seed: int = 0) -> tuple[LiteAttention, dict]:
    """Run LiteAttention for a few synthetic steps (local + sink attention, drifting queries)."""
    import attn_kernels

    g = torch.Generator().manual_seed(seed)
    n, d = layout.seq_len, 32
    var = LiteAttention(threshold=-4.0, block_size=16)
    frame = torch.arange(n) // layout.tokens_per_frame
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    k = 8.0 * basis[frame % d] + 0.5 * torch.randn(1, heads, n, d, generator=g)
    q = 8.0 * (basis[frame % d] + 0.7 * basis[0]) + 0.5 * torch.randn(1, heads, n, d, generator=g)
    v = torch.randn(1, heads, n, d, generator=g)
    state: dict = {}
    for step in range(steps):
        q = q + 0.2 * torch.randn(q.shape, generator=g)
        ctx = AttnContext(0, 1, step, None, layout, 1, heads, d, torch.device("cpu"), torch.float32, state)
        plan = var.plan(ctx, AttnPlan())
        out = attn_kernels.attention(q, k, v, plan.layout, tile_stats=plan.tile_stats, backend="reference")
        for cb in plan.after:
            cb(out, plan)
    return var, state


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "masks")
    p.add_argument("--size", type=int, default=576)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    wan = TokenLayout((8, 4, 6), family="wan")
    hy = TokenLayout((8, 4, 6), text_len=12, family="hunyuan_video")
    written = []

    def save(img, name):
        path = a.out / name
        img.save(path, optimize=True)
        written.append(path)

    save(
        render_variant_mask(Radial(dense_steps=0, block_size=16), wan, step=20, layer=3, max_size=a.size),
        "radial_wan_8x4x6.png",
    )
    save(
        render_variant_mask(Radial(dense_steps=0, block_size=16), hy, step=20, layer=3, max_size=a.size),
        "radial_hunyuan_8x4x6_text.png",
    )
    na = Neighborhood(kernel_size=(3, 3, 5), block_size=16)
    save(render_variant_mask(na, wan, max_size=a.size), "gna_8x4x6.png")
    gna = Neighborhood(kernel_size=(3, 3, 5), stride=(1, 3, 5), block_size=16)
    save(render_variant_mask(gna, wan, max_size=a.size), "gna_8x4x6_stride.png")
    bl, perm = na.build(wan)
    save(
        draw_layout(bl, max_size=a.size, grid_every=16, title=f"gna on tile-permuted tokens, density={bl.density:.2f}"),
        "gna_8x4x6_permuted.png",
    )
    var, state = lite_state(wan)
    save(render_variant_mask(var, wan, step=5, state=state, heads=2, max_size=a.size), "lite_8x4x6_step4.png")
    for w in written:
        print(w.relative_to(ROOT) if w.is_relative_to(ROOT) else w)
    assert math.isfinite(bl.density)
    return written


if __name__ == "__main__":
    main()

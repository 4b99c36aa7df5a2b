"""`attnplug show-mask`: draw the attention mask a diffusion variant plans for a token layout (PNG).

By default it draws the first call the variant runs sparse (e.g. radial after its dense warm-up
steps and dense layers); `--step` / `--layer` choose a call. Drawing evaluates the plan's block
layout pair by pair in bounded memory (`attn_pipelines.maskdraw`), never the N x N token mask.
"""

from __future__ import annotations

import argparse
from typing import Any

from attn_spec import parse_spec
from diffusion_attn.adapters import DEFAULT_FAMILY

from .. import argtypes
from ..config import build_variant
from ..errors import CLIError
from ..io import OutputError, OutputTarget
from .generate import variant_label

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    m = sub.add_parser("show-mask", help="draw a variant's attention mask for a token layout as a PNG")
    m.add_argument("--variant", required=True, metavar="VARIANT[:k=v,...]")
    m.add_argument("--grid", required=True, type=argtypes.grid, metavar="FxHxW", help="visual tokens after patchify")
    m.add_argument("--text-len", type=argtypes.nonneg_int, default=0)
    m.add_argument(
        "--family",
        default=DEFAULT_FAMILY,
        help=f"adapter family (layout conventions and family defaults; default {DEFAULT_FAMILY})",
    )
    order = m.add_mutually_exclusive_group()
    order.add_argument("--text-first", dest="text_first", action="store_true", default=None)
    order.add_argument("--text-last", dest="text_first", action="store_false")
    m.add_argument("--step", type=argtypes.nonneg_int, default=None, help="denoising step (default: first sparse)")
    m.add_argument("--layer", type=argtypes.nonneg_int, default=None, help="hooked layer (default: first sparse)")
    m.add_argument("--out", default="mask.png")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the variant, check the layout and output, plan one call, draw it."""
    import diffusion_attn
    from diffusion_attn.variants.base import TokenLayout

    from ..maskdraw import MAX_TOKENS, add_title, find_sparse_call, render_plan

    variant = build_variant(parse_spec(args.variant, where="--variant"), where="--variant")
    families = list(diffusion_attn.ADAPTERS)
    if args.family not in families:
        raise CLIError(f"--family {args.family!r} is not one of {', '.join(families)}")
    target = OutputTarget(args.out, "--out", formats=(".png",))
    try:
        target.check()
    except OutputError as e:
        raise CLIError(str(e)) from None
    f, h, w = args.grid
    n = f * h * w + args.text_len
    if n > MAX_TOKENS:
        raise CLIError(
            f"--grid {f}x{h}x{w} --text-len {args.text_len}: {n:,} tokens; show-mask draws layouts of up to "
            f"{MAX_TOKENS:,} tokens (a variant's block layout grows with N^2; HunyuanVideo 720p is 118,800)"
        )
    text_first = args.text_first
    if text_first is None:
        text_first = diffusion_attn.ADAPTERS[args.family].text_first
    layout = TokenLayout(grid=args.grid, text_len=args.text_len, text_first=bool(text_first), family=args.family)
    try:
        step, layer, plan = find_sparse_call(variant, layout, args.step, args.layer)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--variant {variant.name} on --grid {f}x{h}x{w}: {' '.join(str(e).split())}") from None
    sparse = plan.layout is not None
    image, density, exact = render_plan(plan, layout)
    title = (
        f"{variant.name} grid={f}x{h}x{w} text={args.text_len} step={step} layer={layer} "
        f"density{'=' if exact else '~'}{density:.3f}"
    )
    image = add_title(image, title)
    try:
        target.write(lambda p: image.save(p, format="PNG"))
    except OutputError as e:
        raise CLIError(str(e)) from None
    how = "" if exact else " (sampled, 4x4 token pairs per pixel)"
    phase = f"step {step}, layer {layer}" + ("" if sparse else " (dense")
    if not sparse:
        phase += ")" if args.step is not None and args.layer is not None else " at every step and layer tried)"
    print(
        f"attnplug: wrote {target.path} ({image.width}x{image.height}) for {variant_label(variant, args.family)} on "
        f"{f}x{h}x{w} tokens + {args.text_len} text ({'first' if text_first else 'last'}): {phase}, "
        f"density {density:.3f}{how}"
    )
    return 0

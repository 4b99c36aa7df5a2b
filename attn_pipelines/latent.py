"""Token grids of the six model families, known from the generation settings before any weight is loaded.

A pipeline turns `frames x height x width` pixels into a latent grid (VAE compression) and then
into tokens (the transformer's patch size). These are the families' rules, as in their diffusers
pipelines; a local pipeline directory's `transformer/config.json` overrides the patch sizes. The
CLI uses them to check sizes and variant options (e.g. a GNA kernel larger than the latent frames)
before loading weights, with errors that name the option.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["LatentRule", "FAMILY_RULES", "FAMILY_OF_TRANSFORMER", "token_grid", "rule_for", "read_model_index"]
__all__ += ["check_fit"]

#: diffusers transformer class -> adapter family name.
FAMILY_OF_TRANSFORMER = {
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "CogVideoXTransformer3DModel": "cogvideox",
    "LTXVideoTransformer3DModel": "ltx_video",
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
}


@dataclass(frozen=True)
class LatentRule:
    """VAE compression (frames, pixels per latent) and patch sizes (frames, height/width) of a family."""

    video: bool
    vae_t: int
    vae_s: int
    patch_t: int
    patch: int

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this (pixels per token side)."""
        return self.vae_s * self.patch


FAMILY_RULES: dict[str, LatentRule] = {
    "wan": LatentRule(True, 4, 8, 1, 2),
    "hunyuan_video": LatentRule(True, 4, 8, 1, 2),
    "cogvideox": LatentRule(True, 4, 8, 1, 2),
    "ltx_video": LatentRule(True, 8, 32, 1, 1),
    "flux": LatentRule(False, 1, 8, 1, 2),  # 2x2 latent packing
    "sd3": LatentRule(False, 1, 8, 1, 2),
}


def read_model_index(model_dir: Path) -> dict[str, Any] | None:
    """The parsed `model_index.json` of a diffusers pipeline directory, or None."""
    try:
        return json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None


def _vae_factors(rule: LatentRule, model_dir: Path) -> LatentRule:
    """A video VAE's `scale_factor_temporal` / `scale_factor_spatial` from `model_dir/vae/config.json` (Wan's
    `AutoencoderKLWan` config has them and `WanPipeline` reads them; other families keep their rule)."""
    try:
        cfg = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return rule
    t, s = cfg.get("scale_factor_temporal"), cfg.get("scale_factor_spatial")
    if rule.video and isinstance(t, int) and isinstance(s, int) and t > 0 and s > 0:
        return replace(rule, vae_t=t, vae_s=s)
    return rule


def rule_for(family: str, model_dir: Path | None = None) -> LatentRule | None:
    """The family's rule, patch sizes read from `model_dir/transformer/config.json` when present (Wan: the
    VAE's compression from `model_dir/vae/config.json` too)."""
    rule = FAMILY_RULES.get(family)
    if rule is None or model_dir is None or family == "flux":  # FLUX's patch_size 1 is applied after packing
        return rule
    if family == "wan":
        rule = _vae_factors(rule, model_dir)
    try:
        cfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return rule
    p = cfg.get("patch_size")
    if isinstance(p, list) and len(p) == 3:
        return replace(rule, patch_t=int(p[0]), patch=int(p[1]))
    if isinstance(p, int):
        pt = cfg.get("patch_size_t")
        return replace(rule, patch=p, patch_t=int(pt) if isinstance(pt, int) else rule.patch_t)
    return rule


def token_grid(rule: LatentRule, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """(frames, height, width) of visual tokens for a generation of `frames` x `height` x `width` pixels."""
    f = (frames - 1) // rule.vae_t + 1 if rule.video else 1
    return (-(-f // rule.patch_t), height // rule.multiple, width // rule.multiple)


def check_fit(variants: list[Any], family: str, grid: tuple[int, int, int]) -> None:
    """Raise ValueError (naming the variant and option) when a variant's options cannot fit the token grid,
    without building any layout: the variant's own `check_layout(layout)` when it has one, else
    GNA's per-dimension kernel / stride / dilation rules (`Neighborhood.resolved`)."""
    import diffusion_attn
    from diffusion_attn.variants.base import TokenLayout

    layout = TokenLayout(grid=grid, family=family)
    for v in variants:
        check = getattr(v, "check_layout", None)
        try:
            if callable(check):
                check(layout)
            elif isinstance(v, diffusion_attn.Neighborhood):
                v.resolved(grid)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{v.name}: {' '.join(str(e).split())}") from e

"""Pixels -> latents -> tokens: the rule each adapter declares (`Adapter.latent`), and reading a pipeline
directory's configs, so a token grid is known from the generation settings before any weight is loaded.

A pipeline turns `frames x height x width` pixels into a latent grid (VAE compression) and then into
tokens (the transformer's patch size). Each adapter states its family's rule as in its diffusers
pipeline; a local pipeline directory's `transformer/config.json` overrides the patch sizes (unless the
adapter says its config's patch size means something else) and, where the adapter asks for it,
`vae/config.json` the VAE's compression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["LatentRule", "read_json", "rule_from_dir", "token_grid"]


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


def read_json(path: Path) -> dict[str, Any] | None:
    """The parsed JSON object at `path`, or None when it is missing or not JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rule_from_dir(rule: LatentRule, model_dir: Path, *, patch_from_config: bool, vae_from_config: bool) -> LatentRule:
    """`rule` with what `model_dir`'s configs say: the VAE's `scale_factor_temporal` / `scale_factor_spatial`
    (when `vae_from_config`: Wan's `AutoencoderKLWan` config has them and `WanPipeline` reads them) and the
    transformer's `patch_size` / `patch_size_t` (when `patch_from_config`)."""
    if vae_from_config and rule.video:
        cfg = read_json(Path(model_dir) / "vae" / "config.json") or {}
        t, s = cfg.get("scale_factor_temporal"), cfg.get("scale_factor_spatial")
        if isinstance(t, int) and isinstance(s, int) and t > 0 and s > 0:
            rule = replace(rule, vae_t=t, vae_s=s)
    if not patch_from_config:
        return rule
    cfg = read_json(Path(model_dir) / "transformer" / "config.json")
    if cfg is None:
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

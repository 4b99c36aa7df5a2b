"""Token grids known from the generation settings before any weight is loaded, read from the adapters.

Each adapter states its family's facts (`diffusion_attn.adapters`): the model classes it matches and
its latent rule (VAE compression and patch sizes, `Adapter.latent`, overridden by a local pipeline
directory's configs). This module is the CLI's view of them: it checks sizes and variant options
(e.g. a GNA kernel larger than the latent frames) before loading weights, with errors that name the
option. It lists no family itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_attn.adapters import ADAPTERS, family_of_class
from diffusion_attn.adapters.latent import LatentRule, read_json, token_grid
from diffusion_attn.variants import Neighborhood, TokenLayout

__all__ = ["LatentRule", "FAMILY_RULES", "FAMILY_OF_TRANSFORMER", "token_grid", "rule_for", "read_model_index"]
__all__ += ["check_fit", "check_family", "family_of_class"]

#: diffusers denoiser class -> adapter family (every adapter's `model_classes`).
FAMILY_OF_TRANSFORMER: dict[str, str] = {c: name for name, cls in ADAPTERS.items() for c in cls.model_classes}

#: family -> its adapter's latent rule (the families whose token grid is known before loading).
FAMILY_RULES: dict[str, LatentRule] = {name: cls.latent for name, cls in ADAPTERS.items() if cls.latent is not None}


def read_model_index(model_dir: Path) -> dict[str, Any] | None:
    """The parsed `model_index.json` of a diffusers pipeline directory, or None."""
    return read_json(Path(model_dir) / "model_index.json")


def rule_for(family: str, model_dir: Path | None = None) -> LatentRule | None:
    """The family adapter's latent rule, with what `model_dir`'s configs say (`Adapter.latent_rule`); None for
    an unknown family or one whose grid is not known before loading."""
    cls = ADAPTERS.get(family)
    return None if cls is None else cls.latent_rule(model_dir)


def check_family(variants: list[Any], family: str) -> None:
    """Raise ValueError (naming the variant and the options to give) when a variant has official per-family
    defaults, leaves one of those options None, and `family` has none (`Variant.family_values`)."""
    for v in variants:
        values = getattr(v, "family_values", None)
        if family and callable(values) and getattr(v, "family_defaults", None):
            try:
                values(family)
            except ValueError as e:
                raise ValueError(f"{v.name}: {' '.join(str(e).split())}") from e


def check_fit(variants: list[Any], family: str, grid: tuple[int, int, int]) -> None:
    """Raise ValueError (naming the variant and option) when a variant's options cannot fit the token grid,
    without building any layout: its family defaults (`check_family`), then the variant's own
    `check_layout(layout)` when it has one, else GNA's per-dimension kernel / stride / dilation rules
    (`Neighborhood.resolved`)."""
    check_family(variants, family)
    layout = TokenLayout(grid=grid, family=family)
    for v in variants:
        check = getattr(v, "check_layout", None)
        try:
            if callable(check):
                check(layout)
            elif isinstance(v, Neighborhood):
                v.resolved(grid)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{v.name}: {' '.join(str(e).split())}") from e

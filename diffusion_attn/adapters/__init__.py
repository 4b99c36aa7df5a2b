"""One adapter per model family, registered in `ADAPTERS` by `@register_adapter` where it is defined.

Importing this package imports every adapter module, so `ADAPTERS` is complete. Everything attnplug
knows about a family lives on its adapter class: the model classes it matches, its latent rule
(`latent`, VAE compression and patch sizes), `default_fps`, `text_first`, and, through
`Adapter.variant_defaults`, each variant's official per-family defaults.
"""

from __future__ import annotations

import torch.nn as nn

from . import cogvideox, flux, hunyuan_video, ltx_video, sd3, unet, wan  # noqa: F401  (each registers itself)
from .base import ADAPTERS, Adapter, register_adapter
from .latent import LatentRule

__all__ = ["ADAPTERS", "DEFAULT_FAMILY", "Adapter", "LatentRule", "family_of_class", "find_adapter"]
__all__ += ["register_adapter"]

#: The family of tools that need one without being told (`attnplug show-mask`): Wan, the world model's.
DEFAULT_FAMILY = "wan"


def family_of_class(class_name: str | None) -> str | None:
    """The family whose adapter matches a model class of that name (as `model_index.json` names it), or None."""
    for name, cls in ADAPTERS.items():
        if class_name in cls.model_classes:
            return name
    return None


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`'s class, or a ValueError listing the supported families (`ADAPTERS` is complete here:
    this package imports every adapter module above)."""
    for cls in ADAPTERS.values():
        if cls.matches(model):
            return cls()
    supported = ", ".join(f"{n} ({', '.join(c.model_classes)})" for n, c in ADAPTERS.items())
    raise ValueError(f"attnplug has no adapter for {type(model).__name__}; supported model families: {supported}")

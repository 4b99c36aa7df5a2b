"""diffusers side of attnplug: `apply(pipe, *variants)` hooks attention variants into a
pipeline's transformer through one adapter per model family; `handle.remove()` undoes it."""

from __future__ import annotations

from .adapters import ADAPTERS, Adapter, find_adapter
from .guidance import SoftPAGGuidance
from .headhunter import HeadHunter, HeadHuntResult
from .hooks import AttnHandle, apply, apply_pretrained, load_config
from .runtime import AttnRuntime
from .variants import *  # noqa: F403
from .variants import __all__ as _variant_names
from .variants.base import AttnContext, AttnPlan, TokenLayout, Variant

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AttnContext",
    "AttnHandle",
    "AttnPlan",
    "AttnRuntime",
    "HeadHunter",
    "HeadHuntResult",
    "SoftPAGGuidance",
    "TokenLayout",
    "Variant",
    "apply",
    "apply_pretrained",
    "find_adapter",
    "load_config",
    *[n for n in _variant_names if n not in ("AttnContext", "AttnPlan", "TokenLayout", "Variant")],
]

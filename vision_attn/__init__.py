"""timm side of attnplug: inject attention variants into pretrained backbones, and register
agent / coordinate-attention / ECA model names with timm on import."""

from __future__ import annotations

from . import models  # noqa: F401  (registers the timm model names)
from .build import load_finetuned
from .checkpoint import load_checkpoint
from .inject import InjectionHandle, inject
from .spec import VARIANTS, parse_variant, variant_spec
from .variants.agent import Agent
from .variants.coord import CoordAttention
from .variants.eca import ECA

__all__ = [
    "VARIANTS",
    "Agent",
    "CoordAttention",
    "ECA",
    "InjectionHandle",
    "inject",
    "load_checkpoint",
    "load_finetuned",
    "parse_variant",
    "variant_spec",
]

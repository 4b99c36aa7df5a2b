"""timm side of attnplug: inject attention variants into pretrained backbones, and register
agent / coordinate-attention / ECA model names with timm on import."""

from __future__ import annotations

from . import models  # noqa: F401  (registers the timm model names)
from .inject import InjectionHandle, inject
from .variants.agent import Agent
from .variants.coord import CoordAttention
from .variants.eca import ECA

__all__ = ["Agent", "CoordAttention", "ECA", "InjectionHandle", "inject"]

"""timm side of attnplug: inject attention variants into pretrained backbones, and register
agent / coordinate-attention / ECA model names with timm on import."""

from __future__ import annotations

from .inject import InjectionHandle, inject

__all__ = ["InjectionHandle", "inject"]

try:  # variants and registered models land per family; import what exists
    from .variants.agent import Agent  # noqa: F401

    __all__.append("Agent")
except ImportError:  # pragma: no cover - during development only
    pass
try:
    from .variants.coord import CoordAttention  # noqa: F401

    __all__.append("CoordAttention")
except ImportError:  # pragma: no cover
    pass
try:
    from .variants.eca import ECA  # noqa: F401

    __all__.append("ECA")
except ImportError:  # pragma: no cover
    pass
from . import models  # noqa: E402,F401  (registers timm model names)

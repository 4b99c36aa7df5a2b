"""attnplug pipelines: the `attnplug` CLI, preset loading, diffusers step callbacks, tiny pipelines.

Heavy modules (diffusers, transformers) are imported lazily by the submodules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

"""The adapter registry `ADAPTERS` (model family name -> adapter class), in a module that imports nothing.

`diffusion_attn.adapters.register_adapter` fills it where each adapter is defined; the variants read it (their
supported families and official per-family defaults are facts of the adapters) without importing the adapters
package, which itself imports the variants. It is complete once `diffusion_attn` is imported."""

from __future__ import annotations

from typing import Any

__all__ = ["ADAPTERS"]

#: family name -> adapter class (`diffusion_attn.adapters.base.Adapter` subclasses), in registration order
ADAPTERS: dict[str, Any] = {}

"""Token layouts and other host-built objects of one hooked transformer, built once and reused.

Owns one `TokenLayout` per (grid, text_len, text_first) and a keyed store for objects derived from
layouts on the host (context parallelism's canonical -> gathered index, the row-restricted layouts of
sequence-sharded cross-attention). Keys hash layouts and tensors by identity or value as their types do;
nothing here reads a tensor value on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..variants.base import TokenLayout

__all__ = ["LayoutCache"]


class LayoutCache:
    """`TokenLayout`s of one family, and `memo(key, build)` for objects built from them."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._store: dict = {}

    def token_layout(self, grid: tuple[int, int, int] | None, text_len: int, text_first: bool) -> TokenLayout:
        """The TokenLayout of a call (one object per (grid, text_len, text_first), reused)."""
        if grid is None:
            raise RuntimeError(
                "attnplug: the token grid is unknown: the transformer's forward was not seen by the step hook "
                "(was the attention module called outside the transformer?)"
            )
        key = (grid, text_len, text_first)
        hit = self._store.get(key)
        if hit is None:
            hit = self._store[key] = TokenLayout(
                grid=grid, text_len=text_len, text_first=text_first, family=self.family
            )
        return hit

    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The object stored under `key` (a tuple whose first item names its kind), built by `build()` once."""
        if key in self._store:
            return self._store[key]
        hit = self._store[key] = build()
        return hit

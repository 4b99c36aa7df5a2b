"""Key-padding masks (HunyuanVideo's and LTX-Video's text padding) of one hooked transformer.

Owns the resolution of a model's attention mask into a bool key mask [B, N] (False = padded key) and the
block layouts restricted to a mask's valid keys. A mask is resolved once per forward at the first layer
(every later layer gets the same tensor object back, matched by identity) and across forwards while its
contents are unchanged: one `torch.equal` per forward, the only value this runtime reads on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attn_kernels import BlockLayout

__all__ = ["KeyMasks"]


class KeyMasks:
    """Key masks seen in this forward and lately, and their restricted layouts (small bounded caches)."""

    def __init__(self) -> None:
        self._fwd_sources: list = []  # (model mask, key mask) of this forward
        self._fwd_masks: list = []  # (key mask, entry) resolved in this forward
        self._entries: list = []  # key masks seen lately: {"mask", "all", "layouts"}

    def begin_forward(self) -> None:
        """A new forward: masks are matched by identity again only after their first use in it."""
        if self._fwd_masks or self._fwd_sources:
            self._fwd_masks.clear()
            self._fwd_sources.clear()

    def key_mask_of(self, mask: torch.Tensor, derive: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`derive(mask)`, computed once per forward for each model mask object."""
        for src, km in self._fwd_sources:
            if src is mask:
                return km
        km = derive(mask)
        self._fwd_sources.append((mask, km))
        del self._fwd_sources[:-8]
        return km

    def _mask_entry(self, key_mask: torch.Tensor) -> dict:
        """The entry of a key mask: resolved at its first use in a forward, then by identity."""
        for km, entry in self._fwd_masks:
            if km is key_mask:
                return entry
        entry = None
        for e in self._entries:  # same contents as a recent forward's mask: one comparison (sync)
            if e["mask"].shape == key_mask.shape and e["mask"].device == key_mask.device:
                if torch.equal(e["mask"], key_mask):
                    entry = e
                    break
        if entry is None:
            entry = {"mask": key_mask.clone(), "all": bool(key_mask.all()), "layouts": []}
            self._entries.insert(0, entry)
            del self._entries[4:]
        self._fwd_masks.append((key_mask, entry))
        del self._fwd_masks[:-8]
        return entry

    def restrict(self, blayout: Any, key_mask: torch.Tensor, perm: Any, n: int, device: torch.device) -> Any:
        """`blayout` (None = dense) restricted to the valid keys of `key_mask`, in the order of `perm`
        (cached per mask contents, layout and perm object)."""
        entry = self._mask_entry(key_mask)
        if entry["all"]:
            return blayout
        for base, p, masked in entry["layouts"]:
            if base is blayout and p is perm:
                return masked
        km = entry["mask"] if perm is None else entry["mask"][:, perm]
        base_layout = BlockLayout.dense(n, n, device=device) if blayout is None else blayout
        masked = base_layout.with_key_mask(km)
        entry["layouts"].append((blayout, perm, masked))
        del entry["layouts"][:-8]  # per-call layouts (LiteAttention) must not pile up
        return masked

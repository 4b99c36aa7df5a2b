"""Moved to `diffusion_attn.runtime.ring` (context parallelism is part of the runtime); these names stay
importable from here."""

from __future__ import annotations

from ..runtime.ring import (
    build_ring_plan,
    lse_merge,
    restrict_layout,
    restrict_modifiers,
    ring_attention,
    ring_chunks,
    shard_rows_attention,
)

__all__ = [
    "build_ring_plan",
    "lse_merge",
    "restrict_layout",
    "restrict_modifiers",
    "ring_attention",
    "ring_chunks",
    "shard_rows_attention",
]

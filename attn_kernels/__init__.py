"""attnplug's kernels: one block-sparse FlashAttention (Triton on CUDA, exact PyTorch reference
on CPU) shared by every sparse variant, with fused modifiers. Imports neither timm nor diffusers."""

from __future__ import annotations

from .layout import VALID_BLOCK_SIZES, BlockLayout
from .modifiers import LogitDecay, OutputMix, TileStats
from .ops import BACKENDS, attention, triton_available
from .reference import reference_attention

__all__ = [
    "BACKENDS",
    "VALID_BLOCK_SIZES",
    "BlockLayout",
    "LogitDecay",
    "OutputMix",
    "TileStats",
    "attention",
    "reference_attention",
    "triton_available",
]

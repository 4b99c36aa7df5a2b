"""Coordinate attention (Hou et al., CVPR 2021): pool along H and along W, shared 1x1 conv + BN +
h-swish, split, two 1x1 convs + gate, ``x · a_h · a_w``.

Built on timm's `timm.layers.CoordAttn` (same parameter names: conv1, bn1, conv_h, conv_w) with
the paper's sizes by default: mip = max(8, C / reduction), reduction 32, convs with bias,
Hardswish. Mode "identity" (default) uses 2·sigmoid gates with zero-initialised conv_h/conv_w so
the injected model's output is unchanged at injection time; "original" is the paper's sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn as nn
from timm.layers.coord_attn import CoordAttn

from attn_spec import Range, check_options

from ..adapters.cnn import inject_channel_attention
from ._gates import GateMode, TwoSigmoid, check_mode, use_fused

__all__ = ["CoordAttention", "make_coord"]


class FusedCoordAttn(CoordAttn):
    """timm's `CoordAttn` (same parameters) that runs attnplug's fused Triton kernels on CUDA.

    `backend`: "auto" (Triton on CUDA for maps up to the kernel's width limit, else the eager formula),
    "triton", "reference" ("eager": deprecated alias).
    TorchScript, FX and torch.compile get the eager formula (timm's forward).
    """

    backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not self.has_skip and use_fused(x, self.backend, "coord", (x.shape[-1],)):
                return self._fused(x)
        identity = x  # timm's CoordAttn.forward
        N, C, H, W = x.size()
        x_h = x.mean(3, keepdim=True)
        x_w = x.mean(2, keepdim=True)
        x_w = x_w.transpose(-1, -2)
        y = torch.cat([x_h, x_w], dim=2)
        y = self.conv1(y)
        y = self.bn1(y)
        y = self.act(y)
        x_h, x_w = torch.split(y, [H, W], dim=2)
        x_w = x_w.transpose(-1, -2)
        a_h = self.gate(self.conv_h(x_h))
        a_w = self.gate(self.conv_w(x_w))
        out = identity * a_w * a_h
        if self.has_skip:
            out = out + identity
        return out

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        from attn_kernels.channel_attn import coord_fused

        return coord_fused(x, self, backend="triton")


def make_coord(channels: int, reduction: int = 32, mode: str = "identity", min_channels: int = 8) -> CoordAttn:
    """timm `CoordAttn` with the paper's bottleneck width max(min_channels, C // reduction)."""
    check_mode("CoordAttention", mode)
    mip = max(min_channels, channels // reduction)
    m = FusedCoordAttn(
        channels, rd_channels=mip, bias=True, act_layer=nn.Hardswish,
        gate_layer=TwoSigmoid if mode == "identity" else "sigmoid",
    )  # fmt: skip
    if mode == "identity":
        for conv in (m.conv_h, m.conv_w):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
    return m


@dataclass
class CoordAttention:
    """Coordinate attention injected into timm CNN blocks (see `vision_attn.adapters.cnn`).

    reduction: >= 1 (bottleneck width max(8, C // reduction)); mode: "identity" or "original".
    """

    name: ClassVar[str] = "coord"
    reduction: Annotated[int, Range(1, None, words=True)] = 32
    mode: GateMode = "identity"

    def __post_init__(self) -> None:
        check_options(self)  # the ranges and modes declared on the fields above

    def build(self, channels: int) -> nn.Module:
        return make_coord(channels, self.reduction, self.mode)

    def inject(self, model: nn.Module, handle) -> None:
        inject_channel_attention(model, handle, self, kind="coord")

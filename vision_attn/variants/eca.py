"""ECA (Wang et al., CVPR 2020): GAP -> Conv1d(1, 1, k, no bias) over channels -> gate -> rescale.

Built on timm's own `timm.layers.EcaModule` so parameter names (`conv.weight`) and the kernel
rule k = |log2(C)/2 + 1/2|_odd (min 3) match timm, and weights interchange with timm's ECA
models. What timm lacks and this adds: injection into pretrained CNNs and an identity start
(mode "identity": 2·sigmoid gate with a zero-initialised conv, so the injected model's output is
unchanged until the new parameters are trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn as nn
from timm.layers import EcaModule
from timm.layers.activations import Sigmoid as _TimmSigmoid

from attn_spec import Range, check_options

from ..adapters.cnn import inject_channel_attention
from ._gates import GateMode, TwoSigmoid, check_mode, use_fused

__all__ = ["ECA", "make_eca", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """The paper's adaptive kernel size (timm's formula): odd, at least 3."""
    import math

    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


_SIGMOIDS = (nn.Sigmoid, _TimmSigmoid)  # timm's create_act_layer("sigmoid") gives its own class


class FusedEcaModule(EcaModule):
    """timm's `EcaModule` (same parameters) that runs attnplug's fused Triton kernel on CUDA.

    `backend`: "auto" (Triton on CUDA, the eager formula elsewhere), "triton" (always; raises where it
    cannot run), "reference" ("eager": deprecated alias). TorchScript, FX and torch.compile get the
    eager formula (timm's forward).
    """

    backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.conv2 is None and use_fused(x, self.backend, "eca"):
                scale = 2.0 if isinstance(self.gate, TwoSigmoid) else 1.0 if isinstance(self.gate, _SIGMOIDS) else 0.0
                if scale > 0:
                    return self._fused(x, scale)
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)  # timm's EcaModule.forward
        y = self.conv(y)
        if self.conv2 is not None:
            y = self.act(y)
            y = self.conv2(y)
        y = self.gate(y).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        from attn_kernels.channel_attn import eca_fused

        return eca_fused(x, self.conv.weight, scale, backend="triton")


def make_eca(channels: int, kernel_size: int | None = None, mode: str = "identity") -> EcaModule:
    """A timm-compatible ECA module; mode "identity" uses a 2·sigmoid gate and a zero conv (exact identity)."""
    check_mode("ECA", mode)
    k = eca_kernel_size(channels) if kernel_size is None else kernel_size
    m = FusedEcaModule(kernel_size=k, gate_layer=TwoSigmoid if mode == "identity" else "sigmoid")
    if mode == "identity":
        nn.init.zeros_(m.conv.weight)
    return m


@dataclass
class ECA:
    """Efficient channel attention injected into timm CNN blocks (see `vision_attn.adapters.cnn`).

    kernel_size: odd int >= 1, or None for the paper's rule per block width.
    mode: "identity" (default, output unchanged at injection) or "original" (sigmoid gate, timm init).
    """

    name: ClassVar[str] = "eca"
    kernel_size: Annotated[int | None, Range(1, None, odd=True, note="or None (paper rule)")] = None
    mode: GateMode = "identity"

    def __post_init__(self) -> None:
        check_options(self)  # the ranges and modes declared on the fields above

    def build(self, channels: int) -> nn.Module:
        return make_eca(channels, self.kernel_size, self.mode)

    def inject(self, model: nn.Module, handle) -> None:
        inject_channel_attention(model, handle, self, kind="eca")

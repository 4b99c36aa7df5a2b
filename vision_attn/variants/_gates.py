"""Gates shared by the channel-attention variants."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import _symbolic_trace as _st


class TwoSigmoid(nn.Module):
    """``2·sigmoid(x)``: equals 1 exactly at x = 0, so a zero-initialised last conv makes the
    attention module an exact identity at injection time (gate range (0, 2))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x)


GATE_MODES = ("identity", "original")
BACKENDS = ("auto", "triton", "eager")


#: True while torch.fx symbolically traces (not torch.export, which torch.compiler.is_compiling covers)
fx_tracing = getattr(_st, "is_fx_symbolic_tracing", _st.is_fx_tracing)


def use_fused(x: torch.Tensor, backend: str) -> bool:
    """Whether a fused-kernel module runs its Triton kernel: backend "triton", or "auto" on CUDA.
    Never while FX traces or torch.compile compiles (they get the eager formula; inductor fuses it).
    Call it only outside TorchScript (`if not torch.jit.is_scripting():`)."""
    if fx_tracing() or torch.compiler.is_compiling():
        return False
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def check_backend(owner: str, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{owner}.backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_mode(owner: str, mode: str) -> str:
    if mode not in GATE_MODES:
        raise ValueError(
            f"{owner}.mode must be one of {GATE_MODES} ('identity': 2·sigmoid gate, zero-init, output unchanged at "
            f"injection; 'original': the paper's sigmoid gate), got {mode!r}"
        )
    return mode

"""Gates shared by the channel-attention variants."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
from torch.fx import _symbolic_trace as _st

from attn_kernels.backends import BACKEND_NAMES, NoBackendError, choose_backend, resolve_name
from attn_spec import OneOf


class TwoSigmoid(nn.Module):
    """``2·sigmoid(x)``: equals 1 exactly at x = 0, so a zero-initialised last conv makes the
    attention module an exact identity at injection time (gate range (0, 2))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x)


GATE_MODES = ("identity", "original")
_MODE = OneOf(
    *GATE_MODES,
    note="('identity': 2·sigmoid gate, zero-init, output unchanged at injection; 'original': the paper's sigmoid gate)",
)
#: the `mode` option of the channel-attention variants, declared once
GateMode = Annotated[str, _MODE]
#: the kernel vocabulary (attn_kernels.backends); "eager" is still accepted as a deprecated alias of "reference"
BACKENDS = BACKEND_NAMES


#: True while torch.fx symbolically traces (not torch.export, which torch.compiler.is_compiling covers)
fx_tracing = getattr(_st, "is_fx_symbolic_tracing", _st.is_fx_tracing)


def use_fused(x: torch.Tensor, backend: str, op: str, dims: tuple[int, ...] = (), flags: int = 0) -> bool:
    """Whether a fused-kernel module runs its Triton kernel: the kernel chooser
    (`attn_kernels.backends.choose_backend`, cached per device type, dtype, sizes and flags) picks
    "triton" for ``op`` — backend "triton" (raises, with every reason, where it cannot run), or
    "auto" on CUDA when the kernel fits (else the module's eager formula). Never while FX traces or
    torch.compile compiles (they get the eager formula; inductor fuses it). Call it only outside
    TorchScript (`if not torch.jit.is_scripting():`)."""
    if fx_tracing() or torch.compiler.is_compiling():
        return False
    if backend not in BACKEND_NAMES:  # a deprecated alias set on the attribute directly
        backend = resolve_name(f"the {op} module's backend", backend)
    try:
        return choose_backend(op, backend, x.device.type, x.dtype, dims, flags).name == "triton"
    except NoBackendError:
        if backend == "triton":
            raise
        return False  # e.g. no triton on this platform: the eager formula


def check_mode(owner: str, mode: str) -> str:
    """`mode` when it is a gate mode, else the ValueError of the variants' declaration (`GateMode`)."""
    _MODE.check(f"{owner}.mode", mode, str)
    return mode

"""Gates shared by the channel-attention variants."""

from __future__ import annotations

import torch
import torch.nn as nn


class TwoSigmoid(nn.Module):
    """``2·sigmoid(x)``: equals 1 exactly at x = 0, so a zero-initialised last conv makes the
    attention module an exact identity at injection time (gate range (0, 2))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x)


GATE_MODES = ("identity", "original")


def check_mode(owner: str, mode: str) -> str:
    if mode not in GATE_MODES:
        raise ValueError(
            f"{owner}.mode must be one of {GATE_MODES} ('identity': 2·sigmoid gate, zero-init, output unchanged at "
            f"injection; 'original': the paper's sigmoid gate), got {mode!r}"
        )
    return mode

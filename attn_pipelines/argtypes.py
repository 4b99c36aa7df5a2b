"""argparse `type=` converters shared by the commands: each error names the expected range."""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonneg_int", "seed", "finite_float", "grid", "MAX_SEED"]

#: torch.Generator.manual_seed takes seeds in [0, 2**64 - 1].
MAX_SEED = 2**64 - 1


def _int(text: str, lo: int, hi: int | None, what: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1, None, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0, None, "an integer >= 0")


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**64 - 1] (what torch.Generator accepts)."""
    return _int(text, 0, MAX_SEED, f"an integer in [0, {MAX_SEED}] (2**64 - 1)")


def finite_float(text: str) -> float:
    """A finite number (no nan / inf)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def grid(text: str) -> tuple[int, int, int]:
    """FRAMESxHEIGHTxWIDTH of positive integers, e.g. 8x4x6."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        vals = tuple(int(p, 10) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected FRAMESxHEIGHTxWIDTH of positive ints (e.g. 8x4x6), got {text!r}")
    return vals  # type: ignore[return-value]

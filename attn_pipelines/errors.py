"""The CLI's user-facing errors: one `attnplug: error: ...` line, no traceback."""

from __future__ import annotations

__all__ = ["CLIError", "RunError"]


class CLIError(Exception):
    """Bad input (flags, presets, options, an unwritable --out): exit status 2."""


class RunError(Exception):
    """A run that failed after its input was accepted (a failed write, a failed benchmark): exit status 1."""

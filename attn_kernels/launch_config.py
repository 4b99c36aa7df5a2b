"""`LaunchConfig`: one kernel launch configuration, as the kernel modules list them for the static check.

It lives apart from `attn_kernels.static_check` so that the kernel modules can build their lists
(`static_configs()`) without importing the checker: the checker imports the kernels, never the
reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LaunchConfig"]


@dataclass(frozen=True)
class LaunchConfig:
    """One launch as the runtime would make it: kernel, arguments (tensors only give their dtype)
    and compile options. ``ci``: part of the representative subset run in CI."""

    name: str
    kernel: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    ci: bool = False

"""Test-only variants: record what the variants see, or force every call through attnplug's kernel."""

from __future__ import annotations

from typing import ClassVar

from attn_kernels import BlockLayout
from diffusion_attn.variants.base import Variant


class Recorder(Variant):
    """Records (step, layer, branch, num_steps, heads, head_offset) of every call; leaves the plan dense."""

    name: ClassVar[str] = "recorder"
    role: ClassVar[str] = "modifier"

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def plan(self, ctx, plan):
        self.seen.append((ctx.step, ctx.layer, ctx.branch, ctx.num_steps, ctx.heads, ctx.head_offset))
        return plan

    def steps(self, layer: int = 0) -> list[int]:
        return [s[0] for s in self.seen if s[1] == layer]

    def branches(self, layer: int = 0) -> list:
        return [s[2] for s in self.seen if s[1] == layer]


class ForceKernel(Variant):
    """Every call through attnplug's kernel with a dense layout (q/k/v and the kernel path, no sparsity)."""

    name: ClassVar[str] = "force_kernel"
    role: ClassVar[str] = "sparsity"

    def plan(self, ctx, plan):
        plan.layout = BlockLayout.dense(ctx.layout.seq_len, ctx.layout.seq_len, 16, 16, device=ctx.device)
        return plan

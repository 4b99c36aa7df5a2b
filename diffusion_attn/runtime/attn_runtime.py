"""`AttnRuntime`: the mutable state of one hooked transformer, shared by its step hook and its processors.

It holds the facts of the current forward (grid, branch, step clock, perturbed pass) and delegates each
concern to one collaborator of this package; see `diffusion_attn.runtime` for the data flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..clock import StepClock
from ..variants.base import AttnPlan, TokenLayout, Variant
from .branches import BranchStates
from .engine import run_kernel
from .key_masks import KeyMasks
from .layouts import LayoutCache
from .parallel import GatherOrder, run_ring, run_ulysses
from .planner import PlanLog, Planner

__all__ = ["AttnRuntime"]


@dataclass
class AttnRuntime:
    """Mutable state of one hooked transformer, shared by its step hook and its processors.

    Per forward the step hook advances the shared `StepClock`, sets `grid` (from shapes) and calls
    `begin_forward` (selects the branch's variant state, clears the per-forward key-mask matches) and
    `end_forward` (logs the plan per layer when it changed). Per attention call a processor asks `layout`
    and `plan` (shapes only), then `run` (the kernel, or the context-parallel dispatch around it).
    """

    family: str
    variants: tuple[Variant, ...]
    num_layers: int = 0
    clock: StepClock = field(default_factory=StepClock)
    kernel_backend: str = "auto"  # attn_kernels.attention backend: "auto", "triton" or "reference"
    grid: tuple[int, int, int] | None = None
    model_name: str = ""
    layer_names: tuple[str, ...] = ()
    calls: int = 0  # attention calls that went through attnplug's kernel (for tests / stats)
    ring_skipped: int = 0  # ring attention: (pass, key chunk) kernel calls skipped as empty (for tests / stats)
    branch: str | None = None  # cache-context name of the current forward
    perturbed: bool = False  # the current forward is a guidance variant's perturbed pass (AttnContext.perturbed)

    def __post_init__(self) -> None:
        self.branches = BranchStates()
        self.layouts = LayoutCache(self.family)
        self.planner = Planner(self.variants, self.num_layers)
        self.plan_log = PlanLog(self.family, self.num_layers)
        self.key_masks = KeyMasks()
        self.parallel = GatherOrder(self.layouts)

    # -- clock views ------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def step_source(self) -> str:
        return self.clock.source

    @property
    def num_steps(self) -> int | None:
        return self.clock.num_steps

    # -- branches and forwards ----------------------------------------------------------------
    @property
    def states(self) -> dict:
        """Variant state of the current branch: {(variant index, layer): dict}."""
        return self.branches.current

    def branch_states(self) -> dict:
        """Variant state per branch name of this generation (None = calls without a cache context)."""
        return self.branches.live()

    def clear_states(self) -> None:
        """New generation: every branch's variant state cleared (static layout caches are kept)."""
        self.branches.clear()
        self.plan_log.last = None

    def reset(self) -> None:
        """New generation for the whole handle (the clock is shared by every denoiser)."""
        self.clock.reset()

    def begin_forward(self, branch: str | None, states: dict | None) -> None:
        """Called by the step hook at the start of every transformer forward."""
        self.branch = branch
        self.branches.begin(branch, states)
        self.key_masks.begin_forward()
        self.plan_log.begin()

    def end_forward(self) -> None:
        """Called after every transformer forward: log the plan per layer when it changed (a new phase)."""
        self.plan_log.end(self.model_name, self.step, self.branch)

    # -- per call -----------------------------------------------------------------------------
    def layout(self, text_len: int, text_first: bool) -> TokenLayout:
        """The TokenLayout of a call (one object per (grid, text_len, text_first), reused)."""
        return self.layouts.token_layout(self.grid, text_len, text_first)

    def plan(
        self,
        layer: int,
        layout: TokenLayout,
        batch: int,
        heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        head_offset: int = 0,
    ) -> AttnPlan:
        """The variants' plan for one call of `layer` (`heads` in this call, the first at `head_offset`)."""
        plan = self.planner.plan(
            layer=layer, layout=layout, batch=batch, heads=heads, head_dim=head_dim, device=device, dtype=dtype,
            head_offset=head_offset, clock=self.clock, states=self.branches.current, branch=self.branch,
            perturbed=self.perturbed,
        )  # fmt: skip
        self.plan_log.record(layer, plan, self.variants)
        return plan

    def run(
        self,
        plan: AttnPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: TokenLayout,
        key_mask: torch.Tensor | None = None,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        """Sparse attention of one call. q, k, v: [B, N, H, D] (diffusers' layout); returns [B, N, H, D].

        key_mask: bool [B, N] (False = padded key), the same tensor object for every layer of a
        forward (see `key_mask_of`). parallel_config: diffusers' ParallelConfig when the model runs
        with context parallelism: q, k, v are this rank's sequence shard (`runtime.parallel`)."""
        if parallel_config is not None:
            if layout.cross_len or plan.compute is not None:
                raise RuntimeError(
                    f"attnplug[{self.family}]: cross-attention plans and variants with their own computation "
                    "(AgentSD, Boundary) do not support context parallelism"
                )
            if parallel_config.context_parallel_config.ring_degree > 1:
                return run_ring(self, plan, q, k, v, layout, key_mask, parallel_config)
            return run_ulysses(self, plan, q, k, v, layout, key_mask, parallel_config)
        n = q.shape[1]
        if layout.seq_len != n or k.shape[1] != layout.key_len:
            raise RuntimeError(
                f"attnplug[{self.family}]: token layout {layout} has {layout.seq_len} tokens"
                f"{f' and {layout.key_len} keys' if layout.cross_len else ''} but the attention call has {n} queries "
                f"and {k.shape[1]} keys"
            )
        return self._kernel(plan, q, k, v, key_mask, None)

    def _kernel(
        self,
        plan: AttnPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        gather: tuple | None,
        *,
        run_after: bool = True,
    ) -> torch.Tensor:
        """The kernel on [B, N, H, D] inputs (`runtime.engine`); the one seam every sparse call goes through
        (Ulysses' forward and backward included), so tests can observe or replace it."""
        return run_kernel(self, plan, q, k, v, key_mask, gather, run_after=run_after)

    # -- key-padding masks ------------------------------------------------------------------
    def key_mask_of(self, mask: torch.Tensor, derive: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`derive(mask)` (the key mask [B, N] of a model's attention mask), computed once per forward
        for each model mask object, so every layer passes the same key-mask tensor to `run`."""
        return self.key_masks.key_mask_of(mask, derive)

"""The variants' plan of one attention call, and the per-layer plan log.

Owns the order in which variants plan (sparsity first, so modifiers see the final layout and
permutation; state keys keep each variant's index), the routing of nearly dense layouts to the model's
own processor (`DENSE_ENGINE_BLOCK_DENSITY`), and the INFO log line that says, per forward, which layers
ran the model's processor and which ran attnplug's kernel (logged only when it changes: a new phase).
Planning reads shapes and host-known counts only: no tensor value is read on the host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from diffusers.utils.logging import get_logger

from ..clock import StepClock
from ..variants.base import AttnContext, AttnPlan, TokenLayout, Variant

__all__ = ["DENSE_ENGINE_BLOCK_DENSITY", "PlanLog", "Planner", "dense_engine_if_nearly_dense", "logger"]

# under diffusers' root logger: `diffusers.utils.logging.set_verbosity_info()` shows our INFO lines
logger = get_logger("diffusers.attnplug")

#: A plan whose only work is a layout of `approximates_dense` variants, keeping at least this fraction of
#: the blocks, runs dense (the model's own processor: SDPA / FlashAttention / cuDNN) instead. From the
#: kernel's targets: sparse time <= 1.15 x density x our dense time and our dense time <= SDPA's / 0.9, so
#: a layout only pays off below 0.9 / 1.15 = 0.78 of the blocks; `benchmarks/kernel_bench.py` reports the
#: measured crossover (`dense_engine_block_density`). Override: ATTNPLUG_DENSE_ENGINE_DENSITY (1.01 = never).
DENSE_ENGINE_BLOCK_DENSITY = float(os.environ.get("ATTNPLUG_DENSE_ENGINE_DENSITY", "0.78"))

#: planning order by `Variant.role` (unknown roles plan with the modifiers)
_ROLE_RANK = {"sparsity": 0, "modifier": 1, "guidance": 2}


def dense_engine_if_nearly_dense(plan: AttnPlan, variants: Sequence[Variant]) -> AttnPlan:
    """`plan`, or a dense plan where its layout is nearly dense (see `DENSE_ENGINE_BLOCK_DENSITY`); reads
    only host-known counts (no sync)."""
    if (
        plan.layout is None or plan.perm is not None or plan.modifiers or plan.tile_stats is not None
        or plan.extra or plan.compute is not None or plan.after
        or not all(v.approximates_dense for v in variants if v.role == "sparsity")
    ):  # fmt: skip
        return plan
    density = plan.layout.known_block_density()
    if density is None or density < DENSE_ENGINE_BLOCK_DENSITY:
        return plan
    return AttnPlan()


class PlanLog:
    """Which engine each layer's call used in this forward; one INFO line per change of the summary."""

    def __init__(self, family: str, num_layers: int) -> None:
        self.family = family
        self.num_layers = num_layers
        self.kinds: list | None = None  # plan kind per layer of this forward (None: not logging)
        self.last: tuple | None = None

    def begin(self) -> None:
        """Start a forward: record kinds only when INFO is enabled and no graph is being compiled."""
        self.kinds = None
        if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.INFO):
            self.kinds = [None] * self.num_layers

    def record(self, layer: int, plan: AttnPlan, variants: Sequence[Variant]) -> None:
        if self.kinds is not None and 0 <= layer < len(self.kinds):
            self.kinds[layer] = (
                "dense (model's processor)"
                if plan.is_dense
                else "attnplug kernel (" + ", ".join(v.name for v in variants) + ")"
            )

    def end(self, model_name: str, step: int, branch: str | None) -> None:
        """End a forward: log the plan per layer when it changed (a new phase)."""
        kinds = self.kinds
        if kinds is None:
            return
        self.kinds = None
        summary = tuple(kinds)
        if summary == self.last:
            return
        self.last = summary
        groups: list[tuple[int, int, str]] = []
        for i, k in enumerate(summary):
            k = "not called" if k is None else k
            if groups and groups[-1][2] == k and groups[-1][1] == i - 1:
                groups[-1] = (groups[-1][0], i, k)
            else:
                groups.append((i, i, k))
        parts = [f"{a}{'' if a == b else f'-{b}'}: {k}" for a, b, k in groups]
        logger.info(
            f"attnplug[{self.family}] {model_name} step {step}"
            f"{'' if branch is None else f' ({branch})'}: layers " + "; ".join(parts)
        )


class Planner:
    """Asks every variant, in planning order, for its part of one call's `AttnPlan`."""

    def __init__(self, variants: tuple[Variant, ...], num_layers: int) -> None:
        self.variants = variants
        self.num_layers = num_layers
        # sparsity variants plan first, so modifiers see the final layout and permutation (state keys keep the
        # variant's index in `variants`)
        self.order = sorted(enumerate(variants), key=lambda iv: _ROLE_RANK.get(iv[1].role, 1))

    def plan(
        self,
        *,
        layer: int,
        layout: TokenLayout,
        batch: int,
        heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        head_offset: int,
        clock: StepClock,
        states: dict,
        branch: str | None,
        perturbed: bool,
    ) -> AttnPlan:
        """The plan of one call of `layer`; `states` is the current branch's {(variant index, layer): dict}."""
        plan = AttnPlan()
        for i, var in self.order:
            if layout.cross_len and not var.cross_attention:
                continue  # cross-attention calls are planned only by variants that ask for them
            ctx = AttnContext(
                layer=layer,
                num_layers=self.num_layers,
                step=clock.step,
                timestep=clock.timestep,
                layout=layout,
                batch=batch,
                heads=heads,
                head_dim=head_dim,
                device=device,
                dtype=dtype,
                state=states.setdefault((i, layer), {}),
                num_steps=clock.num_steps,
                head_offset=head_offset,
                branch=branch,
                perturbed=perturbed,
            )
            plan = var.plan(ctx, plan)
        return dense_engine_if_nearly_dense(plan, self.variants)

"""The runtime of one hooked transformer: what happens between a processor and the kernel.

Data flow (one transformer forward, then one attention call):

    step hook (hooks.py)  --grid, branch-->  AttnRuntime.begin_forward
        branches.BranchStates     selects the variant state of the cache-context branch
        key_masks.KeyMasks        forgets last forward's identity matches
        planner.PlanLog           starts recording which engine each layer uses
    processor (adapters/*)  --shapes-->  AttnRuntime.layout / .plan
        layouts.LayoutCache       one TokenLayout per (grid, text_len, text_first)
        planner.Planner           variants in planning order -> AttnPlan (dense: the model's own processor)
    processor  --q, k, v-->  AttnRuntime.run
        parallel                  context parallelism: Ulysses all-to-all or ring chunks (ring.py) around ...
        engine.run_kernel         ... the kernel: permutation, key-mask layout (KeyMasks), extra passes, after
    step hook  -->  AttnRuntime.end_forward  (PlanLog: one INFO line when the per-layer summary changes)

Each module owns one concern and says so in its docstring; `AttnRuntime` (attn_runtime.py) composes them.
"""

from __future__ import annotations

from .attn_runtime import AttnRuntime
from .planner import DENSE_ENGINE_BLOCK_DENSITY, dense_engine_if_nearly_dense

__all__ = ["DENSE_ENGINE_BLOCK_DENSITY", "AttnRuntime", "dense_engine_if_nearly_dense"]

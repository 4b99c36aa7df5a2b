"""The diffusers hooks attnplug meets on a denoiser: the name its own step hook is registered under in a
module's hook registry (`HOOK_NAME`) and diffusers' caches (`CACHE_HOOKS`, `find_caches`).

It imports no other attnplug module, so hooks.py (which registers the step hook and refuses variants a cache
would break) and the variants that look at the pipeline's cache context themselves (SoftPAG's perturbed pass)
share these facts without importing each other.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["CACHE_HOOKS", "HOOK_NAME", "find_caches"]

#: the name of attnplug's step hook (`hooks.AttnStepHook`) in a denoiser's diffusers hook registry
HOOK_NAME = "attnplug_step"

#: diffusers cache hooks that skip attention calls or whole blocks: hook name -> (cache, state kept per
#: cache context). Per-context caches give SoftPAG's perturbed pass its own state (its own context);
#: the others keep one state per module, shared by every branch.
CACHE_HOOKS: dict[str, tuple[str, bool]] = {
    "pyramid_attention_broadcast": ("PyramidAttentionBroadcast", False),
    "faster_cache_denoiser": ("FasterCache", False),
    "faster_cache_block": ("FasterCache", False),
    "fbc_leader_block_hook": ("FirstBlockCache", True),
    "fbc_block_hook": ("FirstBlockCache", True),
    "mag_cache_leader_block_hook": ("MagCache", True),
    "mag_cache_block_hook": ("MagCache", True),
    "sea_cache_root": ("SeaCache", True),
    "sea_cache_leader_block": ("SeaCache", True),
    "sea_cache_block": ("SeaCache", True),
    "taylorseer_cache": ("TaylorSeerCache", True),
}


def find_caches(model: nn.Module) -> dict[str, bool]:
    """diffusers caches enabled on `model` (its modules' hook registries): {cache name: per-context state}."""
    out: dict[str, bool] = {}
    for m in model.modules():
        registry = m.__dict__.get("_diffusers_hook")
        if registry is None:
            continue
        for name in registry.hooks:
            hit = CACHE_HOOKS.get(name)
            if hit is not None:
                out[hit[0]] = out.get(hit[0], True) and hit[1]
    return out

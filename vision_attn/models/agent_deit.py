"""Agent-DeiT (Han et al., ECCV 2024) as timm model names: timm's DeiT with agent attention.

Names follow the paper's code: agent_deit_{tiny,small,base}_patch16_224 — 49 agents in every
block for tiny/small, 81 agents in the first 4 blocks for base. `pretrained=True` with
`pretrained_cfg_overlay=dict(file=...)` loads a local checkpoint of the agent model or of an
ORIGINAL DeiT/ViT (qkv/proj keys are timm's; agent biases and DWC keep their zero init).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..variants.agent import Agent
from ._builder import build_injected, claim_names

__all__: list[str] = []

#: name -> (timm base model, default agents, converted blocks (None = all))
_ARCHS: dict[str, tuple[str, int, tuple[int, ...] | None]] = {
    "agent_deit_tiny_patch16_224": ("deit_tiny_patch16_224", 49, None),
    "agent_deit_small_patch16_224": ("deit_small_patch16_224", 49, None),
    "agent_deit_base_patch16_224": ("deit_base_patch16_224", 81, (0, 1, 2, 3)),
}

claim_names(_ARCHS, __name__)  # before register_model below

default_cfgs = generate_default_cfgs(
    {
        name: {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 224, 224),
            "pool_size": None,
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        }
        for name in _ARCHS
    }
)


def _create(name: str, pretrained: bool = False, num_agents: int | None = None, **kwargs: Any) -> nn.Module:
    base, agents, blocks = _ARCHS[name]
    return build_injected(name, base, Agent(num_agents=num_agents or agents, blocks=blocks), pretrained, kwargs)


@register_model
def agent_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Tiny with agent attention (49 agents) in every block."""
    return _create("agent_deit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def agent_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Small with agent attention (49 agents) in every block."""
    return _create("agent_deit_small_patch16_224", pretrained, **kwargs)


@register_model
def agent_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DeiT-Base with agent attention (81 agents) in the first 4 blocks, as the paper."""
    return _create("agent_deit_base_patch16_224", pretrained, **kwargs)

"""Shared builder of attnplug's registered timm models: timm's base model + an injected variant,
with local checkpoints (of this model or of the original base) loaded through timm's
`pretrained_cfg_overlay=dict(file=...)`."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from timm.models import load_state_dict

from ..inject import inject

__all__ = ["build_injected"]


def _load_local(model: nn.Module, file: str, new_keys: set[str]) -> None:
    """Load a local checkpoint of the base model or of this model; only attnplug keys may be missing."""
    state = load_state_dict(file)
    own = model.state_dict()
    head_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in head_mismatch:  # e.g. a different num_classes: keep the fresh classifier, as timm does
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if k not in new_keys and k not in head_mismatch]
    if bad_missing or unexpected:
        raise RuntimeError(
            f"checkpoint {file} does not fit {type(model).__name__}: missing {bad_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def build_injected(name: str, base: str, variant: Any, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """Create timm's `base`, inject `variant`, attach `name`'s pretrained cfg, load a local file if asked."""
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    kwargs.pop("cache_dir", None)
    model = timm.create_model(base, pretrained=False, **kwargs)
    before = set(model.state_dict())
    inject(model, variant)
    new_keys = set(model.state_dict()) - before  # parameters the variant added (reused ones keep their keys)
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    if isinstance(pretrained_cfg, dict):
        cfg.update(pretrained_cfg)
    cfg.update(overlay)
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        if not cfg.get("file"):
            raise RuntimeError(
                f"{name} has no published weights: pass pretrained_cfg_overlay=dict(file=...) with a local checkpoint "
                f"of {name} or of the original {base}"
            )
        _load_local(model, cfg["file"], new_keys)
    return model

"""Shared builder of attnplug's registered timm models: timm's base model + an injected variant,
local checkpoints (of this model or of the original base) loaded through timm's
`pretrained_cfg_overlay=dict(file=...)`, and `features_only` wrapped as timm wraps its own
families (ViT-family: `FeatureGetterNet` on `forward_intermediates`; CNNs: `FeatureListNet`)."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from timm.models._features import FeatureGetterNet, FeatureListNet
from timm.models._pretrained import PretrainedCfg

from ..checkpoint import load_checkpoint
from ..inject import inject

__all__ = ["build_injected", "claim_names"]


def claim_names(names, module: str) -> None:
    """Refuse to register a name timm (or another package) already has: attnplug never shadows one."""
    from timm.models._registry import _model_to_module

    short = module.rsplit(".", 1)[-1]
    for name in names:
        owner = _model_to_module.get(name)
        if owner is not None and owner != short:
            raise RuntimeError(
                f"vision_attn: timm already has a model named {name!r} (module {owner!r}); attnplug does not shadow it"
            )


_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls", "output_fmt", "flatten_sequential", "feature_cfg")


def _features(model: nn.Module, cfg: dict[str, Any], feature_kwargs: dict[str, Any]) -> nn.Module:
    """Wrap a full (injected, loaded) model for `features_only=True`, as timm's builder does."""
    from timm.models._builder import pretrained_cfg_for_features

    out_indices = feature_kwargs.get("out_indices")
    output_fmt = feature_kwargs.get("output_fmt")
    if hasattr(model, "blocks") and hasattr(model, "forward_intermediates") and hasattr(model, "patch_embed"):
        feats = FeatureGetterNet(
            model, out_indices=3 if out_indices is None else out_indices, output_fmt=output_fmt or "NCHW"
        )
    else:
        n = len(model.feature_info)
        kw = {"output_fmt": output_fmt or getattr(model, "output_fmt", "NCHW")}
        feats = FeatureListNet(
            model, out_indices=tuple(range(n)) if out_indices is None else out_indices, flatten_sequential=True, **kw
        )
    feats.pretrained_cfg = feats.default_cfg = pretrained_cfg_for_features(cfg)
    return feats


def build_injected(name: str, base: str, variant: Any, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """Create timm's `base`, inject `variant`, attach `name`'s pretrained cfg, load a local file if asked."""
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    kwargs.pop("cache_dir", None)
    feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
    model = timm.create_model(base, pretrained=False, **kwargs)
    inject(model, variant)
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    if isinstance(pretrained_cfg, PretrainedCfg):
        pretrained_cfg = pretrained_cfg.to_dict()
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
        load_checkpoint(model, cfg["file"])
    if feature_kwargs.get("features_only"):
        return _features(model, cfg, feature_kwargs)
    return model

"""timm model names with coordinate attention / ECA that timm itself lacks.

Each is timm's own base model with the variant injected at the papers' places
(`vision_attn.adapters.cnn`) in "identity" mode, so an ORIGINAL base checkpoint loads into it
(`pretrained=True, pretrained_cfg_overlay=dict(file=...)`) and gives the original's outputs until
the new parameters are trained; a checkpoint of the attnplug model itself loads as well.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, load_state_dict, register_model

from ..inject import inject
from ..variants.coord import CoordAttention
from ..variants.eca import ECA

__all__: list[str] = []

#: attnplug name -> (timm base model, variant factory)
_ARCHS: dict[str, tuple[str, Any]] = {
    "coord_mobilenetv2_100": ("mobilenetv2_100", CoordAttention),
    "eca_mobilenetv2_100": ("mobilenetv2_100", ECA),
    "eca_efficientnet_b0": ("efficientnet_b0", ECA),
    "eca_convnext_tiny": ("convnext_tiny", ECA),
}


def _cfg(base: str, **kwargs: Any) -> dict[str, Any]:
    crop = 0.95 if "convnext" in base else 0.875
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": crop,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0" if "convnext" in base else "conv_stem",
        "classifier": "head.fc" if "convnext" in base else "classifier",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg(base) for name, (base, _) in _ARCHS.items()})


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


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    base, variant_cls = _ARCHS[name]
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    kwargs.pop("cache_dir", None)
    model = timm.create_model(base, pretrained=False, **kwargs)
    handle = inject(model, variant_cls())
    new_keys = {k for m_name, m in model.named_modules() if m in handle.new_modules for k in _keys(m_name, m)}
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    if isinstance(pretrained_cfg, dict):
        cfg.update(pretrained_cfg)
    cfg.update(overlay)
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        file = cfg.get("file")
        if not file:
            raise RuntimeError(
                f"{name} has no published weights: pass pretrained_cfg_overlay=dict(file=...) with a local checkpoint "
                f"of {name} or of the original {base}"
            )
        _load_local(model, file, new_keys)
    return model


def _keys(prefix: str, module: nn.Module) -> list[str]:
    return [f"{prefix}.{k}" for k in module.state_dict()]


@register_model
def coord_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2-1.0 with coordinate attention after the depthwise conv of each expanded block."""
    return _create("coord_mobilenetv2_100", pretrained, **kwargs)


@register_model
def eca_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2-1.0 with ECA after the projection BN of each block."""
    return _create("eca_mobilenetv2_100", pretrained, **kwargs)


@register_model
def eca_efficientnet_b0(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """EfficientNet-B0 with ECA after the projection BN of each block (its SE kept)."""
    return _create("eca_efficientnet_b0", pretrained, **kwargs)


@register_model
def eca_convnext_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-T with ECA after each block's depthwise conv."""
    return _create("eca_convnext_tiny", pretrained, **kwargs)

"""timm model names with coordinate attention / ECA that timm itself lacks.

Each is timm's own base model with the variant injected at the papers' places
(`vision_attn.adapters.cnn`) in "identity" mode, so an ORIGINAL base checkpoint loads into it
(`pretrained=True, pretrained_cfg_overlay=dict(file=...)`) and gives the original's outputs until
the new parameters are trained; a checkpoint of the attnplug model itself loads as well.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..variants.coord import CoordAttention
from ..variants.eca import ECA
from ._builder import build_injected, claim_names

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


claim_names(_ARCHS, __name__)  # before register_model below

default_cfgs = generate_default_cfgs({name: _cfg(base) for name, (base, _) in _ARCHS.items()})


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    base, variant_cls = _ARCHS[name]
    return build_injected(name, base, variant_cls(), pretrained, kwargs)


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
    """ConvNeXt-T with ECA at the end of each block's residual branch (after the MLP, before layer scale)."""
    return _create("eca_convnext_tiny", pretrained, **kwargs)

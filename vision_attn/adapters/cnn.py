"""Where channel attention goes in timm CNN blocks (one rule per block class).

| block (timm)                        | ECA                                  | coordinate attention                 |
|-------------------------------------|--------------------------------------|--------------------------------------|
| resnet.Bottleneck / BasicBlock      | `se` slot: after bn3/bn2, before add | `se` slot                            |
| InvertedResidual (MobileNetV2/V3,   | after bn3 (projection BN), paper     | after the depthwise conv, before the |
|   EfficientNet)                     |                                      | projection, blocks with expansion≠1  |
| DepthwiseSeparableConv              | after bn2 (projection BN)            | skipped (expansion 1, as the paper)  |
| convnext.ConvNeXtBlock              | after conv_dw                        | after conv_dw                        |
| regnet.Bottleneck                   | after conv3 (last conv+BN)           | `se` slot: after conv2 (3x3)         |

An empty `se` slot (None / nn.Identity) takes the module under timm's own name (`se`, as in
timm's ecaresnet*, so weights interchange); an occupied slot (SE already there) or a place
with no slot gets the module as a new child (`eca` / `coord`) run by a forward hook on the
preceding layer. Everything is recorded on the InjectionHandle and undone by `remove()`.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["SUPPORTED_FAMILIES", "inject_channel_attention", "placements"]

SUPPORTED_FAMILIES = "ResNet (Bottleneck/BasicBlock), MobileNetV2/V3 and EfficientNet, ConvNeXt, RegNet"


def _empty(mod: Any) -> bool:
    return mod is None or isinstance(mod, nn.Identity)


def _classes():
    from timm.models import _efficientnet_blocks as eb
    from timm.models import convnext, regnet, resnet

    return resnet, eb, convnext, regnet


def placements(block: nn.Module, kind: str) -> list[tuple[str, str, int]] | None:
    """[(mode, where, channels)] for one block: mode "slot" (where = slot name) or "after"
    (where = the child after which the module runs); [] = skip; None = not a CNN block we know."""
    resnet, eb, convnext, regnet = _classes()
    if isinstance(block, resnet.Bottleneck):
        return [("slot", "se", block.bn3.num_features)]
    if isinstance(block, resnet.BasicBlock):
        return [("slot", "se", block.bn2.num_features)]
    if isinstance(block, eb.InvertedResidual):
        if kind == "eca":
            return [("after", "bn3", block.bn3.num_features)]
        if block.conv_pw.out_channels == block.conv_pw.in_channels:
            return []  # expansion 1
        return [("slot", "se", block.bn2.num_features)]
    if isinstance(block, eb.DepthwiseSeparableConv):
        return [("after", "bn2", block.bn2.num_features)] if kind == "eca" else []
    if isinstance(block, convnext.ConvNeXtBlock):
        return [("after", "conv_dw", block.conv_dw.out_channels)]
    if isinstance(block, regnet.Bottleneck):
        if kind == "eca":
            return [("after", "conv3", block.conv3.conv.out_channels)]
        return [("slot", "se", block.conv2.conv.out_channels)]
    return None


def _run_after(module: nn.Module):
    def hook(_mod, _args, output):
        return module(output)

    return hook


def inject_channel_attention(model: nn.Module, handle, variant, *, kind: str) -> None:
    """Insert `variant.build(channels)` into every supported block of `model`."""
    blocks = [(name, m) for name, m in model.named_modules() if placements(m, kind) is not None]
    if not blocks:
        raise ValueError(
            f"{type(variant).__name__}: {type(model).__name__} has no supported CNN blocks; supported families: "
            f"{SUPPORTED_FAMILIES}"
        )
    for _, block in blocks:
        for mode, where, channels in placements(block, kind):
            module = variant.build(channels)
            if mode == "slot" and _empty(getattr(block, where, None)):
                handle.set_child(block, where, module)
                continue
            anchor = block.se if mode == "slot" else getattr(block, where)
            if hasattr(block, kind):
                raise ValueError(f"{type(variant).__name__}: block already has a child named {kind!r}")
            handle.set_child(block, kind, module)
            handle.add_forward_hook(anchor, _run_after(module))

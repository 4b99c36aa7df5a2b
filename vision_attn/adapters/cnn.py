"""Where channel attention goes in timm CNN blocks (one rule per block class).

| block (timm)                    | ECA                                  | coordinate attention               |
|---------------------------------|--------------------------------------|------------------------------------|
| resnet.Bottleneck / BasicBlock  | `se` slot: after bn3/bn2, before add | `se` slot                          |
| InvertedResidual (MobileNetV2/  | after bn3 (projection BN), before    | after the depthwise conv (and its  |
|   V3, EfficientNet)             | the add                              | SE), before the projection;        |
|                                 |                                      | expansion != 1 only                |
| DepthwiseSeparableConv          | after bn2 (projection BN)            | none (expansion 1, as the paper)   |
| convnext.ConvNeXtBlock          | after the MLP, before layer scale    | after conv_dw (depthwise conv)     |
| regnet.Bottleneck               | after conv3 (last conv + BN)         | `se` slot: after conv2 (3x3 group) |

The rule behind the table, from the papers: ECA goes at the end of the residual branch, before
the add (ECA-Net: after bn3 in ResNet, after the projection BN in MobileNetV2); coordinate
attention goes after the spatial (depthwise / grouped 3x3) conv of expanded blocks (CA paper,
MobileNetV2) and, in ResNet where timm's attention slot is after bn3, in that slot like SE.

An empty `se` slot (None / nn.Identity) takes the module under timm's own name (`se`, as in
timm's ecaresnet*, so weights interchange). Elsewhere (no slot, or SE already in it) the block is
replaced by a *view* (`vision_attn.inject.make_view`): an object of a subclass of the block's
class sharing its parameters and children, whose forward is timm's with the module (child
`eca` / `coord`) called in place. No hooks, so TorchScript and FX see the module. `remove()`
puts the original block object back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
from timm.models import _efficientnet_blocks as eb
from timm.models import convnext, regnet, resnet

from ..inject import get_submodule_parent, make_view

__all__ = ["SUPPORTED_BLOCKS", "Placement", "inject_channel_attention", "placements"]

SUPPORTED_BLOCKS = (
    "timm.models.resnet.BasicBlock/Bottleneck (ResNet, ResNet-D/T), "
    "timm.models._efficientnet_blocks.InvertedResidual/DepthwiseSeparableConv (MobileNetV2, MobileNetV3, "
    "EfficientNet; not MobileNetV4's UniversalInvertedResidual), timm.models.convnext.ConvNeXtBlock, "
    "timm.models.regnet.Bottleneck (RegNetX/Y)"
)


class Placement(NamedTuple):
    """mode "slot": the block's empty attention slot `where` takes the module; "view": the block's
    forward (a view) calls child `where` at the rule's place."""

    mode: str
    where: str
    channels: int


# --------------------------------------------------------------------------------------------- views
# Each forward below is timm's (1.0.x) with `self.eca` / `self.coord` called at the rule's place;
# a view always has both children (nn.Identity when absent: no parameters, no state_dict keys).


class ResNetBottleneckView(resnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        x = self.coord(x)
        x = self.eca(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


class ResNetBasicBlockView(resnet.BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        x = self.coord(x)
        x = self.eca(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)
        return x


class InvertedResidualView(eb.InvertedResidual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.conv_s2d(x)
            x = self.bn_s2d(x)
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.coord(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        x = self.eca(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class DepthwiseSeparableView(eb.DepthwiseSeparableConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.conv_s2d(x)
            x = self.bn_s2d(x)
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.coord(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        x = self.eca(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class ConvNeXtBlockView(convnext.ConvNeXtBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.coord(x)
        if self.use_conv_mlp:
            x = self.norm(x)
            x = self.mlp(x)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x)
            x = self.mlp(x)
            x = x.permute(0, 3, 1, 2)
        x = self.eca(x)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + self.shortcut(shortcut)
        return x


class RegNetBottleneckView(regnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.coord(x)
        x = self.conv3(x)
        x = self.eca(x)
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        x = self.act3(x)
        return x


#: exact timm block class -> its view class
_VIEWS: dict[type, type] = {
    resnet.Bottleneck: ResNetBottleneckView,
    resnet.BasicBlock: ResNetBasicBlockView,
    eb.InvertedResidual: InvertedResidualView,
    eb.DepthwiseSeparableConv: DepthwiseSeparableView,
    convnext.ConvNeXtBlock: ConvNeXtBlockView,
    regnet.Bottleneck: RegNetBottleneckView,
}
_BY_VIEW = {v: k for k, v in _VIEWS.items()}


def _empty(mod: Any) -> bool:
    return mod is None or isinstance(mod, nn.Identity)


def _base_class(block: nn.Module) -> type | None:
    cls = type(block)
    return _BY_VIEW.get(cls, cls if cls in _VIEWS else None)


def placements(block: nn.Module, kind: str) -> list[Placement] | None:
    """Where `kind` ("eca" | "coord") goes in one block: [] = nothing in this block (the paper skips
    it); None = not a block class this adapter knows (subclasses of timm's blocks are not assumed to
    share their forward)."""
    cls = _base_class(block)
    if cls is None:
        return None
    slot = "se" if _empty(getattr(block, "se", None)) else None
    if cls in (resnet.Bottleneck, resnet.BasicBlock):
        channels = block.bn3.num_features if cls is resnet.Bottleneck else block.bn2.num_features
        return [Placement("slot", "se", channels) if slot else Placement("view", kind, channels)]
    if cls is eb.InvertedResidual:
        if kind == "eca":
            return [Placement("view", "eca", block.bn3.num_features)]
        if block.conv_pw.out_channels == block.conv_pw.in_channels:
            return []  # expansion 1: the paper puts CA only in expanded blocks
        channels = block.bn2.num_features
        return [Placement("slot", "se", channels) if slot else Placement("view", "coord", channels)]
    if cls is eb.DepthwiseSeparableConv:
        return [Placement("view", "eca", block.bn2.num_features)] if kind == "eca" else []
    if cls is convnext.ConvNeXtBlock:
        return [Placement("view", kind, block.conv_dw.out_channels)]
    if cls is regnet.Bottleneck:
        if kind == "eca":
            return [Placement("view", "eca", block.conv3.conv.out_channels)]
        channels = block.conv2.conv.out_channels
        return [Placement("slot", "se", channels) if slot else Placement("view", "coord", channels)]
    return None


def _found_blocks(model: nn.Module) -> list[str]:
    names = sorted(
        {type(m).__name__ for m in model.modules() if "Block" in type(m).__name__ or "Residual" in type(m).__name__}
    )
    return names[:8]


def inject_channel_attention(model: nn.Module, handle, variant, *, kind: str) -> None:
    """Insert `variant.build(channels)` into every supported block of `model`."""
    blocks = [(name, m) for name, m in model.named_modules() if name and placements(m, kind) is not None]
    if not blocks:
        found = _found_blocks(model)
        raise ValueError(
            f"{type(variant).__name__}: {type(model).__name__} has no supported CNN blocks"
            + (f" (it has {', '.join(found)})" if found else "")
            + f"; supported blocks: {SUPPORTED_BLOCKS}"
        )
    for name, block in blocks:
        for mode, where, channels in placements(block, kind):
            module = variant.build(channels)
            if mode == "slot":
                handle.set_child(block, where, module)
                continue
            if not getattr(block, "_attnplug_view", False):
                view = make_view(block, _VIEWS[type(block)])
                view.eca = nn.Identity()
                view.coord = nn.Identity()
                parent, attr = get_submodule_parent(model, name)
                handle.replace(parent, attr, view)
                block = view
            if not isinstance(block._modules.get(where), nn.Identity):
                raise ValueError(f"{type(variant).__name__}: block {name} already has a {where!r} module")
            handle.replace(block, where, module)

"""Coordinate attention and ECA in timm CNNs: exact identity at injection, exact removal, a real
effect once trained, weight interchange with timm's modules, registered models, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import EcaModule
from timm.layers.coord_attn import CoordAttn

import vision_attn as va
from vision_attn.variants.coord import make_coord
from vision_attn.variants.eca import eca_kernel_size, make_eca

#: one tiny model per supported block type: BasicBlock, Bottleneck + ResNet-D stem/shortcut,
#: MobileNetV2 (DepthwiseSeparable + InvertedResidual), MobileNetV3 (IR with SE: CA by hook after
#: it), EfficientNet, ConvNeXt (channels-last MLP and conv MLP), RegNetY (SE slot taken).
FAMILIES = {
    "resnet18": {},
    "resnet26d": {},
    "mobilenetv2_050": {},
    "mobilenetv3_small_050": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "convnext_atto_conv_mlp": {"conv_mlp": True},
    "regnety_002": {},
}
X = torch.randn(2, 3, 64, 64)
X_SMALL = torch.randn(1, 3, 64, 64)  # the family sweep: batch 1 (64 px: ConvNeXt/EfficientNet keep a 2x2 last map)


def _create(name: str) -> torch.nn.Module:
    return timm.create_model(name.removesuffix("_conv_mlp"), num_classes=10, **FAMILIES[name])


def _pretrained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Randomise norm layers (timm zero-inits the last BN of residual blocks, which would feed the
    attention modules all-zero maps and make identity checks trivial)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    for m in model.modules():  # ConvNeXt layer scale
        if hasattr(m, "gamma") and isinstance(m.gamma, torch.nn.Parameter):
            m.gamma.data.fill_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {name: _pretrained_like(_create(name)) for name in FAMILIES}


@pytest.mark.parametrize("variant", [va.ECA(), va.CoordAttention()], ids=["eca", "coord"])
@pytest.mark.parametrize("name", FAMILIES)
def test_identity_at_injection_effect_once_trained_and_exact_removal(models, name, variant):
    model = models[name]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(X_SMALL)
    handle = va.inject(model, variant)
    try:
        named = list(handle.new_parameters().items())
        new_params = [p for _, p in named]
        assert new_params
        out = model(X_SMALL)
        assert torch.equal(out, ref)  # exact (2·sigmoid(0) = 1 and a zero last conv), not approximate
        # the gate is live at init: its last conv gets a gradient (earlier CA layers sit behind a zero conv)
        grads = torch.autograd.grad(out.square().sum(), new_params)
        last = [g for (n, _), g in zip(named, grads) if n.split(".")[-2] in ("conv", "conv_h", "conv_w")]
        assert last and all(g.abs().sum() > 0 for g in last)
        with torch.no_grad():  # "trained": perturbed attention parameters change the output ...
            for p in new_params:
                p.add_(0.3 * torch.randn_like(p))
        out = model(X_SMALL)
        assert (out - ref).abs().max() > 1e-4
        grads = torch.autograd.grad(out.square().sum(), new_params)  # ... and every one of them gets a gradient
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(X_SMALL), ref)
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def _trace(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """(input, output) of the named submodules in one forward (hooks live only inside this call)."""
    seen, hooks = {}, []
    for n in names:
        m = model.get_submodule(n)
        hooks.append(
            m.register_forward_hook(
                lambda _m, a, o, n=n: seen.__setitem__(n, (a[0].detach().clone(), o.detach().clone()))
            )
        )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _live(model, handle):
    """Perturb the injected parameters so every module changes its input (identity init hides placement)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in handle.new_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# (model, variant, block path, attention path, producer of its input, consumer of its output)
# consumer "add": the block output is act(attention output + shortcut) / attention output + shortcut
PLACEMENTS = [
    ("resnet18", "eca", "layer1.0", "layer1.0.se", "layer1.0.bn2", "add"),  # BasicBlock: se slot after bn2
    ("resnet26d", "eca", "layer2.0", "layer2.0.se", "layer2.0.bn3", "add"),  # Bottleneck: se slot after bn3
    ("resnet26d", "coord", "layer2.0", "layer2.0.se", "layer2.0.bn3", "add"),
    ("mobilenetv2_050", "eca", "blocks.2.1", "blocks.2.1.eca", "blocks.2.1.bn3", "add"),  # IR: after the projection BN
    ("mobilenetv2_050", "eca", "blocks.0.0", "blocks.0.0.eca", "blocks.0.0.bn2", None),  # DS conv: after bn2
    ("mobilenetv2_050", "coord", "blocks.2.1", "blocks.2.1.se", "blocks.2.1.bn2", "blocks.2.1.conv_pwl"),  # IR
    ("mobilenetv3_small_050", "coord", "blocks.2.0", "blocks.2.0.coord", "blocks.2.0.se", "blocks.2.0.conv_pwl"),
    ("convnext_atto", "eca", "stages.1.blocks.0", "stages.1.blocks.0.eca", "stages.1.blocks.0.mlp", "gamma"),
    ("convnext_atto", "coord", "stages.1.blocks.0", "stages.1.blocks.0.coord", "stages.1.blocks.0.conv_dw",
     "stages.1.blocks.0.norm"),
    ("regnetx_002", "eca", "s2.b1", "s2.b1.eca", "s2.b1.conv3", "add"),  # after conv3 (conv + BN)
    ("regnetx_002", "coord", "s2.b1", "s2.b1.se", "s2.b1.conv2", "s2.b1.conv3"),  # empty se slot after conv2
    ("regnety_002", "coord", "s2.b1", "s2.b1.coord", "s2.b1.se", "s2.b1.conv3"),  # SE taken: right after it
]  # fmt: skip


@pytest.mark.parametrize(
    "name,kind,block,attn,producer,consumer", PLACEMENTS, ids=[f"{p[0]}-{p[1]}" for p in PLACEMENTS]
)
def test_placement_rules(name, kind, block, attn, producer, consumer):
    """Each row of the adapter's table, by values: the module sees exactly its producer's output and
    what follows sees exactly the module's output (injected parameters perturbed, so a module in the
    wrong place, or skipped, changes the numbers)."""
    model = _pretrained_like(timm.create_model(name, num_classes=10))
    h = va.inject(model, va.ECA() if kind == "eca" else va.CoordAttention())
    _live(model, h)
    cls = EcaModule if kind == "eca" else CoordAttn
    assert isinstance(model.get_submodule(attn), cls)
    x = torch.randn(1, 3, 64, 64)
    names = [block, attn, producer] + ([consumer] if consumer not in (None, "add", "gamma") else [])
    t = _trace(model, x, names)
    a_in, a_out = t[attn]
    assert not torch.allclose(a_in, a_out)  # the module acts
    p_out = t[producer][1]
    if producer.endswith(".mlp") and p_out.shape[-1] != a_in.shape[-1]:
        p_out = p_out.permute(0, 3, 1, 2)  # ConvNeXt's channels-last MLP
    _same(a_in, p_out)
    b_in, b_out = t[block]
    blk = model.get_submodule(block)
    if consumer == "add":  # end of the residual branch: output = act(module output + shortcut)
        ds = getattr(blk, "downsample", None)
        short = b_in if ds is None else ds(b_in)
        if hasattr(blk, "act3"):
            act = blk.act3
        elif isinstance(blk, timm.models.resnet.BasicBlock):
            act = blk.act2
        else:
            act = torch.nn.Identity()  # InvertedResidual: no activation after the add
        with torch.no_grad():
            _same(b_out, act(a_out + short))
    elif consumer == "gamma":
        _same(b_out, a_out * blk.gamma.reshape(1, -1, 1, 1) + b_in)  # before layer scale and the add
    elif consumer is None:
        _same(b_out, a_out)  # no residual in this block
    else:
        _same(t[consumer][0], a_out)
    h.remove()


def test_placement_skips_and_counts():
    """Blocks the paper leaves out, and one module per supported block."""
    mb = timm.create_model("mobilenetv2_050")
    h = va.inject(mb, va.CoordAttention())
    assert not any(isinstance(m, CoordAttn) for m in mb.blocks[0].modules())  # DS conv (expansion 1): none
    ir = [b for b in mb.modules() if type(b).__name__ == "InvertedResidual"]
    assert len(h.new_modules) == len(ir) and all(isinstance(b.se, CoordAttn) for b in ir)
    h.remove()
    from timm.models._efficientnet_blocks import InvertedResidual

    e1 = torch.nn.Sequential(InvertedResidual(16, 16, exp_ratio=1.0))  # IR with expansion 1: none
    with pytest.raises(ValueError, match="found no place"):
        va.inject(e1, va.CoordAttention())
    assert isinstance(va.inject(e1, va.ECA()).new_modules[0], EcaModule)  # ECA: every block
    n_blocks = sum(type(b).__name__ in ("InvertedResidual", "DepthwiseSeparableConv") for b in mb.modules())
    h = va.inject(mb, va.ECA())
    assert len(h.new_modules) == n_blocks  # ECA in every block, DS conv included
    h.remove()
    rn = timm.create_model("resnet26d")
    va.inject(rn, va.ECA())
    assert "layer1.0.se.conv.weight" in rn.state_dict()  # timm's ecaresnet naming


def test_weights_interchange_with_timm_modules():
    """Our modules ARE timm's modules (subclasses, same parameter names): state dicts load both
    ways and give the same outputs with non-trivial (random) weights and BN statistics."""
    x = torch.randn(2, 64, 7, 5)
    for c in (16, 64, 256, 2048):
        assert eca_kernel_size(c) == EcaModule(channels=c).conv.kernel_size[0]
    ours, theirs = make_eca(64, mode="original"), EcaModule(channels=64)
    torch.nn.init.normal_(theirs.conv.weight)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.nn.init.normal_(ours.conv.weight)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    ours_ca = make_coord(64, mode="original").eval()
    theirs_ca = CoordAttn(64, rd_channels=8, bias=True).eval()
    _pretrained_like(theirs_ca)
    for p in theirs_ca.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    ours_ca.load_state_dict(theirs_ca.state_dict())
    torch.testing.assert_close(ours_ca(x), theirs_ca(x), rtol=0, atol=0)
    for p in ours_ca.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    theirs_ca.load_state_dict(ours_ca.state_dict())
    torch.testing.assert_close(ours_ca(x), theirs_ca(x), rtol=0, atol=0)
    assert not torch.allclose(ours_ca(x), x)
    make_coord(64).load_state_dict(theirs_ca.state_dict())  # identity-mode modules take timm weights too


def test_whole_model_weights_interchange_with_timm_ecaresnet():
    """resnet26t + ECA(mode="original") is timm's ecaresnet26t: same keys, same kernel sizes, same outputs."""
    theirs = _pretrained_like(timm.create_model("ecaresnet26t", num_classes=10))
    for m in theirs.modules():
        if isinstance(m, EcaModule):
            torch.nn.init.normal_(m.conv.weight)
    ours = timm.create_model("resnet26t", num_classes=10).eval()
    va.inject(ours, va.ECA(mode="original"))
    ours.load_state_dict(theirs.state_dict())  # strict: no missing / unexpected keys
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=0)


def test_paper_options():
    ca = make_coord(1024, mode="original")  # the paper's CA: mip = max(8, C / 32), conv bias, BN + h-swish, sigmoid
    assert ca.conv1.out_channels == 32 and ca.conv1.bias is not None and isinstance(ca.bn1, torch.nn.BatchNorm2d)
    assert isinstance(ca.act, torch.nn.Hardswish) and type(ca.gate).__name__ == "Sigmoid"
    assert make_coord(128).conv1.out_channels == 8 and make_coord(128, reduction=4).conv1.out_channels == 32
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]  # |log2 C / 2 + 1/2|_odd
    rn = timm.create_model("resnet18")
    va.inject(rn, va.ECA(kernel_size=7))
    assert {m.conv.kernel_size[0] for m in rn.modules() if isinstance(m, EcaModule)} == {7}


def test_registered_models_load_an_original_checkpoint(tmp_path):
    from vision_attn.models import registered_names

    assert {"coord_mobilenetv2_100", "eca_mobilenetv2_100", "eca_efficientnet_b0", "eca_convnext_tiny"} <= set(
        registered_names()
    )
    assert not set(registered_names()) & set(timm.list_models(module="resnet") + timm.list_models(module="byobnet"))
    base = _pretrained_like(timm.create_model("mobilenetv2_100", num_classes=10))
    path = tmp_path / "mobilenetv2_100.pth"
    torch.save(base.state_dict(), path)
    for name in ("coord_mobilenetv2_100", "eca_mobilenetv2_100"):
        model = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
        with torch.no_grad():
            assert torch.equal(model.eval()(X), base(X))  # converted on load: original outputs exactly
        assert model.pretrained_cfg["file"] == str(path)
    with torch.no_grad():  # a checkpoint of the attnplug model itself (trained attention) loads as well
        for m in model.modules():
            if isinstance(m, EcaModule):
                m.conv.weight.normal_()
        own = tmp_path / "eca_mobilenetv2_100.pth"
        torch.save(model.state_dict(), own)
        again = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(own)))
        assert torch.equal(again.eval()(X), model(X)) and not torch.equal(model(X), base(X))
    with pytest.raises(RuntimeError, match="no published weights"):
        timm.create_model("eca_mobilenetv2_100", pretrained=True)
    with pytest.raises(RuntimeError, match="does not fit"):  # another architecture's checkpoint
        timm.create_model("eca_efficientnet_b0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: va.ECA(kernel_size=4), r"ECA.kernel_size must be an odd int >= 1 or None"),
        (lambda: va.ECA(kernel_size=0), r"ECA.kernel_size must be an odd int >= 1"),
        (lambda: va.ECA(kernel_size=3.0), r"ECA.kernel_size must be an odd int >= 1"),
        (lambda: va.ECA(kernel_size=True), r"ECA.kernel_size must be an odd int >= 1"),
        (lambda: va.CoordAttention(reduction=0), r"CoordAttention.reduction must be an int >= 1"),
        (lambda: va.CoordAttention(reduction=2.5), r"CoordAttention.reduction must be an int >= 1"),
        (lambda: va.ECA(mode="fast"), "ECA.mode must be one of"),
        (lambda: va.CoordAttention(mode="sigmoid"), "CoordAttention.mode must be one of"),
    ],
)
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_unsupported_model_lists_the_supported_families():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32)
    sd = model.state_dict()
    for variant in (va.ECA(), va.CoordAttention()):
        with pytest.raises(
            ValueError, match=r"has no supported CNN blocks \(it has Block\); supported blocks: .*ConvNeXt"
        ):
            va.inject(variant=variant, model=model)
    assert model.state_dict().keys() == sd.keys() and not hasattr(model, "_attnplug_handles")


def test_registered_names_never_shadow_timm_names():
    """Every attnplug name belongs to an attnplug module in timm's registry, and claiming a name timm
    already has (eca_nfnet_l0, eca_resnet33ts, ...) is refused."""
    from timm.models._registry import _model_to_module

    from vision_attn.models import registered_names
    from vision_attn.models._builder import claim_names

    ours = registered_names()
    assert ours and all(_model_to_module[n] in ("agent_deit", "coord_eca") for n in ours)
    timm_own = {n for n in timm.list_models() if _model_to_module.get(n) not in ("agent_deit", "coord_eca")}
    assert "eca_nfnet_l0" in timm_own and not set(ours) & timm_own
    for taken in ("eca_nfnet_l0", "eca_resnet33ts", "resnet50"):
        with pytest.raises(RuntimeError, match=f"timm already has a model named '{taken}'"):
            claim_names([taken], "vision_attn.models.coord_eca")
    claim_names(ours[:1], "vision_attn.models." + _model_to_module[ours[0]])  # re-import of our own: fine

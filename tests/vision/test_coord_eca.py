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

FAMILIES = ["resnet18", "resnet26", "mobilenetv2_050", "mobilenetv3_small_050", "efficientnet_b0", "convnext_atto",
            "regnetx_002"]  # fmt: skip
X = torch.randn(2, 3, 64, 64)


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
    return {name: _pretrained_like(timm.create_model(name, num_classes=10)) for name in FAMILIES}


@pytest.mark.parametrize("variant", [va.ECA(), va.CoordAttention()], ids=["eca", "coord"])
@pytest.mark.parametrize("name", FAMILIES)
def test_identity_at_injection_and_exact_removal(models, name, variant):
    model = models[name]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(X)
        handle = va.inject(model, variant)
        out = model(X)
    assert len(handle.new_modules) > 0
    assert torch.equal(out, ref)  # exact, not approximate
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(X), ref)
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", [va.ECA(), va.CoordAttention()], ids=["eca", "coord"])
def test_trained_parameters_change_the_output_and_get_gradients(variant):
    model = _pretrained_like(timm.create_model("resnet18", num_classes=10))
    with torch.no_grad():
        ref = model(X)
    handle = va.inject(model, variant)
    new_params = [p for m in handle.new_modules for p in m.parameters()]
    model(X).sum().backward()
    assert all(p.grad is not None for p in new_params)
    assert any(p.grad.abs().sum() > 0 for p in new_params)  # the gate is not dead at init
    with torch.no_grad():
        for p in new_params:
            p.add_(0.5 * torch.randn_like(p))
        assert (model(X) - ref).abs().max() > 1e-3


def test_placement_rules():
    mb = timm.create_model("mobilenetv2_050")
    h = va.inject(mb, va.CoordAttention())
    expanded = [b for b in mb.modules() if type(b).__name__ == "InvertedResidual"]
    assert all(isinstance(b.se, CoordAttn) for b in expanded)  # after the depthwise conv, before projection
    assert not any(isinstance(m, CoordAttn) for m in mb.blocks[0].modules())  # expansion-1 first block skipped
    h.remove()
    rn = timm.create_model("resnet26")
    va.inject(rn, va.ECA())
    assert "layer1.0.se.conv.weight" in rn.state_dict()  # timm ecaresnet naming: after bn3, before the add


def test_weights_interchange_with_timm_modules():
    x = torch.randn(2, 64, 7, 5)
    ours = make_eca(64, mode="original")
    theirs = EcaModule(channels=64)
    theirs.load_state_dict(ours.state_dict())
    assert eca_kernel_size(64) == theirs.conv.kernel_size[0]
    torch.testing.assert_close(ours(x), theirs(x))
    ours_ca = make_coord(64, mode="original").eval()
    theirs_ca = CoordAttn(64, rd_channels=8, bias=True).eval()
    theirs_ca.load_state_dict(ours_ca.state_dict())
    torch.testing.assert_close(ours_ca(x), theirs_ca(x))


def test_registered_models_load_an_original_checkpoint(tmp_path):
    from vision_attn.models import registered_names

    assert {"coord_mobilenetv2_100", "eca_mobilenetv2_100", "eca_efficientnet_b0", "eca_convnext_tiny"} <= set(
        registered_names()
    )
    base = timm.create_model("mobilenetv2_100", num_classes=10).eval()
    path = tmp_path / "mobilenetv2_100.pth"
    torch.save(base.state_dict(), path)
    for name in ("coord_mobilenetv2_100", "eca_mobilenetv2_100"):
        model = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
        with torch.no_grad():
            assert torch.equal(model.eval()(X), base(X))
        assert model.pretrained_cfg["file"] == str(path)
    with pytest.raises(RuntimeError, match="no published weights"):
        timm.create_model("eca_mobilenetv2_100", pretrained=True)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"ECA.kernel_size must be an odd int >= 1"):
        va.ECA(kernel_size=4)
    with pytest.raises(ValueError, match=r"CoordAttention.reduction must be an int >= 1"):
        va.CoordAttention(reduction=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        va.ECA(mode="fast")
    with pytest.raises(ValueError, match="no supported CNN blocks; supported families: ResNet"):
        va.inject(timm.create_model("vit_tiny_patch16_224", img_size=32), va.ECA())

"""timm's own per-model checks (after timm's tests/test_models.py) over every model name attnplug
registers: forward, grad checkpointing, backward reaching every parameter, default cfg fields,
reset_classifier, features_only, forward_intermediates, torch.compile."""

from __future__ import annotations

import pytest
import timm
import torch

from vision_attn.models import registered_names

NAMES = registered_names()
EXPECTED = {"coord_mobilenetv2_100", "eca_mobilenetv2_100", "eca_efficientnet_b0", "eca_convnext_tiny",
            "agent_deit_tiny_patch16_224", "agent_deit_small_patch16_224", "agent_deit_base_patch16_224"}  # fmt: skip


def _kwargs(name: str) -> dict:
    return {"img_size": 48, "num_agents": 4} if name.startswith("agent_") else {}


def _input(model) -> torch.Tensor:
    size = 48 if getattr(model, "patch_embed", None) is not None else 64
    return torch.randn(2, 3, size, size)


def test_registry_is_not_empty():
    assert EXPECTED <= set(NAMES), f"registered: {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_cfg(name):
    model = timm.create_model(name, num_classes=7, **_kwargs(name))
    x = _input(model)
    model.train()
    out = model(x)
    assert out.shape == (2, 7) and not torch.isnan(out).any()
    out.mean().backward()
    params = dict(model.named_parameters())
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    cfg = model.pretrained_cfg
    for key in ("num_classes", "input_size", "mean", "std", "first_conv", "classifier", "pool_size", "crop_pct"):
        assert key in cfg, f"default cfg lacks {key}"
    assert model.num_classes == 7 and model.num_features > 0
    assert timm.models.get_pretrained_cfg(name) is not None


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_and_reset_classifier(name):
    model = timm.create_model(name, num_classes=7, **_kwargs(name)).eval()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
        model.set_grad_checkpointing(False)
        model.reset_classifier(0)
        feats = model(x)
    assert feats.shape == (2, model.num_features)
    if hasattr(model, "forward_intermediates"):
        final, inter = model.forward_intermediates(x)
        with torch.no_grad():
            torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) >= 3


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("agent_")])
def test_features_only(name):
    model = timm.create_model(name, features_only=True, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert len(outs) == 3
    assert [o.shape[1] for o in outs] == model.feature_info.channels()
    assert [64 // o.shape[-1] for o in outs] == model.feature_info.reduction()


@pytest.mark.parametrize(
    "name", sorted({min(n for n in NAMES if n.split("_")[0] == p) for p in {n.split("_")[0] for n in NAMES}})
)
def test_torch_compile(name):
    model = timm.create_model(name, num_classes=7, **_kwargs(name)).eval()
    x = _input(model)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))

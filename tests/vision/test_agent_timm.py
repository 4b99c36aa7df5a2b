"""timm's conventions on every model family agent injection supports (issue 20): ViT, DeiT with a
distillation token, ViT with register tokens, EVA-02 (rope, gated MLP), Swin. timm's own per-model checks
(forward, backward, intermediates / features_only, FX, TorchScript, torch.compile) plus the conventions
users stack on top: `channels_last` (timm train.py --channels-last) and `set_input_size`.

Tiny sizes (2 blocks, 48-56 px) keep each check to a second or two; torch.compile is slow-marked."""

from __future__ import annotations

import pytest
import timm
import torch

import vision_attn as va

from .test_timm_conventions import _create_fx_model, _live

#: family -> (timm name, create kwargs, image size, a second image size for set_input_size)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=48, depth=2), 48, 64),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=48, depth=2), 48, 64),
    "vit_reg": ("vit_tiny_patch16_224", dict(img_size=48, depth=2, reg_tokens=4, no_embed_class=True), 48, 64),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=42, depth=2), 42, 56),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2), window_size=7,
                  drop_path_rate=0.0), 56, None),  # timm's swin_tiny default 0.2: stochastic in train mode
}  # fmt: skip


def _model(family: str, **kwargs) -> torch.nn.Module:
    name, kw, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw, **kwargs)
    va.inject(model, va.Agent(num_agents=4))
    return _live(model)


def _x(family: str, size: int | None = None, batch: int = 2) -> torch.Tensor:
    s = size or FAMILIES[family][2]
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))


def _agents(model) -> list:
    return [m for m in model.modules() if isinstance(m, va.variants.agent.AgentAttention)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_backward_and_channels_last(family):
    """timm test_model_forward / backward, and `model.to(memory_format=torch.channels_last)` (4-D biases):
    same output, every new parameter gets a gradient."""
    model = _model(family).train()
    assert _agents(model)
    x = _x(family)
    with torch.no_grad():
        ref = model.eval()(x)
    model.to(memory_format=torch.channels_last)
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )  # fmt: skip  (the conversion did happen)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)
    model.train()
    model(x).mean().backward()
    new = model._attnplug_handles[0].new_parameters()
    missing = [n for n, p in new.items() if p.grad is None]
    assert new and not missing, missing


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "vit_reg", "eva02"])
def test_set_input_size_resizes_the_agent_biases(family):
    """timm's `set_input_size` (position embeddings resized): the agent modules follow the new patch grid,
    their row / column biases resized; remove() puts timm's method back."""
    _, _, size, new_size = FAMILIES[family]
    model = _model(family).eval()
    grid = _agents(model)[0].grid
    model.set_input_size(img_size=new_size)
    a = _agents(model)[0]
    assert a.grid == tuple(model.patch_embed.grid_size) != grid
    assert a.ah_bias.shape[2] == a.grid[0] and a.wa_bias.shape[2] == a.grid[1]
    out = model(_x(family, new_size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"set_input_size\(\(12, 12\)\).*num_agents=4.*nothing was changed"):
        model.set_input_size(img_size=(12, 12))  # a 1x1 (or 0) patch grid cannot hold 4 agents
    assert _agents(model)[0].grid == a.grid
    model._attnplug_handles[0].remove()
    assert "set_input_size" not in model.__dict__


def test_paper_shaped_5d_biases_still_load():
    """Checkpoints with the paper's (1, h, n, gh, 1)-style row / column biases load into the 4-D parameters."""
    model = _model("vit").eval()
    sd = model.state_dict()
    key = next(k for k in sd if k.endswith("ah_bias"))
    old = {k: (v[None] if k.rsplit(".", 1)[-1] in ("ah_bias", "aw_bias", "ha_bias", "wa_bias") else v)
           for k, v in sd.items()}  # fmt: skip
    assert old[key].dim() == 5
    fresh = _model("vit").eval()
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.state_dict()[key], sd[key], rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_intermediates_and_features_only(family):
    """timm test_model_forward_intermediates: the final intermediate equals forward_features' output."""
    model = _model(family).eval()
    x = _x(family)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-5)
    assert len(inter) >= 2 and all(t.shape[0] == 2 and torch.isfinite(t).all() for t in inter)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fx_and_torchscript(family):
    """timm test_model_forward_fx and test_model_forward_torchscript: the traced / scripted model gives the
    module's output (EVA-02's Optional rope included)."""
    model = _model(family).eval()
    x = _x(family, batch=1)
    with torch.inference_mode():
        ref = model(x)
        fx = torch.cat(tuple(_create_fx_model(model)(x).values()))
    torch.testing.assert_close(fx, ref, rtol=1e-5, atol=1e-6)
    with timm.set_scriptable(True):
        scripted_model = _model(family).eval()
    with torch.no_grad():
        scripted = torch.jit.script(scripted_model)
        torch.testing.assert_close(scripted(x), scripted_model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_compile(family):
    """timm's torch.compile check (backend aot_eager): forward and backward equal eager."""
    torch._dynamo.reset()
    model = _model(family).train()
    x = _x(family)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    out.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = model(x)
    ref.mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()


def test_dynamic_img_size_is_refused_before_patching_naming_set_input_size():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=2, dynamic_img_size=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"dynamic_img_size=True are not supported.*set_input_size"):
        va.inject(model, va.Agent(num_agents=4))
    assert not getattr(model, "_attnplug_handles", []) and model.state_dict().keys() == before.keys()
    assert type(model.blocks[0].attn).__name__ == "Attention"


def test_channels_last_biases_through_the_fused_kernel():
    """The fused Triton agent kernel (interpreter on CPU) reads channels_last bias parameters correctly."""
    model = _model("vit").eval()
    x = _x("vit")
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        for agent in _agents(model):
            agent.backend = "triton"
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)

"""Agent attention: the module equals the paper's formula, injection round trip is exact, the
new parameters act and train, registered Agent-DeiT loads original DeiT weights, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vision_attn as va
from vision_attn.variants.agent import AgentAttention, agent_grid


def _vit(**kw):
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 5, **kw}
    return timm.models.VisionTransformer(**kw).eval()


def _formula(m: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """Straight from the paper: O = softmax(Q Aᵀ s + B2) softmax(A Kᵀ s + B1) V + DWC(V), then proj."""
    B, N, C = x.shape
    h, d, p, (gh, gw) = m.num_heads, m.head_dim, m.num_prefix_tokens, m.grid
    qkv = m.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = m.q_norm(qkv[0]), m.k_norm(qkv[1]), qkv[2]
    patches = q[:, :, p:].reshape(B, h, gh, gw, d)
    a_h, a_w = m.agent_hw
    agents = torch.stack(  # adaptive average pooling written out for divisible grids
        [patches[:, :, i * gh // a_h : (i + 1) * gh // a_h, j * gw // a_w : (j + 1) * gw // a_w].mean((2, 3))
         for i in range(a_h) for j in range(a_w)], dim=2)  # fmt: skip
    s = d**-0.5
    b1, b2 = m._biases()
    o = torch.softmax(q @ agents.transpose(-1, -2) * s + b2, -1) @ (
        torch.softmax(agents @ k.transpose(-1, -2) * s + b1, -1) @ v
    )
    o = o.transpose(1, 2).reshape(B, N, C)
    dwc = F.conv2d(v[:, :, p:].transpose(1, 2).reshape(B, gh, gw, C).permute(0, 3, 1, 2), m.dwc.weight, m.dwc.bias,
                   padding=m.dwc.padding, groups=C)  # fmt: skip
    o[:, p:] = o[:, p:] + dwc.flatten(2).transpose(1, 2)
    return m.proj(o)


@pytest.mark.parametrize("class_token, reg_tokens", [(True, 0), (True, 2), (False, 0)])
def test_module_matches_the_formula(class_token, reg_tokens):
    model = _vit(class_token=class_token, reg_tokens=reg_tokens, global_pool="token" if class_token else "avg")
    va.inject(model, va.Agent(num_agents=4))
    m = model.blocks[0].attn
    with torch.no_grad():
        for prm in (m.an_bias, m.na_bias, m.ah_bias, m.wa_bias, m.dwc.weight):
            prm.normal_(0, 0.5)  # non-zero biases and DWC so every term is checked
        x = torch.randn(2, model.num_prefix_tokens + 16, 64)
        torch.testing.assert_close(m(x), _formula(m, x), atol=1e-5, rtol=1e-5)


def test_inject_remove_exact_and_agreement_with_original():
    model = _vit()
    x = torch.randn(8, 3, 32, 32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        h = va.inject(model, va.Agent(num_agents=4))
        out = model(x)
    assert isinstance(model.blocks[1].attn, AgentAttention) and model.blocks[1].attn.qkv is h.replacements[1].old.qkv
    agreement = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert 0.0 <= agreement <= 1.0 and not torch.equal(out, ref)  # an approximation, not the same function
    h.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_dwc_starts_at_zero_then_acts_and_everything_trains():
    model = _vit()
    h = va.inject(model, va.Agent(num_agents=4))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].attn.dwc.weight.normal_()
        assert (model(x) - before).abs().max() > 1e-4
    model.train()
    model(x).sum().backward()
    new = [p for m in h.new_modules for n, p in m.named_parameters() if "bias" in n or "dwc" in n]
    assert new and all(p.grad is not None for p in new)


def test_rectangular_grid_and_agent_grid_rules():
    assert agent_grid(49, (14, 14)) == (7, 7)
    assert agent_grid(8, (4, 8)) == (2, 4)
    model = _vit(img_size=(32, 64))
    va.inject(model, va.Agent(num_agents=8))
    assert model(torch.randn(1, 3, 32, 64)).shape == (1, 5)


def test_errors():
    with pytest.raises(ValueError, match=r"num_agents=49 is larger than the 4x4=16 patch tokens"):
        va.inject(_vit(), va.Agent(num_agents=49))
    with pytest.raises(ValueError, match="perfect square"):
        va.inject(_vit(), va.Agent(num_agents=6))
    with pytest.raises(ValueError, match="not supported; supported: timm VisionTransformer"):
        va.inject(timm.create_model("resnet18"), va.Agent())
    with pytest.raises(ValueError, match="dynamic_img_size"):
        va.inject(_vit(dynamic_img_size=True), va.Agent(num_agents=4))
    with pytest.raises(ValueError, match="num_agents must be an int >= 1"):
        va.Agent(num_agents=0)
    model = _vit()
    with pytest.raises(ValueError, match=r"Agent.blocks has index 5; allowed range \[0, 2\)"):
        va.inject(model, va.Agent(num_agents=4, blocks=(0, 5)))
    assert type(model.blocks[0].attn).__name__ == "Attention"  # nothing half-patched


def test_agent_deit_loads_an_original_deit_checkpoint(tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=5).eval()
    path = tmp_path / "deit_tiny.pth"
    torch.save(deit.state_dict(), path)
    model = timm.create_model(
        "agent_deit_tiny_patch16_224", pretrained=True, img_size=64, num_classes=5, num_agents=4,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()  # fmt: skip
    assert torch.equal(model.blocks[0].attn.qkv.weight, deit.blocks[0].attn.qkv.weight)
    assert torch.equal(model.head.weight, deit.head.weight)
    base = timm.create_model("agent_deit_base_patch16_224", img_size=96, num_classes=5, num_agents=9)
    assert [type(b.attn).__name__ for b in base.blocks[3:5]] == ["AgentAttention", "Attention"]  # first 4 only


def test_agent_bench_smoke(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import agent_bench

    agent_bench.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "agent_bench_smoke.json").read_text())["results"]
    assert [r["img_size"] for r in rows] == [32, 64] and all(r["agent_img_s"] > 0 for r in rows)


def test_swin_stages_get_one_global_window_and_restore_exactly():
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=112, num_classes=5, embed_dim=32, depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
    h = va.inject(model, va.Agent(num_agents=9))
    blk = model.layers[1].blocks[1]  # a shifted-window block becomes one global window, no shift
    assert isinstance(blk.attn, AgentAttention) and blk.window_size == (14, 14) and blk.shift_size == (0, 0)
    assert type(model.layers[2].blocks[0].attn).__name__ == "WindowAttention"  # later stages keep windows
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5) and not torch.isnan(out).any()
    h.remove()
    assert model.layers[1].blocks[1].shift_size == (3, 3) and model.layers[1].blocks[1].attn_mask is not None
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match=r"Agent.stages has index 7"):
        va.inject(model, va.Agent(num_agents=9, stages=(7,)))


def test_eva_with_rope_and_register_tokens():
    from vision_attn.variants.agent import EvaAgentAttention

    model = timm.create_model("eva02_tiny_patch14_224", img_size=56, num_classes=5).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model(x)
    h = va.inject(model, va.Agent(num_agents=4))
    m = model.blocks[0].attn
    assert isinstance(m, EvaAgentAttention) and m.q_bias is h.replacements[0].old.q_bias  # EVA's own params reused
    with torch.no_grad():
        base = model(x)
        m.dwc.weight.normal_()
        assert (model(x) - base).abs().max() > 1e-5  # the agent module is live
    model.train()
    model(x).sum().backward()
    assert m.an_bias.grad is not None and m.q_bias.grad is not None
    h.remove()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref)

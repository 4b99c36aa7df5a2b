"""Agent attention: the new parameters act and train, registered Agent-DeiT loads original DeiT
weights, clear errors, the benchmark script runs (values against an independent oracle, EVA, Swin
and calibration: test_agent.py)."""

from __future__ import annotations

import pytest
import timm
import torch

import vision_attn as va
from vision_attn.variants.agent import agent_grid


def _vit(**kw):
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 5, **kw}
    return timm.models.VisionTransformer(**kw).eval()


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
    with pytest.raises(ValueError, match="ResNet is not supported; supported: timm VisionTransformer"):
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
    rows = json.loads((tmp_path / "agent_bench_smoke.json").read_text())["sweep"]
    assert [r["tokens"] for r in rows] == [17, 65] and all(r["agent4_ms"] > 0 and r["softmax_ms"] > 0 for r in rows)
    report = json.loads((tmp_path / "agent_bench_smoke.json").read_text())
    assert set(report["crossover_tokens"]) == {"agent4"}
    assert agent_bench.crossover([{"tokens": 10, "a": 0.5}, {"tokens": 40, "a": 2.0}], "a") == pytest.approx(20.0)
    assert agent_bench.crossover([{"tokens": 10, "a": 0.5}, {"tokens": 40, "a": 0.9}], "a") is None

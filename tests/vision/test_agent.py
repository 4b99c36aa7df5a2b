"""Agent attention, checked against a reference written independently from the paper's equation.

The reference below uses only the module's raw parameters (qkv / q_norm / k_norm / proj weights,
the bias tensors, the DWC weights): adaptive average pooling, the bias assembly (block bias
interpolated + row + column, prefix-token biases), both softmaxes and the depthwise conv are
written out index by index, never through the module's own helpers. Complements
test_agent_attention.py (round trip, Swin, EVA, bench smoke).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vision_attn as va
from vision_attn.variants.agent import AgentAttention, agent_grid


def _vit(**kw):
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 5, **kw}
    return timm.models.VisionTransformer(**kw).eval()


def _softmax(s: torch.Tensor) -> torch.Tensor:
    e = (s - s.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def _adaptive_bounds(i: int, size: int, out: int) -> tuple[int, int]:
    # PyTorch / paper AdaptiveAvgPool2d windows: [floor(i*size/out), ceil((i+1)*size/out))
    return (i * size) // out, -(-((i + 1) * size) // out)


def _reference(m: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """ViT / Swin: timm's fused qkv, then the agent core, then proj."""
    B, N, C = x.shape
    h, d = m.num_heads, m.head_dim
    qkv = (x @ m.qkv.weight.T + m.qkv.bias).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = m.q_norm(qkv[0]), m.k_norm(qkv[1]), qkv[2]  # [B, h, N, d]
    o = _core(m, q, k, v)
    return o @ m.proj.weight.T + m.proj.bias


def _core(m: AgentAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q Aᵀ s + B2) softmax(A Kᵀ s + B1) V + DWC(V) on [B, h, N, d], merged to [B, N, h*d]."""
    B, h, N, d = q.shape
    C = h * d
    p, (gh, gw) = m.num_prefix_tokens, m.grid
    a_h, a_w = m.agent_hw
    n = a_h * a_w
    s = d**-0.5

    def patch(y, xx):  # token index of patch (y, xx): prefix tokens come first, then row-major
        return p + y * gw + xx

    # agents: adaptive average pool of the patch queries (prefix tokens excluded)
    agents = torch.zeros(B, h, n, d)
    for i in range(a_h):
        y0, y1 = _adaptive_bounds(i, gh, a_h)
        for j in range(a_w):
            x0, x1 = _adaptive_bounds(j, gw, a_w)
            idx = [patch(y, xx) for y in range(y0, y1) for xx in range(x0, x1)]
            agents[:, :, i * a_w + j] = q[:, :, idx].mean(2)

    # position biases: block bias (h, n, 7, 7) bilinearly resized to the grid, plus row and column biases
    an = F.interpolate(m.an_bias, size=(gh, gw), mode="bilinear", align_corners=False)  # [h, n, gh, gw]
    na = F.interpolate(m.na_bias, size=(gh, gw), mode="bilinear", align_corners=False)
    b1 = torch.zeros(h, n, N)  # agents -> tokens
    b2 = torch.zeros(h, N, n)  # tokens -> agents
    for y in range(gh):
        for xx in range(gw):
            t = patch(y, xx)
            b1[:, :, t] = an[:, :, y, xx] + m.ah_bias[:, :, y, 0] + m.aw_bias[:, :, 0, xx]
            b2[:, t, :] = na[:, :, y, xx] + m.ha_bias[:, y, 0, :] + m.wa_bias[:, 0, xx, :]
    for t in range(p):
        b1[:, :, t] = m.ac_bias[0, :, :, t]
        b2[:, t, :] = m.ca_bias[0, :, t, :]

    agent_v = _softmax(agents @ k.transpose(-1, -2) * s + b1) @ v  # [B, h, n, d]
    o = _softmax(q @ agents.transpose(-1, -2) * s + b2) @ agent_v  # [B, h, N, d]
    o = o.transpose(1, 2).reshape(B, N, C).clone()

    # DWC: depthwise conv on V as a (B, C, gh, gw) map, zero padding; prefix tokens get none
    vmap = torch.zeros(B, C, gh, gw)
    for y in range(gh):
        for xx in range(gw):
            vmap[:, :, y, xx] = v[:, :, patch(y, xx)].reshape(B, C)  # channel = head * d + j
    kk = m.dwc.kernel_size[0]
    r = kk // 2
    for y in range(gh):
        for xx in range(gw):
            acc = m.dwc.bias.expand(B, C).clone()
            for dy in range(kk):
                for dx in range(kk):
                    yy, xs = y + dy - r, xx + dx - r
                    if 0 <= yy < gh and 0 <= xs < gw:
                        acc = acc + m.dwc.weight[:, 0, dy, dx] * vmap[:, :, yy, xs]
            o[:, patch(y, xx)] += acc
    return o


def _perturb(m: AgentAttention) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.endswith("_bias") or name.startswith("dwc."):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)


@pytest.mark.parametrize(
    "img, agents, reg",
    [(32, 4, 0), (40, 4, 1), ((32, 64), 8, 0), (48, 9, 0)],
    ids=["4x4-grid-2x2", "5x5-grid-overlapping-pool+reg", "4x8-rect-2x4", "6x6-grid-3x3"],
)
def test_module_equals_independent_reference(img, agents, reg):
    torch.manual_seed(0)
    model = _vit(img_size=img, reg_tokens=reg)
    va.inject(model, va.Agent(num_agents=agents))
    for blk in model.blocks:
        m = blk.attn
        assert isinstance(m, AgentAttention) and m.num_agents == agents
        _perturb(m)
        x = torch.randn(2, model.num_prefix_tokens + m.grid[0] * m.grid[1], 64)
        with torch.no_grad():
            torch.testing.assert_close(m(x), _reference(m, x), atol=2e-5, rtol=1e-5)


def test_dwc_term_is_exactly_zero_at_init_then_acts():
    torch.manual_seed(0)
    model = _vit()
    va.inject(model, va.Agent(num_agents=4))
    m = model.blocks[0].attn
    assert torch.count_nonzero(m.dwc.weight) == 0 and torch.count_nonzero(m.dwc.bias) == 0
    assert all(torch.count_nonzero(prm) == 0 for n_, prm in m.named_parameters() if n_.endswith("_bias"))
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        q, k, v = m._project(x)
        vp = v[:, :, 1:].transpose(1, 2).reshape(2, 4, 4, 64).permute(0, 3, 1, 2)
        assert torch.count_nonzero(m.dwc(vp)) == 0  # exact no-op at init
        before = m(x)
        torch.testing.assert_close(before, _reference(m, x), atol=2e-5, rtol=1e-5)
        m.dwc.weight.normal_()
        after = m(x)
    assert (after - before)[:, 1:].abs().max() > 1e-3  # patch tokens change
    assert torch.equal(after[:, 0], before[:, 0])  # cls token gets no DWC (and proj is per-token)


def test_round_trip_bit_exact():
    torch.manual_seed(0)
    model = _vit(num_classes=10)
    x = torch.randn(64, 3, 32, 32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        h = va.inject(model, va.Agent(num_agents=4))
        out = model(x)
    assert not torch.isnan(out).any() and (out - ref).abs().max() > 1e-3  # an approximation: not the same function
    h.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_backward_reaches_every_agent_parameter():
    torch.manual_seed(0)
    model = _vit(reg_tokens=1).train()
    # block 0: in the last block only the cls token reaches the head, so patch-side params get no gradient
    h = va.inject(model, va.Agent(num_agents=4, blocks=(0,)))
    assert type(model.blocks[1].attn).__name__ == "Attention"
    new = dict(h.new_modules[0].named_parameters())
    assert set(h.new_parameters()) == {f"blocks.0.attn.{n}" for n in new if not n.startswith(("qkv", "proj"))}
    assert {"an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias",
            "dwc.weight", "dwc.bias", "qkv.weight", "proj.weight"} <= set(new)  # fmt: skip
    _perturb(h.new_modules[0])  # at zero init some bias grads are legitimately tiny; perturb for a clean check
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for name, prm in new.items():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_agent_dataclass_validation():
    for bad, msg in [
        (dict(num_agents=0), r"Agent.num_agents must be an int >= 1"),
        (dict(num_agents=2.5), r"Agent.num_agents must be an int >= 1"),
        (dict(dwc_kernel=4), r"Agent.dwc_kernel must be an odd int >= 1"),
        (dict(blocks=(-1,)), r"Agent.blocks .*>= 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            va.Agent(**bad)
    assert va.Agent().name == "agent" and va.Agent().num_agents == 49


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"num_agents=25 is larger than the 4x4=16 patch tokens"):
        va.inject(_vit(), va.Agent(num_agents=25))
    with pytest.raises(ValueError, match="perfect square"):
        va.inject(_vit(), va.Agent(num_agents=8))
    with pytest.raises(ValueError, match=r"num_agents=11 has no factorisation"):
        agent_grid(11, (2, 8))
    with pytest.raises(ValueError, match=r"ResNet is not supported; supported: timm VisionTransformer"):
        va.inject(timm.create_model("resnet18", num_classes=5), va.Agent())
    with pytest.raises(ValueError, match="dynamic_img_size"):
        va.inject(_vit(dynamic_img_size=True), va.Agent(num_agents=4))
    model = _vit()
    va.inject(model, va.Agent(num_agents=4))
    with pytest.raises(ValueError, match="built for a 4x4 patch grid"):
        model.blocks[0].attn(torch.randn(1, 26, 64))


@pytest.mark.parametrize("name", ["agent_deit_tiny_patch16_224", "agent_deit_small_patch16_224"])
def test_registered_name_loads_original_deit_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    kw = dict(img_size=32, num_classes=5, depth=2)  # depth override keeps the check fast on 2 CPU cores
    deit = timm.create_model(name.removeprefix("agent_"), **kw).eval()
    path = tmp_path / "deit.pth"
    torch.save(deit.state_dict(), path)
    model = timm.create_model(name, pretrained=True, num_agents=4, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    model.eval()
    assert model.pretrained_cfg["file"] == str(path) and model.pretrained_cfg["first_conv"] == "patch_embed.proj"
    assert all(isinstance(b.attn, AgentAttention) for b in model.blocks)
    # the same weights converted with inject give the very same function
    va.inject(deit, va.Agent(num_agents=4))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), deit(x))
        feats = model.forward_features(x)
        assert feats.shape == (2, 5, model.embed_dim)
    model.train()
    model(x).sum().backward()
    assert model.blocks[0].attn.an_bias.grad is not None


def test_registered_name_round_trips_its_own_checkpoint(tmp_path):
    torch.manual_seed(0)
    kw = dict(img_size=32, num_classes=5, num_agents=4, depth=2)
    src = timm.create_model("agent_deit_tiny_patch16_224", **kw).eval()
    _perturb(src.blocks[0].attn)
    path = tmp_path / "agent.pth"
    torch.save(src.state_dict(), path)
    dst = timm.create_model(
        "agent_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst.eval()(x), src(x))
    with pytest.raises(RuntimeError, match="no published weights"):
        timm.create_model("agent_deit_tiny_patch16_224", pretrained=True, **kw)
    dst.reset_classifier(3)
    dst.set_grad_checkpointing(True)
    assert dst(x).shape == (2, 3)


def test_default_cfgs_and_base_layout():
    for name in ("agent_deit_tiny_patch16_224", "agent_deit_small_patch16_224", "agent_deit_base_patch16_224"):
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["num_classes"] == 1000 and cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == "head"
        assert math.isclose(cfg["mean"][0], 0.485) and not cfg.get("hf_hub_id")
    base = timm.create_model("agent_deit_base_patch16_224", img_size=48, num_classes=5, depth=5, num_agents=9)
    kinds = [type(b.attn).__name__ for b in base.blocks]
    assert kinds == ["AgentAttention"] * 4 + ["Attention"]
    assert base.blocks[0].attn.num_agents == 9 and base.blocks[0].attn.agent_hw == (3, 3)


# --------------------------------------------------------------------------------------------- EVA


def _rot_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the rotation of interleaved rope pairs."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], -1).reshape(x.shape)


@pytest.mark.parametrize("fused, gated, reg", [(True, False, 0), (False, True, 2), (True, True, 1)],
                         ids=["fused-qkv", "separate-qkv+gate+2reg", "fused+gate+1reg"])  # fmt: skip
def test_eva_agent_values_with_rope_gate_and_separate_qkv(fused, gated, reg):
    """EVA: q/k/v from the fused projection with separate biases or from q/k/v projections, rope on
    the patch tokens only (written out here), scale norm and output gate, checked by value."""
    from timm.models.eva import Eva, EvaAttention

    from vision_attn.variants.agent import EvaAgentAttention

    torch.manual_seed(0)
    model = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, qkv_fused=fused, use_rot_pos_emb=True,
                ref_feat_shape=(4, 4), num_reg_tokens=reg, scale_attn_inner=True, num_classes=3).eval()  # fmt: skip
    if gated:
        model.blocks[0].attn = EvaAttention(64, num_heads=2, qkv_fused=fused, num_prefix_tokens=model.num_prefix_tokens,
                                            norm_layer=torch.nn.LayerNorm, gated=True).eval()  # fmt: skip
    h = va.inject(model, va.Agent(num_agents=4))
    m = model.blocks[0].attn
    assert isinstance(m, EvaAgentAttention) and (m.gate is not None) == gated and (m.qkv is not None) == fused
    _perturb(m)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("q_bias", "k_bias", "v_bias"):
            if getattr(m, name, None) is not None:
                getattr(m, name).copy_(torch.randn(getattr(m, name).shape, generator=g))
        for mod in (m.norm, m.gate):
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    p = model.num_prefix_tokens
    x = torch.randn(2, p + 16, 64)
    rope = model.rope.get_embed()
    B, N, C = x.shape
    hd = m.head_dim
    with torch.no_grad():
        if fused:
            qkv = x @ m.qkv.weight.T + torch.cat([m.q_bias, m.k_bias, m.v_bias])
            q, k, v = qkv.reshape(B, N, 3, 2, hd).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (F.linear(x, lin.weight, lin.bias).reshape(B, N, 2, hd).transpose(1, 2)
                       for lin in (m.q_proj, m.k_proj, m.v_proj))  # fmt: skip
        sin, cos = rope.tensor_split(2, -1)
        q = torch.cat([q[:, :, :p], q[:, :, p:] * cos + _rot_interleaved(q[:, :, p:]) * sin], 2)
        k = torch.cat([k[:, :, :p], k[:, :, p:] * cos + _rot_interleaved(k[:, :, p:]) * sin], 2)
        o = F.layer_norm(_core(m, q, k, v), (C,), m.norm.weight, m.norm.bias, m.norm.eps)
        if gated:
            o = o * torch.sigmoid(x @ m.gate.weight.T + m.gate.bias)
        expected = o @ m.proj.weight.T + m.proj.bias
        out = m(x, rope=rope)
        torch.testing.assert_close(out, expected, atol=3e-5, rtol=1e-5)
        assert (m(x, rope=None) - out).abs().max() > 1e-3  # the rope is applied
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    h.remove()


# --------------------------------------------------------------------------------------------- Swin


def _swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=112, num_classes=5, embed_dim=32,
                             depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)).eval()  # fmt: skip


def _swin_block_reference(blk, x):
    """One global window, no shift: x + attn(norm1(x)) over all tokens, then the MLP."""
    B, H, W, C = x.shape
    y = x + _reference(blk.attn, blk.norm1(x).reshape(B, H * W, C)).reshape(B, H, W, C)
    y = y.reshape(B, H * W, C)
    return (y + blk.mlp(blk.norm2(y))).reshape(B, H, W, C)


def test_swin_agent_values_set_input_size_and_exact_restore():
    model = _swin()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
    original = model.layers[1].blocks[1]
    h = va.inject(model, va.Agent(num_agents=9))
    blk = model.layers[1].blocks[1]  # a shifted-window block becomes one global window, no shift
    assert isinstance(blk.attn, AgentAttention) and blk.window_size == (14, 14) and blk.shift_size == (0, 0)
    assert type(model.layers[2].blocks[0].attn).__name__ == "WindowAttention"  # later stages keep windows
    _perturb(blk.attn)
    with torch.no_grad():
        xb = torch.randn(2, 14, 14, 64)
        torch.testing.assert_close(blk(xb), _swin_block_reference(blk, xb), atol=3e-5, rtol=1e-5)
    h.remove()
    assert model.layers[1].blocks[1] is original and original.shift_size == (3, 3) and original.attn_mask is not None
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    h = va.inject(model, va.Agent(num_agents=9))
    blk = model.layers[1].blocks[1]
    _perturb(blk.attn)
    with torch.no_grad():
        model.set_input_size(img_size=128)  # timm's own resize: the agent blocks stay one global window
        assert blk.window_size == (16, 16) and blk.attn.grid == (16, 16) and blk.attn.ah_bias.shape[2] == 16
        xb = torch.randn(1, 16, 16, 64)
        torch.testing.assert_close(blk(xb), _swin_block_reference(blk, xb), atol=3e-5, rtol=1e-5)
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    h.remove()
    assert model.layers[1].blocks[1] is original
    with pytest.raises(ValueError, match=r"Agent.stages has index 7"):
        va.inject(model, va.Agent(num_agents=9, stages=(7,)))
    with pytest.raises(ValueError, match=r"Agent.blocks applies to ViT-family models"):
        va.inject(model, va.Agent(num_agents=9, blocks=(0,)))


# --------------------------------------------------------------------------------------------- injection rules


def test_second_injection_refused_and_removal_order():
    model = _vit()
    h = va.inject(model, va.Agent(num_agents=4, blocks=(0,)))
    with pytest.raises(ValueError, match=r"already has Agent injected .*remove\(\) on that handle first"):
        va.inject(model, va.Agent(num_agents=4, blocks=(1,)))
    assert type(model.blocks[1].attn).__name__ == "Attention"
    with pytest.raises(TypeError, match=r"got the class Agent: use Agent\(\)"):
        va.inject(model, va.Agent)
    h.remove()
    rn = timm.create_model("resnet18")
    e = va.inject(rn, va.ECA())
    with pytest.raises(ValueError, match="already has ECA injected"):
        va.inject(rn, va.ECA())
    c = va.inject(rn, va.CoordAttention())  # another variant stacks ...
    with pytest.raises(RuntimeError, match="remove the later injection first"):
        e.remove()  # ... and comes off first
    c.remove()
    e.remove()
    assert not any("se" in n for n, _ in rn.named_parameters())


# --------------------------------------------------------------------------------------------- calibration


def _trained_tiny_vit():
    """A tiny ViT trained for a few seconds on a learnable synthetic task (3 classes of oriented stripes)."""
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=3)

    def batch(n, g):
        y = torch.randint(0, 3, (n,), generator=g)
        base = torch.arange(32.0)
        grids = [base[None, :].expand(32, 32), base[:, None].expand(32, 32), (base[None, :] + base[:, None]) / 1.4]
        x = torch.stack([torch.sin(grids[int(c)] * 0.8 + torch.rand(1, generator=g) * 6) for c in y])
        x = x[:, None].expand(n, 3, 32, 32) + 0.3 * torch.randn(n, 3, 32, 32, generator=g)
        return x, y

    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        x, y = batch(32, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, batch(128, g)[0], batch(128, g)


def test_calibration_raises_agreement_over_plain_conversion():
    from vision_attn.calibrate import calibrate

    model, unlabelled, (x_test, y_test) = _trained_tiny_vit()
    with torch.no_grad():
        ref = model(x_test).argmax(-1)
        assert (ref == y_test).float().mean() > 0.8  # the tiny model did learn
        h = va.inject(model, va.Agent(num_agents=4))
        plain = (model(x_test).argmax(-1) == ref).float().mean().item()
    h.remove()
    cal = calibrate(model, va.Agent(num_agents=4), unlabelled, min_agreement=0.95, distill_steps=40, lr=1e-2)
    with torch.no_grad():
        calibrated = (model(x_test).argmax(-1) == ref).float().mean().item()
    assert cal.blocks and all(isinstance(model.blocks[i].attn, AgentAttention) for i in cal.blocks)
    assert calibrated >= 0.9 and calibrated > plain + 0.05, (plain, calibrated, cal.to_dict())
    assert all(r.drift < r.drift_init for r in cal.reports)  # distillation moved every block toward softmax
    assert cal.agreement >= 0.95 and cal.agreement_plain == pytest.approx(cal.agreement_plain)
    cal.handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x_test).argmax(-1), ref)
    with pytest.raises(ValueError, match=r"min_agreement must be in \[0, 1\]"):
        calibrate(model, va.Agent(num_agents=4), unlabelled, min_agreement=1.5)

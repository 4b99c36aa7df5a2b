"""Fused agent attention kernels (interpreter on CPU) vs the eager formula and the module: forward
and every gradient, the token split, and the static-check listing (compiled by test_static_sm90)."""

from __future__ import annotations

import os

import pytest
import timm
import torch

import vision_attn as va
from attn_kernels import agent_attn
from attn_kernels.agent_attn import agent_attention, agent_attention_reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or the interpreter"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "agents", "b1", "b2")


def _inputs(B, H, N, n, D, dtype, bias_heads, device=DEV):
    t = lambda *s: torch.randn(*s, device=device).to(dtype).requires_grad_()  # noqa: E731
    return (t(B, H, N, D), t(B, H, N, D), t(B, H, N, D), t(B, H, n, D), t(1, bias_heads, n, N), t(1, bias_heads, N, n))


def _check(B, H, N, n, D, dtype, bias_heads, atol, rtol):
    xs = _inputs(B, H, N, n, D, dtype, bias_heads)
    out = agent_attention(*xs, 0.25, backend="triton")  # Triton forward and backward (the CUDA path)
    go = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad((out.float() * go).sum(), xs)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = agent_attention_reference(*ref_in, 0.25)
    ref_grads = torch.autograd.grad((ref * go.double()).sum(), ref_in)
    assert out.dtype == dtype and out.shape == (B, H, N, D)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, g, r, x in zip(NAMES, grads, ref_grads, xs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize(
    "B, H, N, n, D, bias_heads",
    [(2, 2, 37, 9, 16, 2), (1, 3, 197, 16, 32, 3), (2, 2, 17, 4, 16, 1), (1, 2, 130, 49, 16, 1), (2, 1, 64, 16, 64, 1)],
)
def test_kernel_matches_formula_fp32(B, H, N, n, D, bias_heads):
    _check(B, H, N, n, D, torch.float32, bias_heads, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("B, H, N, n, D", [(1, 2, 197, 49, 32), (2, 3, 45, 9, 16)])
def test_kernel_matches_formula_fp16(B, H, N, n, D):
    _check(B, H, N, n, D, torch.float16, H, atol=1e-2, rtol=1e-2)


def test_fp32_runs_two_padded_shapes_and_falls_back_beyond():
    """fp32 (3xTF32) runs as 64 agents x head dim 32/64; head dim 16 is zero-padded, larger problems
    use the eager formula: all agree with the reference."""
    assert set(agent_attn.TILES[("bwd_query", "32")]) == {(64, 32), (64, 64)}
    for D, n in ((16, 9), (128, 4), (32, 80)):
        xs = _inputs(1, 2, 21, n, D, torch.float32, 2)
        out = agent_attention(*xs, 0.3, backend="triton")
        torch.testing.assert_close(out, agent_attention_reference(*xs, 0.3), atol=2e-5, rtol=1e-4)


def test_token_split_fills_the_gpu_at_batch_1():
    """B=1, H=6 at 1024 px: stage 1 and both backward kernels run >= 132 programs, not 6."""
    dev = torch.device("cpu")  # the interpreter plans for an H100 (132 SMs)
    for kind in ("fwd_keys", "bwd_query", "bwd_keys"):
        block = agent_attn.TILES[(kind, "16")][(64, 64)][0]
        n_split, chunk = agent_attn._split(4097, block, 6, dev)
        assert n_split * 6 >= 132 and chunk % block == 0 and (n_split - 1) * chunk < 4097 <= n_split * chunk
    assert agent_attn._split(197, 64, 64 * 6, dev) == (1, 256)  # large batch: one chunk per (batch, head)


def test_module_uses_the_kernel_and_matches_eager():
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3)
    va.inject(model.eval(), va.Agent(num_agents=4))
    m = model.blocks[0].attn
    with torch.no_grad():
        m.an_bias.normal_()
        m.ca_bias.normal_()
        x = torch.randn(2, 17, 64)
        m.backend = "reference"
        ref = m(x)
        m.backend = "triton"
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-4)


def test_errors():
    q = torch.randn(1, 1, 8, 24)
    with pytest.raises(ValueError, match="head dim in"):
        agent_attention(q, q, q, q[:, :, :4], torch.zeros(1, 4, 8), torch.zeros(1, 8, 4), 0.2, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        agent_attention(q, q, q, q[:, :, :4], torch.zeros(1, 4, 8), torch.zeros(1, 8, 4), 0.2, backend="cuda")


def test_module_gradients_through_the_kernel_match_eager():
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3)
    va.inject(model, va.Agent(num_agents=4))
    m = model.blocks[0].attn
    with torch.no_grad():
        m.na_bias.normal_()
        m.ah_bias.normal_()
    x = torch.randn(2, 17, 64)
    grads = []
    for backend in ("triton", "reference"):
        m.backend = backend
        params = [m.qkv.weight, m.an_bias, m.na_bias, m.ah_bias, m.ha_bias, m.ac_bias, m.ca_bias]
        grads.append(torch.autograd.grad(m(x).square().sum(), params))
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_static_configs_list_every_tile_entry():
    cfgs = list(agent_attn.static_configs())
    names = [c.name for c in cfgs]
    assert len(names) == len(set(names)) == (2 * 4 * 4 + 2) * 6  # (16-bit x agent blocks x head dims + fp32) x kernels
    assert 0 < sum(c.ci for c in cfgs) <= 24
    for (kind, width), table in agent_attn.TILES.items():
        dts = ("float32",) if width == "32" else ("float16", "bfloat16")
        for (ba, d), (blk, w, s) in table.items():
            for dt in dts:
                assert f"agent.{kind}[{dt},a{ba},d{d},{blk},w{w}s{s}]" in names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bf16_vs_fp32_reference(dtype):
    B, H, N, n, D = 1, 6, 3137, 49, 64  # ViT-S at 896 px + class token: odd length, split over tokens
    xs = _inputs(B, H, N, n, D, dtype, H, device="cuda")
    out = agent_attention(*xs, D**-0.5, backend="triton")
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).float().sum(), xs)
    ref_in = [x.detach().float().requires_grad_() for x in xs]
    ref = agent_attention_reference(*ref_in, D**-0.5)
    ref_grads = torch.autograd.grad((ref * go.float()).sum(), ref_in)
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert (g.float() - r).abs().max() <= 3e-2 * r.abs().max(), name


def test_masked_key_chunks_with_minus_inf_bias():
    """-inf biases that mask whole key chunks for some agents (stage 1) stay finite and exact."""
    xs = [x.detach() for x in _inputs(1, 2, 200, 16, 32, torch.float32, 2)]
    xs[4][..., :3, :150] = float("-inf")  # agents 0-2 see only the last 50 keys (several chunks fully masked)
    xs = [x.requires_grad_() for x in xs]
    out = agent_attention(*xs, 0.2, backend="triton")
    ref = agent_attention_reference(*xs, 0.2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.autograd.grad(out.sum(), xs)
    r = torch.autograd.grad(ref.sum(), xs)
    for name, a, b in zip(NAMES, g, r):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")

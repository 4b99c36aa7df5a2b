"""Fused agent attention kernel (interpreter on CPU) vs the eager formula and the module."""

from __future__ import annotations

import os

import pytest
import timm
import torch

import vision_attn as va
from attn_kernels.agent_attn import agent_attention, agent_attention_reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or the interpreter"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("N, n", [(37, 9), (64, 16), (17, 4)])
def test_kernel_matches_formula_fwd_bwd(N, n):
    B, H, D = 2, 2, 16
    t = lambda *s: torch.randn(*s, device=DEV, requires_grad=True)  # noqa: E731
    q, k, v, a = t(B, H, N, D), t(B, H, N, D), t(B, H, N, D), t(B, H, n, D)
    b1, b2 = t(1, H, n, N), t(1, H, N, n)
    out = agent_attention(q, k, v, a, b1, b2, 0.25, backend="triton")  # Triton forward and backward
    ref = agent_attention_reference(q, k, v, a, b1, b2, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    go = torch.randn_like(out)
    for g1, g2 in zip(
        torch.autograd.grad((out * go).sum(), (q, a, b1)), torch.autograd.grad((ref * go).sum(), (q, a, b1))
    ):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_module_uses_the_kernel_and_matches_eager():
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3)
    va.inject(model.eval(), va.Agent(num_agents=4))
    m = model.blocks[0].attn
    with torch.no_grad():
        m.an_bias.normal_()
        m.ca_bias.normal_()
        x = torch.randn(2, 17, 64)
        m.backend = "eager"
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
    for backend in ("triton", "eager"):
        m.backend = backend
        params = [m.qkv.weight, m.an_bias, m.na_bias, m.ah_bias, m.ha_bias, m.ac_bias, m.ca_bias]
        grads.append(torch.autograd.grad(m(x).square().sum(), params))
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)

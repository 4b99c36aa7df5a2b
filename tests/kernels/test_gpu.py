"""GPU correctness (`pytest -m gpu`): bf16/fp16 kernel vs fp32 reference at realistic sizes."""

from __future__ import annotations

import pytest
import torch

from attn_kernels import BlockLayout, LogitDecay, OutputMix, attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_kernel_vs_fp32_reference(dtype, d, density):
    B, H, n = 1, 4, 4000 + 37  # odd length: tails masked
    q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=dtype) for _ in range(3))
    nb = -(-n // 128)
    bm = torch.rand(1, H, nb, nb, device="cuda") < density
    bm |= torch.eye(nb, dtype=torch.bool, device="cuda")
    lay = BlockLayout.from_block_mask(bm, n, n, 128, 128)
    out = attention(q, k, v, lay, backend="triton")
    ref = attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), lay.to("cpu"), backend="reference")
    assert (out.float().cpu() - ref).abs().max() <= 2e-2


def test_backward_bf16_and_modifiers():
    B, H, n, d = 1, 2, 1000, 64
    q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mods = (LogitDecay(0.9, 300), OutputMix(torch.tensor([0.0, 0.5])))
    lay = BlockLayout.from_token_mask(torch.rand(n, n, device="cuda") < 0.3, 64, 64)
    out = attention(q, k, v, lay, modifiers=mods, backend="triton")
    g = torch.autograd.grad(out.float().sum(), (q, k, v))
    qf, kf, vf = (t.detach().float().cpu().requires_grad_() for t in (q, k, v))
    ref = attention(qf, kf, vf, lay.to("cpu"), modifiers=mods, backend="reference")
    gr = torch.autograd.grad(ref.sum(), (qf, kf, vf))
    for a, b in zip(g, gr):
        assert (a.float().cpu() - b).abs().max() / b.abs().max() < 3e-2

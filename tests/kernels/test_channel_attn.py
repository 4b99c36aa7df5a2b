"""Fused ECA kernel (interpreter on CPU) against the eager module: forward and backward."""

from __future__ import annotations

import os

import pytest
import torch

from attn_kernels.channel_attn import eca_fused, eca_reference
from vision_attn.variants.eca import make_eca

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or the interpreter"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 16, 17, 3)])
@pytest.mark.parametrize("gate_scale", [1.0, 2.0])
def test_forward_backward_match_eager(shape, gate_scale):
    x = torch.randn(*shape, device=DEV, requires_grad=True)
    w = torch.randn(1, 1, 3, device=DEV, requires_grad=True)
    go = torch.randn(shape, device=DEV)
    out = eca_fused(x, w, gate_scale, backend="triton")
    gx, gw = torch.autograd.grad((out * go).sum(), (x, w))
    ref = eca_reference(x, w, gate_scale)
    rx, rw = torch.autograd.grad((ref * go).sum(), (x, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)


def test_equals_timm_eca_module():
    m = make_eca(16, mode="original")
    torch.nn.init.normal_(m.conv.weight)
    x = torch.randn(2, 16, 6, 6, device=DEV)
    torch.testing.assert_close(eca_fused(x, m.conv.weight.to(DEV), 1.0, backend="triton"), m.to(DEV)(x))


def test_errors():
    with pytest.raises(ValueError, match=r"weight must be \[1, 1, k\] with k odd"):
        eca_fused(torch.randn(1, 4, 2, 2), torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        eca_fused(torch.randn(4, 2, 2), torch.randn(1, 1, 3))


def test_bench_smoke(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import channel_attn_bench

    channel_attn_bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "channel_attn_bench_smoke.json").read_text())
    assert data["results"][0]["max_err"] < 1e-5


@pytest.mark.parametrize("mode", ["identity", "original"])
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 8, 9, 3)])
def test_coord_fused_forward_backward_match_eager(mode, shape):
    from attn_kernels.channel_attn import coord_fused
    from vision_attn.variants.coord import make_coord

    m = make_coord(shape[1], reduction=4, mode=mode).to(DEV).train()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m2 = make_coord(shape[1], reduction=4, mode=mode).to(DEV).train()
    m2.load_state_dict(m.state_dict())
    x = torch.randn(*shape, device=DEV, requires_grad=True)
    go = torch.randn(shape, device=DEV)
    out = coord_fused(x, m, backend="triton")
    gx, *gp = torch.autograd.grad((out * go).sum(), (x, *m.parameters()))
    ref = m2(x)
    rx, *rp = torch.autograd.grad((ref * go).sum(), (x, *m2.parameters()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

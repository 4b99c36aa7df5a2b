"""Fused ECA and coordinate-attention kernels (interpreter on CPU) against the eager modules:
forward and backward, the spatial split at small B*C, and the static-check listing."""

from __future__ import annotations

import os

import pytest
import torch

from attn_kernels import channel_attn
from attn_kernels.channel_attn import coord_fused, eca_fused, eca_reference
from vision_attn.variants.coord import make_coord
from vision_attn.variants.eca import make_eca

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or the interpreter"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 16, 17, 3), (1, 4, 40, 41)])  # the last: split over HW
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


def test_fp16_matches_eager():
    x = torch.randn(1, 8, 33, 33, device=DEV).half().requires_grad_()
    w = torch.randn(1, 1, 3, device=DEV, requires_grad=True)
    out = eca_fused(x, w, 1.0, backend="triton")
    gx, gw = torch.autograd.grad(out.float().square().sum(), (x, w))
    xf = x.detach().float().requires_grad_()
    ref = eca_reference(xf, w, 1.0)
    rx, rw = torch.autograd.grad(ref.square().sum(), (xf, w))
    assert out.dtype == gx.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gx.float(), rx, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gw, rw, atol=2e-1, rtol=1e-2)


def test_small_batch_splits_the_spatial_reduction():
    """B=1, C=64 at 56x56: 64 planes alone underfill 132 SMs, so each row sum is split."""
    dev = torch.device("cpu")  # the interpreter plans for an H100 (132 SMs)
    block = channel_attn._block(56 * 56)
    n_split, chunk = channel_attn._split(56 * 56, block, 64, dev)
    assert n_split > 1 and chunk % block == 0 and (n_split - 1) * chunk < 56 * 56 <= n_split * chunk
    assert channel_attn._split(56 * 56, block, 64 * 64, dev)[0] == 1  # B=64: planes fill the GPU
    x = torch.empty(1, 32, 100, 7)
    bh, bw, _, n_split, chunk = channel_attn._hw_plan(x)
    assert n_split > 1 and chunk % bh == 0 and bw == 8


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
    with pytest.raises(ValueError, match="planes up to"):
        coord_fused(torch.randn(1, 8, 1, channel_attn.MAX_W + 1), make_coord(8), backend="triton")


def test_bench_smoke(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import channel_attn_bench

    channel_attn_bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "channel_attn_bench_smoke.json").read_text())
    assert data["results"][0]["max_err"] < 1e-5


def _coord_pair(C, mode, device=DEV, dtype=torch.float32):
    m = make_coord(C, reduction=4, mode=mode).to(device, dtype).train()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m2 = make_coord(C, reduction=4, mode=mode).to(device, dtype).train()
    m2.load_state_dict(m.state_dict())
    return m, m2


@pytest.mark.parametrize("mode", ["identity", "original"])
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 8, 9, 3), (1, 8, 150, 5)])  # the last: split over H
def test_coord_fused_forward_backward_match_eager(mode, shape):
    m, m2 = _coord_pair(shape[1], mode)
    x = torch.randn(*shape, device=DEV, requires_grad=True)
    go = torch.randn(shape, device=DEV)
    out = coord_fused(x, m, backend="triton")  # the CUDA branch of FusedCoordAttn
    gx, *gp = torch.autograd.grad((out * go).sum(), (x, *m.parameters()))
    ref = m2(x)
    rx, *rp = torch.autograd.grad((ref * go).sum(), (x, *m2.parameters()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_static_configs_cover_every_lane_count():
    cfgs = list(channel_attn.static_configs())
    names = [c.name for c in cfgs]
    assert len(names) == len(set(names))
    assert 0 < sum(c.ci for c in cfgs) <= 12
    for dt in ("float16", "bfloat16", "float32"):
        for hw in (1, 7, 49, 196, 784, 3136, 12544):  # every plane size maps to a listed lane count
            block = channel_attn._block(hw)
            assert any(n.startswith(f"eca.rowsum[{dt},{block},") for n in names)
        for w in (1, 3, 7, 14, 56, 224, 1000, channel_attn.MAX_W):
            bh, bw, nw = channel_attn._hw_blocks(w)
            tag = "one" if w == 1 else "a16" if w % 16 == 0 else "odd"
            assert f"coord.grad[{dt},{bh}x{bw},w_{tag},w{nw}]" in names


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (8, 256, 14, 14)])
def test_gpu_eca_bf16(shape):
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1, 1, 5, device="cuda", requires_grad=True)
    out = eca_fused(x, w, 1.0, backend="triton")
    gx, gw = torch.autograd.grad(out.float().square().sum(), (x, w))
    xf = x.detach().float().requires_grad_()
    ref = eca_reference(xf, w, 1.0)
    rx, rw = torch.autograd.grad(ref.square().sum(), (xf, w))
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (gx.float() - rx).abs().max() <= 3e-2 * rx.abs().max()
    assert (gw - rw).abs().max() <= 3e-2 * rw.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 112, 112), (4, 128, 28, 28)])
def test_gpu_coord_bf16(shape):
    m, _ = _coord_pair(shape[1], "original", device="cuda")
    ref_m = m.float()
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xf = x.detach().float().requires_grad_()
    ref = ref_m(xf)
    rx = torch.autograd.grad(ref.square().sum(), xf)[0]
    m = m.to(torch.bfloat16)
    out = coord_fused(x, m, backend="triton")
    gx = torch.autograd.grad(out.float().square().sum(), x)[0]
    assert (out.float() - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert (gx.float() - rx).abs().max() <= 5e-2 * rx.abs().max()

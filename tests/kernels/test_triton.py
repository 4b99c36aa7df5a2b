"""Triton kernel (interpreter on CPU, CUDA when present) against the reference: random layouts,
odd lengths, empty rows, element masks, modifiers, tile statistics, gradients."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_kernels import BlockLayout, LogitDecay, OutputMix, TileStats, attention

pytestmark = [
    pytest.mark.skipif(
        not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
        reason="needs CUDA or TRITON_INTERPRET=1",
    ),
    # on a GPU these cases are part of `pytest -m gpu` (the interpreter's cases, compiled for real)
    *([pytest.mark.gpu] if torch.cuda.is_available() else []),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B, H, nq, nk, d, bq, bk, density, shared, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, d, generator=g).to(DEV, dtype)
    k = torch.randn(B, H, nk, d, generator=g).to(DEV, dtype)
    v = torch.randn(B, H, nk, d, generator=g).to(DEV, dtype)
    tm = torch.rand(1 if shared else B, 1 if shared else H, nq, nk, generator=g) < density
    return q, k, v, BlockLayout.from_token_mask(tm, bq, bk).to(DEV)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    nq=st.integers(1, 70),
    nk=st.integers(1, 70),
    d=st.sampled_from([16, 32]),
    bq=st.sampled_from([16, 32]),
    bk=st.sampled_from([16, 32]),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_reference(B, H, nq, nk, d, bq, bk, density, shared, seed):
    q, k, v, lay = _case(B, H, nq, nk, d, bq, bk, density, shared, torch.float32, seed)
    o1, l1 = attention(q, k, v, lay, return_lse=True, backend="triton")
    o2, l2 = attention(q, k, v, lay, return_lse=True, backend="reference")
    assert not torch.isnan(o1).any()
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.isneginf(l1), torch.isneginf(l2))
    fin = torch.isfinite(l2)
    torch.testing.assert_close(l1[fin], l2[fin], atol=1e-5, rtol=1e-5)


def test_fp16_and_dense_layout():
    q, k, v, lay = _case(1, 2, 64, 48, 32, 32, 16, 0.5, False, torch.float16, 1)
    torch.testing.assert_close(
        attention(q, k, v, lay, backend="triton").float(), attention(q, k, v, lay, backend="reference").float(),
        atol=2e-3, rtol=2e-3,
    )  # fmt: skip
    dense = attention(q, k, v, backend="triton")  # layout None -> dense
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(dense.float(), ref, atol=2e-3, rtol=2e-3)


def test_empty_rows_give_zero_not_nan():
    q, k, v, _ = _case(1, 1, 40, 40, 16, 16, 16, 1.0, True, torch.float32, 2)
    bm = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    bm[0, 0, 1] = False  # query block 1 sees nothing
    lay = BlockLayout.from_block_mask(bm, 40, 40, 16, 16).to(DEV)
    out, lse = attention(q, k, v, lay, return_lse=True, backend="triton")
    assert torch.all(out[:, :, 16:32] == 0) and torch.all(torch.isneginf(lse[:, :, 16:32]))
    assert not torch.isnan(out).any()


def test_modifiers_and_tile_stats_match_reference():
    q, k, v, lay = _case(1, 3, 45, 45, 16, 16, 16, 0.7, False, torch.float32, 3)
    pos = torch.arange(45)
    pos[-5:] = -1
    mods = (
        LogitDecay(torch.tensor([0.3, 0.9, 1.0]), 11, q_pos=pos, k_pos=pos),
        OutputMix(torch.tensor([0.0, 0.5, 1.0])),
    )
    t1, t2 = TileStats(-2.0), TileStats(-2.0)
    o1 = attention(q, k, v, lay, modifiers=mods, tile_stats=t1, backend="triton")
    o2 = attention(q, k, v, lay, modifiers=mods, tile_stats=t2, backend="reference")
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
    assert torch.equal(t1.needed.cpu(), t2.needed.cpu())
    # structured logits: key block 1 sits 20 (natural log units) below block 0 -> skippable at -10
    q = torch.zeros(1, 1, 32, 16, device=DEV)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 32, 16, device=DEV)
    k[:, :, :16, 0], k[:, :, 16:, 0] = 40.0, -40.0
    ts = TileStats(-10.0)
    attention(q, k, torch.randn_like(k), BlockLayout.dense(32, 32, 16, 16), tile_stats=ts, backend="triton")
    assert ts.needed[0, 0].tolist() == [[1, 0], [1, 0]]


@pytest.mark.parametrize("mods", [(), "decay", "mix"])
def test_backward_matches_reference(mods):
    q, k, v, lay = _case(2, 2, 37, 45, 16, 16, 16, 0.4, False, torch.float32, 4)
    if mods == "decay":
        mods = (LogitDecay(0.5, 9),)
        q, k, v, lay = _case(1, 2, 40, 40, 16, 16, 16, 0.5, True, torch.float32, 5)
    elif mods == "mix":
        mods = (OutputMix(torch.tensor([0.2, 0.7])),)
        q, k, v, lay = _case(1, 2, 40, 40, 16, 16, 16, 0.5, True, torch.float32, 6)
    go = torch.randn_like(q[..., : v.shape[-1]])
    grads = []
    for backend in ("triton", "reference"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, lay, modifiers=mods, backend=backend)
        grads.append(torch.autograd.grad((out * go).sum(), (qq, kk, vv)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sub_tiles_match_reference(monkeypatch):
    """Layout blocks of 32 run as 16x16 kernel tiles (SPLIT_M = SPLIT_N = 2): forward, element
    masks, modifiers, tile statistics and all three gradients still match the reference."""
    from attn_kernels import triton_attention as ta

    real = ta.pick_tiles
    seen = []

    def small(kind, bq, bk, d, dv, dtype):
        t = dict(real(kind, bq, bk, d, dv, dtype), BLOCK_M=16, BLOCK_N=16)
        seen.append((kind, bq // 16, bk // 16))
        return t

    monkeypatch.setattr(ta, "pick_tiles", small)
    q, k, v, lay = _case(1, 2, 70, 70, 16, 32, 32, 0.5, False, torch.float32, 7)
    mods = (LogitDecay(torch.tensor([0.4, 1.0]), 13), OutputMix(torch.tensor([0.3, 0.0])))
    t1, t2 = TileStats(-3.0), TileStats(-3.0)
    o1 = attention(q, k, v, lay, modifiers=mods, tile_stats=t1, backend="triton")
    o2 = attention(q, k, v, lay, modifiers=mods, tile_stats=t2, backend="reference")
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
    assert torch.equal(t1.needed.cpu(), t2.needed.cpu())
    go = torch.randn_like(o2)
    grads = []
    for backend in ("triton", "reference"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, lay, modifiers=mods, backend=backend)
        grads.append(torch.autograd.grad((out * go).sum(), (qq, kk, vv)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert {("fwd", 2, 2), ("dkdv", 2, 2), ("dq", 2, 2)} <= set(seen)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter: the GPU runs these sizes in test_gpu.py")
@pytest.mark.parametrize(
    "d, block, dtype", [(64, 64, torch.float32), (128, 128, torch.float16), (128, 64, torch.float32)]
)
def test_production_tiles_multiword_masks(monkeypatch, d, block, dtype):
    """The tiles the GPU launches (each table's first entry: e.g. 128x64 at d128, so a 128-key
    block is two kernel tiles) with multi-word element masks, a ragged tail, both modifiers and
    all gradients, against the reference, in the interpreter at a small length."""
    from attn_kernels import triton_attention as ta

    seen = []
    real = ta.pick_tiles
    monkeypatch.setattr(ta, "pick_tiles", lambda *a: seen.append(a[0]) or real(*a))
    n = 2 * block + 37
    g = torch.Generator().manual_seed(d + block)
    q, k, v = (torch.randn(1, 2, n, d, generator=g).to(dtype) for _ in range(3))
    lay = BlockLayout.from_mask_mod(lambda b, h, i, j: ((i - j).abs() < 70 + 30 * h) | (j % 7 == 0), n, n, H=2,
                                    block_q=block, block_k=block)  # fmt: skip
    assert lay.has_element_mask and lay.block_k >= 64  # >= 2 mask words per row
    mods = (LogitDecay(torch.tensor([0.5, 0.8]), 40), OutputMix(torch.tensor([0.25, 0.0])))
    go = torch.randn(1, 2, n, d, generator=g)
    res = []
    for backend in ("triton", "reference"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, lay, modifiers=mods, backend=backend)
        res.append((out, *torch.autograd.grad((out.float() * go).sum(), (qq, kk, vv))))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    for a, b in zip(*res):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert {"fwd", "dkdv", "dq"} <= set(seen)
    t = real("fwd", block, block, d, d, dtype)
    assert block // t["BLOCK_N"] >= 1 and (dtype == torch.float32 or t["BLOCK_N"] < block)


@pytest.mark.parametrize("n", [48, 131])
def test_dense_without_lists_matches_reference(n):
    """layout=None runs the kernels' DENSE mode (no lists read; the ragged tail block is the
    partial one): forward, lse, modifiers and gradients equal the reference."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g).to(DEV) for _ in range(3))
    mods = (LogitDecay(0.6, 20), OutputMix(torch.tensor([0.1, 0.6])))
    res = []
    for backend in ("triton", "reference"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = attention(qq, kk, vv, modifiers=mods, return_lse=True, backend=backend)
        res.append((out, lse, *torch.autograd.grad(out.sum(), (qq, kk, vv))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_custom_scale_reaches_every_kernel():
    """attention(scale=...) (not D**-0.5): forward and gradients equal the float64 definition."""
    from ._naive import naive_attention

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEV) for _ in range(3))
    tm = torch.rand(40, 40, generator=g) < 0.6
    lay = BlockLayout.from_token_mask(tm, 16, 16).to(DEV)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_in, tm[None, None], scale=0.77)
    ref_g = torch.autograd.grad(ref.sum(), ref_in)
    for backend in ("triton", "reference"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, lay, scale=0.77, backend=backend)
        grads = torch.autograd.grad(out.sum(), (qq, kk, vv))
        torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-4)
        for a, b in zip(grads, ref_g):
            torch.testing.assert_close(a.double().cpu(), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [64, 77])
def test_device_built_layouts_match_host_built(n):
    """Layouts built on the device with no host sync (ELL lists, LiteAttention's path) give the
    same forward, tile statistics and gradients as the CSR layout of the same block mask."""
    g = torch.Generator().manual_seed(n)
    nb = -(-n // 16)
    bm = torch.rand(1, 2, nb, nb, generator=g) < 0.45
    bm[..., 0, :] = False  # an empty row
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).to(DEV) for _ in range(3))
    host = BlockLayout.from_block_mask(bm, n, n, 16, 16).to(DEV)
    dev = BlockLayout.from_device_block_mask(bm.to(DEV), n, n, 16, 16)
    res = []
    for lay in (host, dev):
        ts = TileStats(-1.0)
        out = attention(q, k, v, lay, tile_stats=ts, backend="triton")
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o2 = attention(qq, kk, vv, lay, backend="triton")
        res.append((out, ts.needed.float(), *torch.autograd.grad((o2 * o2).sum(), (qq, kk, vv))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    ref = attention(q, k, v, host, backend="reference")
    torch.testing.assert_close(res[1][0], ref, atol=1e-5, rtol=1e-4)

"""The chunked reference against the naive dense-mask oracle (values, LSE, grads, modifiers)."""

from __future__ import annotations

import math

import pytest
import torch

from attn_kernels import BlockLayout, LogitDecay, OutputMix, TileStats, attention, reference_attention

from ._naive import naive_attention


def _qkv(B=2, H=3, nq=45, nk=45, d=16, dtype=torch.float32):
    return (
        torch.randn(B, H, nq, d, dtype=dtype),
        torch.randn(B, H, nk, d, dtype=dtype),
        torch.randn(B, H, nk, d, dtype=dtype),
    )


def test_dense_equals_sdpa():
    q, k, v = _qkv()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(reference_attention(q, k, v, chunk=7), ref, atol=1e-5, rtol=1e-5)


def test_masked_with_empty_rows_and_lse():
    q, k, v = _qkv(nq=37, nk=50)
    tm = torch.rand(2, 3, 37, 50) < 0.2
    tm[:, :, 3] = False  # a row that sees no key
    lay = BlockLayout.from_token_mask(tm, 16, 32)
    out, lse = attention(q, k, v, lay, return_lse=True, backend="reference")
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, tm), atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(16)
    ref_lse = torch.logsumexp(s.masked_fill(~tm, float("-inf")), -1)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(out).any()


def test_modifiers_match_definition():
    q, k, v = _qkv(nq=40, nk=40)
    f = torch.tensor([0.5, 0.8, 1.0])
    qp = torch.arange(40)
    qp[:4] = -1  # exempt (text) tokens
    u = torch.tensor([0.0, 0.25, 1.0])
    mods = (LogitDecay(f, 9, q_pos=qp, k_pos=qp), OutputMix(u))
    out = attention(q, k, v, modifiers=mods, backend="reference")
    ref = naive_attention(q, k, v, decay=(f, 9, qp, qp), mix=u)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 2], v[:, 2])  # u = 1 is the identity map (SoftPAG)
    # the decay really changes far positive logits
    assert (attention(q, k, v, modifiers=mods[:1], backend="reference") - attention(q, k, v)).abs().max() > 1e-3


def test_gradients_match_naive():
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, H=2, nq=33, nk=33))
    tm = torch.rand(1, 2, 33, 33) < 0.4
    lay = BlockLayout.from_token_mask(tm, 16, 16)
    go = torch.randn(1, 2, 33, 16)
    g1 = torch.autograd.grad((attention(q, k, v, lay, backend="reference") * go).sum(), (q, k, v))
    g2 = torch.autograd.grad((naive_attention(q, k, v, tm) * go.double()).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


def test_tile_stats_rule():
    """A key block whose logits are far below an earlier block's is marked skippable."""
    B, H, n, d = 1, 1, 32, 16
    q = torch.zeros(B, H, n, d)
    q[..., 0] = 1.0
    k = torch.zeros(B, H, n, d)
    k[:, :, :16, 0] = 40.0  # block 0: logit 10 (scale 1/4)
    k[:, :, 16:, 0] = -40.0  # block 1: logit -10 -> 20 below the running max
    v = torch.randn(B, H, n, d)
    lay = BlockLayout.dense(n, n, 16, 16)
    ts = TileStats(threshold=-10.0)
    attention(q, k, v, lay, tile_stats=ts, backend="reference")
    assert ts.needed[0, 0].tolist() == [[1, 0], [1, 0]]
    ts = TileStats(threshold=-40.0)  # lenient threshold keeps it
    attention(q, k, v, lay, tile_stats=ts, backend="reference")
    assert ts.needed[0, 0].tolist() == [[1, 1], [1, 1]]


def test_chunking_does_not_change_results():
    q, k, v = _qkv(nq=70, nk=70)
    torch.testing.assert_close(reference_attention(q, k, v, chunk=8), reference_attention(q, k, v, chunk=1024))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_dtype(dtype):
    q, k, v = _qkv(dtype=dtype)
    out = attention(q, k, v, backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), atol=2e-2, rtol=2e-2)

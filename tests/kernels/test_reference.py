"""The reference against the naive dense-mask oracle (values, LSE, grads, modifiers, tile stats),
its sparsity, its steady state without host syncs, and its benchmark script."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import attn_kernels.reference as ref_mod
from attn_kernels import (
    VALID_BLOCK_SIZES,
    BlockLayout,
    LogitDecay,
    OutputMix,
    TileStats,
    attention,
    reference_attention,
)

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


# ---------------------------------------------------------------------- random cases vs the naive oracle
_LOG2E = 1.0 / math.log(2.0)
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _cases(draw, max_len=150, grad=False):
    """A random call: shapes, blocks, layout kind and sharing, density, empty rows, modifiers."""
    nq = draw(st.integers(1, max_len))
    nk = nq if draw(st.booleans()) else draw(st.integers(1, max_len))
    d = draw(st.sampled_from([8, 16]))
    return dict(
        B=draw(st.sampled_from([1, 2])),
        H=draw(st.sampled_from([1, 3])),
        nq=nq,
        nk=nk,
        d=d,
        dv=draw(st.sampled_from([d, 12])),
        bq=draw(st.sampled_from(VALID_BLOCK_SIZES)),
        bk=draw(st.sampled_from(VALID_BLOCK_SIZES)),
        kind=draw(st.sampled_from(["block", "device", "token", "none"])),
        share=draw(st.sampled_from(["shared", "heads", "batch", "both"])),
        density=draw(st.sampled_from([0.0, 0.03, 0.2, 0.5, 0.8, 1.0])),
        empty_row=draw(st.booleans()),
        decay=draw(st.booleans()),
        threshold=draw(st.integers(0, 40)),
        exempt=draw(st.booleans()),
        mix=nq == nk and draw(st.booleans()),
        dtype=torch.float32 if grad else draw(st.sampled_from([torch.float32, torch.float16])),
        order=draw(st.sampled_from([None, "sorted", "natural", "masked_dense"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _build(c):
    """Tensors, layout, ground-truth token mask (None = dense) and modifiers of a case."""
    g = torch.Generator().manual_seed(c["seed"])
    B, H, nq, nk, bq, bk = c["B"], c["H"], c["nq"], c["nk"], c["bq"], c["bk"]
    q = torch.randn(B, H, nq, c["d"], generator=g).to(c["dtype"])
    k = torch.randn(B, H, nk, c["d"], generator=g).to(c["dtype"])
    v = torch.randn(B, H, nk, c["dv"], generator=g).to(c["dtype"])
    Bl = B if c["share"] in ("batch", "both") else 1
    Hl = H if c["share"] in ("heads", "both") else 1
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    lay = tm = None
    if c["kind"] in ("block", "device"):
        bm = torch.rand(Bl, Hl, nqb, nkb, generator=g) < c["density"]
        if c["empty_row"]:
            bm[..., nqb // 2, :] = False
        tm = bm.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
        build = BlockLayout.from_block_mask if c["kind"] == "block" else BlockLayout.from_device_block_mask
        lay = build(bm, nq, nk, bq, bk)
    elif c["kind"] == "token":
        tm = torch.rand(Bl, Hl, nq, nk, generator=g) < c["density"]
        if c["empty_row"]:
            tm[..., nq // 2, :] = False
        lay = BlockLayout.from_token_mask(tm, bq, bk)
    mods, decay, mix = [], None, None
    if c["decay"]:
        f = torch.rand(H, generator=g)
        qp, kp = torch.arange(nq), torch.arange(nk)
        if c["exempt"]:
            qp[: max(1, nq // 5)] = -1
            kp[: max(1, nk // 5)] = -1
        mods.append(LogitDecay(f, c["threshold"], q_pos=qp, k_pos=kp))
        decay = (f, c["threshold"], qp, kp)
    if c["mix"]:
        u = torch.rand(H, generator=g)
        mods.append(OutputMix(u))
        mix = u
    return q, k, v, lay, tm, tuple(mods), decay, mix


def _naive_lse(q, k, tm, decay):
    """Natural-log logsumexp of the masked (decayed) logits, float64, from the definition."""
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    if decay is not None:
        f, thr, qp, kp = decay
        far = ((qp[:, None] - kp[None, :]).abs() > thr) & (qp[:, None] >= 0) & (kp[None, :] >= 0)
        s = torch.where(far & (s > 0), s * f.double().view(1, -1, 1, 1), s)
    if tm is not None:
        s = s.masked_fill(~tm, float("-inf"))
    return torch.logsumexp(s, -1)


def _with_order(order, fn):
    old = ref_mod._FORCE_ORDER
    ref_mod._FORCE_ORDER = order
    try:
        return fn()
    finally:
        ref_mod._FORCE_ORDER = old


@settings(max_examples=80, **_SETTINGS)
@given(_cases())
def test_random_cases_match_naive_oracle(c):
    """Output and lse equal the float64 definition for any layout, sharing, dtype and modifier."""
    q, k, v, lay, tm, mods, decay, mix = _build(c)
    out, lse = _with_order(c["order"], lambda: reference_attention(q, k, v, lay, modifiers=mods, return_lse=True))
    ref = naive_attention(q, k, v, tm, decay=decay, mix=mix)
    tol = 1e-5 if c["dtype"] == torch.float32 else 2e-3
    assert out.dtype == q.dtype and out.shape == ref.shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    ref_lse = _naive_lse(q, k, tm, decay).expand_as(lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # rows that see no key
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], atol=1e-5, rtol=1e-5)
    if tm is not None and mix is None:
        assert torch.all(out[~tm.any(-1).expand(lse.shape)] == 0)  # rows that see no key: exactly 0


@settings(max_examples=30, **_SETTINGS)
@given(_cases(max_len=90, grad=True), st.booleans())
def test_random_gradients_match_naive_float64(c, with_lse):
    """dq, dk, dv (and through the lse) equal autograd of the float64 oracle; no NaN from empty rows."""
    q, k, v, lay, tm, mods, decay, mix = _build(c)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.Generator().manual_seed(c["seed"] + 1)
    go = torch.randn(c["B"], c["H"], c["nq"], c["dv"], generator=g)
    gl = torch.randn(c["B"], c["H"], c["nq"], generator=g)

    def ours():
        if with_lse:
            o, lse = reference_attention(q, k, v, lay, modifiers=mods, return_lse=True)
            return (o * go).sum() + torch.where(torch.isfinite(lse), lse * gl, 0.0).sum()
        return (reference_attention(q, k, v, lay, modifiers=mods) * go).sum()

    g1 = torch.autograd.grad(_with_order(c["order"], ours), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    loss = (naive_attention(qd, kd, vd, tm, decay=decay, mix=mix) * go.double()).sum()
    if with_lse:
        rl = _naive_lse(qd, kd, tm, decay)
        loss = loss + torch.where(torch.isfinite(rl), rl * gl.double(), 0.0).sum()
    g2 = torch.autograd.grad(loss, (qd, kd, vd))
    for a, b in zip(g1, g2):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------- TileStats: today's rule as the oracle
def _todays_tile_needed(s, bk, nkb, threshold):
    """The rule as implemented before the gathered rewrite, verbatim: masked logits of one query
    block over all keys [B,H,rows,Nk] -> uint8 [B,H,nkb]."""
    B, H, rows, nk = s.shape
    pad = nkb * bk - nk
    sp = torch.nn.functional.pad(s, (0, pad), value=float("-inf")) if pad else s
    tile_max = sp.view(B, H, rows, nkb, bk).amax(-1)
    run = torch.cummax(tile_max, dim=-1).values
    before = torch.cat([torch.full_like(run[..., :1], float("-inf")), run[..., :-1]], -1)
    need_row = tile_max * _LOG2E > before * _LOG2E + threshold
    return need_row.any(2).to(torch.uint8)


def _todays_needed(q, k, tm, bq, bk, decay_mod, threshold):
    """Today's per-query-block loop: all keys, fp32, decay then mask, then the rule."""
    B, H, nq, d = q.shape
    nk = k.shape[2]
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    needed = torch.zeros(B, H, nqb, nkb, dtype=torch.uint8)
    if decay_mod is not None:
        qpos, kpos = decay_mod.positions(nq, nk, q.device)
    for i in range(nqb):
        r0, r1 = i * bq, min(i * bq + bq, nq)
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, r0:r1].float(), k.float()) * d**-0.5
        if decay_mod is not None:
            s = decay_mod.reference_scores(s, qpos[r0:r1], kpos, decay_mod.factors(H))
        s = s.masked_fill(~tm[:, :, r0:r1], float("-inf"))
        needed[:, :, i] = _todays_tile_needed(s, bk, nkb, threshold)
    return needed


@settings(max_examples=40, **_SETTINGS)
@given(_cases(), st.sampled_from([-0.5, -3.0, -10.0, -25.0]))
def test_tile_stats_equal_todays_rule(c, threshold):
    q, k, v, lay, tm, mods, decay, mix = _build({**c, "kind": "token" if c["kind"] == "none" else c["kind"]})
    ts = TileStats(threshold=threshold)
    out = _with_order(c["order"], lambda: reference_attention(q, k, v, lay, modifiers=mods, tile_stats=ts))
    decay_mod = next((m for m in mods if isinstance(m, LogitDecay)), None)
    want = _todays_needed(q, k, tm.expand(c["B"], c["H"], -1, -1), c["bq"], c["bk"], decay_mod, threshold)
    assert ts.needed.dtype == torch.uint8 and torch.equal(ts.needed, want)
    assert not (ts.needed.bool() & ~lay.to_block_mask()).any()  # never an unvisited tile
    tol = 1e-5 if c["dtype"] == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, tm, decay=decay, mix=mix), atol=tol, rtol=tol)


@pytest.mark.parametrize("gap, needed", [(7.0, 0), (6.9, 1)])
def test_tile_stats_threshold_is_in_log2_units(gap, needed):
    """Logit gaps of 7.0 / 6.9 nats are 10.10 / 9.95 bits: with threshold -10 (bits) the first
    tile is skippable and the second not (a natural-log rule would keep both)."""
    n, d = 32, 4
    q = torch.zeros(1, 1, n, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, d)
    k[:, :, :16, 0] = 1.0  # block 0: logit 1 (scale 1)
    k[:, :, 16:, 0] = 1.0 - gap  # block 1: `gap` nats below the running max
    v = torch.randn(1, 1, n, d)
    ts = TileStats(threshold=-10.0)
    reference_attention(q, k, v, BlockLayout.dense(n, n, 16, 16), scale=1.0, tile_stats=ts)
    assert ts.needed[0, 0].tolist() == [[1, needed], [1, needed]]


def test_decay_threshold_is_strict_and_exempts_negative_positions():
    """factor 0 zeroes positive logits farther than `threshold` (strictly), except exempt tokens."""
    n, thr = 8, 3
    q, k = torch.ones(1, 1, n, 4), torch.ones(1, 1, n, 4)  # every logit = 4 * 0.5 = 2
    v = torch.eye(n)[None, None]  # the output row is the attention row
    pos = torch.arange(n)
    pos[0] = -1  # exempt
    out = reference_attention(q, k, v, modifiers=(LogitDecay(0.0, thr, q_pos=pos, k_pos=pos),))
    lay = BlockLayout.from_token_mask(torch.ones(n, n, dtype=torch.bool), 16, 16)  # sparse path, same logits
    out_sparse = reference_attention(q, k, v, lay, modifiers=(LogitDecay(0.0, thr, q_pos=pos, k_pos=pos),))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    logit = torch.where(((i - j).abs() > thr) & (i > 0) & (j > 0), 0.0, 2.0)
    want = torch.softmax(logit, -1)
    torch.testing.assert_close(out[0, 0], want)
    torch.testing.assert_close(out_sparse[0, 0], want)


# ---------------------------------------------------------------------- sparsity and host syncs
def test_fused_calls_visit_only_listed_blocks(monkeypatch):
    """Dense is one fused call over everything; a 25% layout feeds the fused kernel 25% of the pairs."""
    calls = []
    real = ref_mod._FLASH_CPU

    def spy(q, k, v, attn_mask=None, scale=None):
        calls.append((q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2], attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(ref_mod, "_FLASH_CPU", spy)
    B, H, n, blk = 1, 2, 512, 64
    q, k, v = _qkv(B, H, n, n, 16)
    reference_attention(q, k, v)
    assert calls == [(B * H * n * n, False)]
    calls.clear()
    nb = n // blk
    bm = torch.zeros(nb, nb, dtype=torch.bool)
    for r in range(nb):  # two key blocks per row: the diagonal and a scattered one
        bm[r, r] = bm[r, (3 * r + 5) % nb] = True
    out = reference_attention(q, k, v, BlockLayout.from_block_mask(bm, n, n, blk, blk))
    assert sum(p for p, _ in calls) <= bm.sum() * blk * blk * B * H  # no padding, no unlisted block
    assert len(calls) <= 2 and not any(m for _, m in calls)  # equal counts: no mask needed
    tm = bm.repeat_interleave(blk, 0).repeat_interleave(blk, 1)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, tm), atol=1e-5, rtol=1e-5)


class _NoHostSync(TorchFunctionMode):
    """Raises on any tensor -> host conversion."""

    BANNED = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host sync in steady state: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_guard_really_catches():
    t = torch.tensor([1.0])
    for bad in (lambda: bool(t), lambda: t.item(), lambda: t.tolist(), lambda: int(t), lambda: t.cpu()):
        with _NoHostSync(), pytest.raises(AssertionError, match="host sync"):
            bad()


def _sync_layouts():
    g = torch.Generator().manual_seed(3)
    tm = torch.rand(2, 3, 70, 70, generator=g) < 0.3
    dev_mask = torch.rand(1, 3, 5, 5, generator=g) < 0.5
    return {
        "element_masks_per_head": BlockLayout.from_token_mask(tm, 16, 32),
        "shared_blocks": BlockLayout.from_block_mask(torch.rand(5, 3, generator=g) < 0.5, 70, 70, 16, 32),
        "device_built_per_head": BlockLayout.from_device_block_mask(dev_mask, 70, 70, 16, 16),
        "dense_layout": BlockLayout.dense(70, 70, 16, 16),
    }


@pytest.mark.parametrize("name", list(_sync_layouts()))
@pytest.mark.parametrize("order", [None, "sorted", "natural", "masked_dense"])
@pytest.mark.parametrize("mode", ["fused", "explicit", "backward", "op"])
def test_second_call_does_no_host_sync(name, order, mode):
    lay = _sync_layouts()[name]
    q, k, v = _qkv(2, 3, 70, 70, 16)
    kw, mix = {}, (OutputMix(0.3),)  # steady state: the same layout and modifier objects
    if mode == "explicit":
        kw = dict(modifiers=(LogitDecay(0.5, 5), *mix), tile_stats=TileStats(), return_lse=True)
    if mode == "backward":
        q, k, v = (t.requires_grad_() for t in (q, k, v))

    def call():
        if mode == "op":
            return attention(q, k, v, lay, modifiers=mix, backend="reference")
        out = reference_attention(q, k, v, lay, **kw)
        if mode == "backward":
            out.sum().backward()
        return out

    _with_order(order, call)  # first call: builds the plan (host work allowed)
    with _NoHostSync():
        _with_order(order, call)
    kw.pop("tile_stats", None)  # (tiles need a layout)
    with _NoHostSync():  # and without a layout
        reference_attention(q, k, v, **kw) if mode != "op" else attention(q, k, v, modifiers=mix, backend="reference")


def test_device_built_layout_needs_no_csr():
    """A layout from `from_device_block_mask` is planned from its block mask: no CSR is built."""
    bm = torch.rand(1, 2, 4, 4) < 0.5
    lay = BlockLayout.from_device_block_mask(bm, 60, 60, 16, 16)
    q, k, v = _qkv(1, 2, 60, 60, 16)
    out = reference_attention(q, k, v, lay)
    assert lay._row_ptr is None and lay._col_idx is None
    tm = bm.repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :60, :60]
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, tm), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- benchmark script
def test_cpu_reference_bench_smoke(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_reference_bench.py"
    spec = importlib.util.spec_from_file_location("cpu_reference_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rep = bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_reference.json").read_text())
    assert (tmp_path / "cpu_reference.png").stat().st_size > 1000
    assert data["smoke"] and data["device"]["type"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert set(data["median_ms"]) == {"sdpa", "dense", "sparse_0.5", "sparse_0.25", "sparse_0.1"}
    assert all(c["max_abs_err_vs_sdpa"] < 1e-4 for c in data["cases"].values())
    assert {t["target"] for t in data["targets"]} == {"dense_vs_sdpa", "sparse_0.25_vs_dense"}
    assert rep["ratios"]["dense_vs_sdpa"] > 0


@pytest.mark.parametrize("order", ["sorted", "natural"])
def test_repeated_calls_reuse_buffers_without_aliasing(order):
    """Inference calls reuse the layout's gather buffers: every result stays right, earlier
    outputs are not overwritten, and the caller's thread count is restored."""
    g = torch.Generator().manual_seed(5)
    tm = torch.rand(1, 2, 90, 70, generator=g) < 0.3
    lay = BlockLayout.from_token_mask(tm, 16, 16)
    threads = torch.get_num_threads()
    results = []
    with torch.inference_mode():
        for _ in range(3):
            q, k, v = _qkv(2, 2, 90, 70, 16)
            out = _with_order(order, lambda q=q, k=k, v=v: reference_attention(q, k, v, lay))
            results.append((q, k, v, out))
    assert torch.get_num_threads() == threads
    for q, k, v, out in results:
        torch.testing.assert_close(out.double(), naive_attention(q, k, v, tm), atol=1e-5, rtol=1e-5)

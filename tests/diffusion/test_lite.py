"""LiteAttention: skip decisions follow the tile rule, the skip set only grows, reset clears it,
text / must-do / must-skip ranges hold, recalibration revisits everything."""

from __future__ import annotations

import math

import pytest
import torch

import attn_kernels  # part of this repository: a missing package must fail, not skip
from diffusion_attn.variants import AttnContext, AttnPlan, LiteAttention, TokenLayout

B = 16  # block size used throughout (small layouts)


def _ctx(layout, step, state, heads=2, batch=1, layer=0):
    return AttnContext(layer, 2, step, None, layout, batch, heads, 16, torch.device("cpu"), torch.float32, state)


def _call(var, ctx, q, k, v):
    plan = var.plan(ctx, AttnPlan())
    out = attn_kernels.attention(q, k, v, plan.layout, tile_stats=plan.tile_stats, backend="reference")
    for cb in plan.after:
        cb(out, plan)
    return out, plan


def _visit(plan, shape=(1, 2, 8, 8)):
    """Visited tiles of a plan (a dense plan visits everything)."""
    if plan.layout is None:
        return torch.ones(shape, dtype=torch.bool)
    return plan.layout.to_block_mask().expand(shape)


def _skip(var, state):
    (s,) = var.skip_set(state)
    return s.clone()


def _needed_reference(q, k, visit, thr):
    """Tile rule from the definition, tiles visited in ascending key-block order per query block."""
    bsz, h, n, d = q.shape
    nb = math.ceil(n / B)
    s = (q @ k.transpose(-1, -2)) * d**-0.5
    need = torch.zeros(bsz, h, nb, nb, dtype=torch.bool)
    for b in range(bsz):
        for hh in range(h):
            for i in range(nb):
                rows = s[b, hh, i * B : (i + 1) * B]
                run = torch.full((rows.shape[0],), -math.inf)
                for j in range(nb):
                    if not visit[b, hh, i, j]:
                        continue
                    tmax = rows[:, j * B : (j + 1) * B].max(1).values
                    need[b, hh, i, j] = bool(((tmax - run) * math.log2(math.e) > thr).any())
                    run = torch.maximum(run, tmax)
    return need


def _structured(n, heads=2, d=16, strength=6.0, seed=0):
    """q/k where each query block mostly attends its own key block and block 0 (a sink)."""
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(n / B)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    blk = torch.arange(n) // B
    dirs = basis[blk % d]
    q = strength * (dirs + basis[0]) + 0.3 * torch.randn(1, heads, n, d, generator=g)
    k = strength * dirs + 0.3 * torch.randn(1, heads, n, d, generator=g)
    v = torch.randn(1, heads, n, d, generator=g)
    assert nb <= d
    return q, k, v


def test_first_step_dense_then_rule_seeds_skip_set():
    lay = TokenLayout((4, 4, 8))  # 128 tokens, 8 blocks
    var = LiteAttention(threshold=-6.0, block_size=B)
    state: dict = {}
    q, k, v = _structured(lay.seq_len)
    out, plan = _call(var, _ctx(lay, 0, state), q, k, v)
    visit = plan.layout.to_block_mask().expand(1, 2, 8, 8)
    assert bool(visit.all())
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    expected = visit & ~_needed_reference(q, k, visit, -6.0)
    assert torch.equal(_skip(var, state), expected)
    assert expected.float().mean() > 0.3  # the structure makes many tiles negligible


def test_skip_set_grows_monotonically_and_reset_clears():
    lay = TokenLayout((4, 4, 8))
    var = LiteAttention(threshold=-8.0, block_size=B)
    state: dict = {}
    q, k, v = _structured(lay.seq_len, strength=5.0)
    prev = None
    for step in range(5):
        q = q + 0.3 * torch.randn_like(q)
        out, plan = _call(var, _ctx(lay, step, state), q, k, v)
        visit = plan.layout.to_block_mask().expand(1, 2, 8, 8)
        skip = _skip(var, state)
        if prev is not None:
            assert torch.equal(visit, ~prev)  # visits exactly the survivors
            assert bool((prev <= skip).all())  # only grows
            assert torch.equal(skip, prev | (visit & ~_needed_reference(q, k, visit, -8.0)))
            # the skipped tiles carry almost no probability mass: close to dense attention
            dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            assert (out - dense).abs().max() < 5e-2
        prev = skip
    assert prev.float().mean() > 0.3
    state.clear()  # what the handle's reset does to ctx.state
    var.reset()
    _, plan = _call(var, _ctx(lay, 0, state), q, k, v)
    assert bool(plan.layout.to_block_mask().all())


def test_very_low_threshold_is_dense():
    lay = TokenLayout((2, 4, 8))
    var = LiteAttention(threshold=-1e4, block_size=B)
    state: dict = {}
    q, k, v = _structured(lay.seq_len)
    for step in range(3):
        out, _ = _call(var, _ctx(lay, step, state), q, k, v)
    assert not bool(_skip(var, state).any())
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_text_blocks_always_visited():
    lay = TokenLayout((4, 4, 6), text_len=20, text_first=True)  # 116 tokens, text in blocks 0-1
    var = LiteAttention(threshold=-2.0, block_size=B)
    state: dict = {}
    q, k, v = _structured(lay.seq_len, strength=8.0)
    for step in range(3):
        _, plan = _call(var, _ctx(lay, step, state), q, k, v)
    visit = plan.layout.to_block_mask()[0, 0]
    assert bool(visit[:2].all()) and bool(visit[:, :2].all())
    assert not bool(visit.all())


def test_must_do_and_must_skip_frames():
    lay = TokenLayout((4, 4, 8))  # 32 tokens per frame = 2 blocks per frame
    var = LiteAttention(threshold=-2.0, block_size=B, must_do=((1, 2),), must_skip=((3, 4),))
    state: dict = {}
    q, k, v = _structured(lay.seq_len, strength=8.0)
    out, plan = _call(var, _ctx(lay, 0, state), q, k, v)
    visit = plan.layout.to_block_mask()[0, 0]
    assert not bool(visit[:, 6:].any()) and bool(visit[:, :6].all())  # frame 3 never visited, even at warm-up
    keep = torch.ones(lay.seq_len, lay.seq_len, dtype=torch.bool)
    keep[:, 96:] = False
    torch.testing.assert_close(
        out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-5, rtol=1e-5
    )
    for step in range(1, 4):
        _, plan = _call(var, _ctx(lay, step, state), q, k, v)
    visit = plan.layout.to_block_mask()[0, 0]
    assert bool(visit[:, 2:4].all())  # must-do frame 1 (key blocks 2, 3)
    assert not bool(visit[:, 6:].any())
    assert not bool(_skip(var, state)[..., 6:].any())  # the skip set holds visited tiles only
    assert not bool(visit.all())


def test_must_do_and_must_skip_in_tokens():
    """range_unit="token": ranges are visual token indices (text excluded), here after 20 text tokens."""
    lay = TokenLayout((4, 4, 8), text_len=20, text_first=True)  # 148 tokens: text 0-19, visual 20-147
    var = LiteAttention(threshold=-2.0, block_size=B, range_unit="token", must_do=((60, 76),), must_skip=((92, 128),))
    always, never, text_blk = var.static_masks(lay)
    # visual token t sits at sequence position 20 + t: must-do 80-95 = block 5; must-skip 112-147 covers
    # blocks 7, 8 and the 4-token tail block 9 entirely; block 6 (96-111) holds no must-skip key
    assert text_blk.nonzero().flatten().tolist() == [0, 1]
    assert bool(always[:, 5].all()) and not bool(always[2:, 4].any()) and not bool(always[2:, 6].any())
    assert never[2].nonzero().flatten().tolist() == [7, 8, 9]
    assert not bool(never[:2].any())  # text rows see everything
    state: dict = {}
    q, k, v = _structured(lay.seq_len, strength=8.0)
    out, plan = _call(var, _ctx(lay, 0, state), q, k, v)
    keep = torch.ones(lay.seq_len, lay.seq_len, dtype=torch.bool)
    keep[20:, 112:] = False  # visual queries never see the must-skip keys; text queries see everything
    torch.testing.assert_close(
        out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-5, rtol=1e-5
    )
    for step in range(1, 4):
        _, plan = _call(var, _ctx(lay, step, state), q, k, v)
    visit = plan.layout.to_block_mask()[0, 0]
    assert bool(visit[:, 5].all())  # must-do block never skipped
    with pytest.raises(ValueError, match=r"must_skip\[0\] = \(92, 200\) must lie in \[0, 128\] tokens"):
        LiteAttention(range_unit="token", must_skip=((92, 200),), block_size=B).plan(_ctx(lay, 0, {}), AttnPlan())


def test_warmup_and_recalibration_steps():
    lay = TokenLayout((4, 4, 8))
    var = LiteAttention(threshold=-6.0, block_size=B, warmup_steps=2, recalibrate_every=3)
    state: dict = {}
    q, k, v = _structured(lay.seq_len)
    full = []
    for step in range(9):
        _, plan = _call(var, _ctx(lay, step, state), q, k, v)
        full.append(bool(_visit(plan).all()))
        if step == 0:
            assert not bool(_skip(var, state).any())  # early warm-up steps do not mark
    # steps 0-1 warm-up; 1 seeds; recalibrate at 4 and 7
    assert full == [True, True, False, False, True, False, False, True, False]


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        ({"threshold": 1.0}, ValueError, "threshold"),
        ({"threshold": "x"}, TypeError, "threshold"),
        ({"warmup_steps": 0}, ValueError, "warmup_steps"),
        ({"recalibrate_every": 0}, ValueError, "recalibrate_every"),
        ({"must_do": ((3, 1),)}, ValueError, "must_do"),
        ({"must_skip": (5,)}, TypeError, "must_skip"),
        ({"range_unit": "block"}, ValueError, "range_unit"),
        ({"block_size": 100}, ValueError, "block_size"),
    ],
)
def test_bad_parameters(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LiteAttention(**kw)


def test_range_outside_layout():
    var = LiteAttention(must_skip=((2, 9),), block_size=B)
    with pytest.raises(ValueError, match=r"must_skip\[0\].*\[0, 4\] frames"):
        var.plan(_ctx(TokenLayout((4, 4, 8)), 0, {}), AttnPlan())


def test_per_sample_and_head_skip_sets():
    """A CFG-style batch keeps one skip set per (sample, head): different inputs, different sets."""
    lay = TokenLayout((4, 4, 8))
    var = LiteAttention(threshold=-6.0, block_size=B)
    state: dict = {}
    q0, k0, v0 = _structured(lay.seq_len, seed=0)
    q1, k1, v1 = _structured(lay.seq_len, strength=1.0, seed=1)  # weak structure: little to skip
    q, k, v = torch.cat([q0, q1]), torch.cat([k0, k1]), torch.cat([v0, v1])
    _call(var, _ctx(lay, 0, state, batch=2), q, k, v)
    skip = _skip(var, state)
    assert skip.shape == (2, 2, 8, 8)
    assert skip[0].float().mean() > skip[1].float().mean() + 0.2
    _, plan = _call(var, _ctx(lay, 1, state, batch=2), q, k, v)
    assert torch.equal(plan.layout.to_block_mask(), ~skip)

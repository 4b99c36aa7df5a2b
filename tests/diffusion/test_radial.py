"""Radial attention: the block mask equals an independent transcription of the official rules,
the schedule switches at the right steps/layers, and the plan computes the right attention."""

from __future__ import annotations

import math

import pytest
import torch

import attn_kernels  # part of this repository: a missing package must fail, not skip
from diffusion_attn.variants import AttnContext, AttnPlan, Radial, TokenLayout
from diffusion_attn.variants.radial import radial_block_mask


# -- independent re-implementation of mit-han-lab/radial-attention gen_log_mask_shrinked --------
def _official_block_mask(frames, s, text_len, decay, sink, b):
    """Token-level loops, like the official code: per frame pair a padded local mask, shrunk alone."""
    nv = frames * s
    n = nv + text_len
    nb = math.ceil(n / b)
    final = torch.zeros(nb, nb, dtype=torch.bool)
    if text_len:
        final[nv // b :] = True
        final[:, nv // b :] = True
    r = torch.arange(s).view(-1, 1)
    c = torch.arange(s).view(1, -1)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            g = d.bit_length()
            if sink and j == 0:
                local = torch.ones(s, s, dtype=torch.bool)
            else:
                width = s if d <= 1 else max(2 ** s.bit_length() / 2**g * decay, b)
                local = (c - r).abs() <= width
                decay_len = 2 ** s.bit_length() / 2**g
                if decay_len < b and d % int(b / decay_len) != 0:
                    local = torch.zeros(s, s, dtype=torch.bool)
            rr, rc = (i * s) % b, (j * s) % b
            ln = math.ceil(s / b) * b
            padded = torch.zeros(rr + ln, rc + ln, dtype=torch.bool)
            padded[rr : rr + s, rc : rc + s] = local
            nbs = padded.shape[0] // b
            m = padded[: nbs * b, : nbs * b].view(nbs, b, nbs, b)
            dens = m.sum(1) / b
            frac = (dens > 1 / 3).sum(-1) / ((dens > 0).sum(-1) + 1e-9)
            blk = frac > 0.6
            r0, c0 = (i * s) // b, (j * s) // b
            r1, c1 = min(r0 + nbs, nb), min(c0 + nbs, nb)
            final[r0:r1, c0:c1] |= blk[: r1 - r0, : c1 - c0]
    return final


def _pair_local(i, j, s, decay, sink, b):
    """Official token mask [s, s] of frame pair (i, j) (query frame i, key frame j)."""
    r = torch.arange(s).view(-1, 1)
    c = torch.arange(s).view(1, -1)
    d = abs(i - j)
    g = d.bit_length()
    if sink and j == 0:
        return torch.ones(s, s, dtype=torch.bool)
    width = s if d <= 1 else max(2 ** s.bit_length() / 2**g * decay, b)
    local = (c - r).abs() <= width
    decay_len = 2 ** s.bit_length() / 2**g
    if decay_len < b and d % int(b / decay_len) != 0:
        local = torch.zeros(s, s, dtype=torch.bool)
    return local


def _tail_row_oracle(frames, s, decay, sink, b):
    """The partial last block row (visual tokens only): per frame pair, the pair's token mask over the
    tail's REAL rows; a key block is kept when > 60% of its non-empty columns are seen by > 1/3 of
    those rows. Token loops, independent of the module."""
    nv = frames * s
    nb = math.ceil(nv / b)
    r0 = (nv // b) * b
    n_tail = nv - r0
    row = torch.zeros(nb, dtype=torch.bool)
    for i in range(frames):
        rows = [t - i * s for t in range(r0, nv) if i * s <= t < (i + 1) * s]
        if not rows:
            continue
        for j in range(frames):
            local = _pair_local(i, j, s, decay, sink, b)[rows]  # [len(rows), s]
            count = local.sum(0)  # per key column of frame j
            for blk in range(nb):
                cols = [t - j * s for t in range(blk * b, min((blk + 1) * b, nv)) if j * s <= t < (j + 1) * s]
                if not cols:
                    continue
                cnt = count[cols]
                nonzero = int((cnt > 0).sum())
                high = int((cnt * 3 > n_tail).sum())
                if high * 5 > nonzero * 3:
                    row[blk] = True
    return row


def _expected(f, h, w, t, decay, sink, b):
    """Official mask on full rows, the tail oracle on a partial last row, diagonal on empty rows."""
    s = h * w
    ref = _official_block_mask(f, s, t, decay, sink, b)
    nv = f * s
    if t == 0 and nv % b:
        ref[nv // b] = _tail_row_oracle(f, s, decay, sink, b)
    empty = ~ref.any(1)
    return ref | torch.diag(empty)


CASES = [
    # (frames, height, width, text, decay, sink, block)
    (8, 4, 6, 0, 0.2, True, 16),  # Wan-style tiny: 24 tokens/frame
    (8, 16, 16, 0, 1.0, True, 128),  # official block size, 256 tokens/frame
    (7, 16, 24, 0, 0.2, True, 128),
    (7, 5, 9, 0, 0.95, False, 32),  # odd everything, tail block
    (9, 7, 13, 40, 0.95, False, 64),  # HunyuanVideo-style text tail, odd sizes
    (13, 8, 15, 0, 0.5, True, 16),  # many frames: thinned far pairs
    (5, 3, 3, 17, 0.8, False, 16),  # frames smaller than a block
    (21, 6, 11, 0, 0.2, True, 64),
]


@pytest.mark.parametrize("f,h,w,t,decay,sink,b", CASES)
def test_mask_matches_official_rules(f, h, w, t, decay, sink, b):
    ours = radial_block_mask((f, h, w), t, decay_factor=decay, attention_sink=sink, block_size=b)
    ref = _official_block_mask(f, h * w, t, decay, sink, b)
    nv = f * h * w
    full = nv // b if (t == 0 and nv % b) else ref.shape[0]  # block rows with block_size real rows
    assert bool(ref[:full].any(1).all())  # no empty full row: the empty-row guard does not apply here
    assert torch.equal(ours[:full], ref[:full])  # the official mask on every full row
    assert torch.equal(ours, _expected(f, h, w, t, decay, sink, b))  # and the tail rule on the last row
    assert 0 < ours.float().mean() <= 1


@pytest.mark.parametrize("f,h,w", [(5, 7, 11), (5, 4, 20), (5, 9, 18), (3, 9, 19)])  # N mod 128 = 1, 16, 42, 1
@pytest.mark.parametrize("sink", [True, False])
def test_tail_block_row_at_official_block_size(f, h, w, sink):
    """N mod 128 in {1, 16, 42}: full rows are official; the tail's tokens see their own frame's band
    and (Wan) the sink frame, not only themselves as with the 128-row density."""
    s, b = h * w, 128
    nv = f * s
    tail = nv // b
    assert nv % b in (1, 16, 42)
    ours = radial_block_mask((f, h, w), 0, decay_factor=0.2, attention_sink=sink, block_size=b)
    ref = _official_block_mask(f, s, 0, 0.2, sink, b)
    exp = ref.clone()
    for r in torch.nonzero(~ref[:tail].any(1)).flatten().tolist():
        exp[r, r] = True  # the empty-row guard
    assert torch.equal(ours[:tail], exp[:tail])
    assert torch.equal(ours[tail], _tail_row_oracle(f, s, 0.2, sink, b))
    assert int(ours[tail].sum()) >= 2  # more than the diagonal block
    assert bool(ours[tail, (nv - s) // b])  # the last frame's own first block (dense d = 0 pair)
    if sink:
        assert bool(ours[tail, 0])  # the attention sink (frame 0)
    assert not bool(ref[tail].any()) or nv % b > 42  # the 128-row density drops short tails entirely


def test_official_empty_rows_with_large_frames_keep_their_diagonal():
    """Frame boundaries inside blocks can leave official block rows empty with frames far larger than
    a block (416x624 Wan: 1014 tokens per frame, ~7.9 blocks); small analogue: 63 tokens, block 16."""
    f, h, w, b = 5, 7, 9, 16
    ref = _official_block_mask(f, h * w, 0, 0.2, True, b)
    empty = ~ref.any(1)
    assert bool(empty[: (f * h * w) // b].any())  # full rows of the OFFICIAL mask are empty
    ours = radial_block_mask((f, h, w), 0, decay_factor=0.2, attention_sink=True, block_size=b)
    assert torch.equal(ours, _expected(f, h, w, 0, 0.2, True, b))
    assert bool(ours.any(1).all())


def test_empty_rows_keep_their_diagonal_block():
    """Frames of 24 tokens in 128-token blocks: the official rule drops every block (density 24/128
    < 1/3), which would leave queries without keys; our guard keeps the diagonal blocks only."""
    ref = _official_block_mask(3, 24, 0, 0.2, True, 128)
    assert not bool(ref.any())
    ours = radial_block_mask((3, 4, 6), 0, decay_factor=0.2, attention_sink=True, block_size=128)
    assert torch.equal(ours, torch.eye(1, dtype=torch.bool))
    ref = _official_block_mask(20, 12, 0, 0.5, False, 64)
    ours = radial_block_mask((20, 3, 4), 0, decay_factor=0.5, attention_sink=False, block_size=64)
    assert bool((~ref.any(1)).any())
    assert torch.equal(ours, _expected(20, 3, 4, 0, 0.5, False, 64))


def test_mask_is_sparse_and_logarithmic():
    """Density falls as frames grow (O(n log n) budget): 16 -> 64 frames at least halves it."""
    d16 = radial_block_mask((16, 16, 32), 0, decay_factor=1.0, attention_sink=False).float().mean()
    d64 = radial_block_mask((64, 16, 32), 0, decay_factor=1.0, attention_sink=False).float().mean()
    assert d64 < 0.5 * d16 < 0.5


def _ctx(layout, step=20, layer=3, num_layers=8, heads=2, batch=1):
    return AttnContext(
        layer=layer,
        num_layers=num_layers,
        step=step,
        timestep=None,
        layout=layout,
        batch=batch,
        heads=heads,
        head_dim=16,
        device=torch.device("cpu"),
        dtype=torch.float32,
        state={},
    )


def test_family_defaults():
    r = Radial()
    assert r.resolved("wan") == {"dense_layers": 1, "dense_steps": 12, "decay_factor": 0.2, "attention_sink": True}
    assert r.resolved("hunyuan_video") == {
        "dense_layers": 0,
        "dense_steps": 12,
        "decay_factor": 0.95,
        "attention_sink": False,
    }
    assert Radial(decay_factor=0.5, dense_steps=3).resolved("wan")["decay_factor"] == 0.5


def test_dense_steps_and_layers_switch():
    wan = TokenLayout((8, 16, 16), family="wan")
    r = Radial()
    assert r.plan(_ctx(wan, step=11, layer=5), AttnPlan()).layout is None
    assert r.plan(_ctx(wan, step=12, layer=5), AttnPlan()).layout is not None
    assert r.plan(_ctx(wan, step=30, layer=0), AttnPlan()).layout is None  # Wan: 1 dense layer
    hy = TokenLayout((8, 16, 16), text_len=20, family="hunyuan_video")
    assert r.plan(_ctx(hy, step=12, layer=0), AttnPlan()).layout is not None  # HunyuanVideo: 0 layers
    r2 = Radial(dense_steps=2, dense_layers=0, dense_last_steps=3, num_steps=10)
    dense = [r2.plan(_ctx(wan, step=s, layer=0), AttnPlan()).layout is None for s in range(10)]
    assert dense == [True, True, False, False, False, False, False, True, True, True]
    with pytest.raises(ValueError, match="num_steps"):
        Radial(dense_last_steps=2).plan(_ctx(wan, step=20), AttnPlan())


def test_mask_is_cached():
    r = Radial(dense_steps=0)
    lay = TokenLayout((8, 16, 16), family="wan")
    a = r.plan(_ctx(lay), AttnPlan()).layout
    b = r.plan(_ctx(lay, layer=5), AttnPlan()).layout
    assert a is b


def test_density_equals_token_level_count():
    """BlockLayout.density equals the token pairs inside kept blocks (tail clipped), counted here."""
    lay = TokenLayout((13, 5, 9), text_len=11, family="hunyuan_video")
    r = Radial(block_size=16, dense_steps=0)
    bl = r.plan(_ctx(lay), AttnPlan()).layout
    bm = r.block_mask(lay)
    n = lay.seq_len
    sizes = torch.tensor([min(16, n - i * 16) for i in range(bm.shape[0])], dtype=torch.float64)
    expected = (bm.double() * sizes[:, None] * sizes[None, :]).sum() / n**2
    assert abs(bl.density - expected.item()) < 1e-6
    assert bl.density < 0.8


def _run_plan(plan, q, k, v):
    if plan.perm is not None:
        q, k, v = (x[:, :, plan.perm] for x in (q, k, v))
    out = attn_kernels.attention(q, k, v, plan.layout, backend="reference")
    if plan.perm is not None:
        out = out[:, :, torch.argsort(plan.perm)]
    return out


def _rand(n, heads=2, d=16):
    return [torch.randn(1, heads, n, d) for _ in range(3)]


def test_huge_decay_keeps_all_blocks_and_equals_dense():
    lay = TokenLayout((4, 8, 8), text_len=9, text_first=True, family="cogvideox")
    r = Radial(decay_factor=1e6, dense_steps=0, dense_layers=0, attention_sink=False, block_size=16)
    plan = r.plan(_ctx(lay), AttnPlan())
    assert plan.layout is not None and plan.perm is not None
    assert bool(plan.layout.to_block_mask().all())
    q, k, v = _rand(lay.seq_len)
    out = _run_plan(plan, q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sparse_plan_equals_masked_attention_in_original_order():
    """Text-first layout: the perm puts text last; the result equals SDPA with the mask mapped back."""
    lay = TokenLayout((6, 4, 6), text_len=7, text_first=True, family="cogvideox")
    r = Radial(decay_factor=0.3, dense_steps=0, dense_layers=0, attention_sink=False, block_size=16)  # CogVideoX
    plan = r.plan(_ctx(lay), AttnPlan())
    n = lay.seq_len
    tok = plan.layout.to_token_mask(0, 0)
    assert tok.float().mean() < 0.95  # really sparse
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[plan.perm[:, None], plan.perm[None, :]] = tok
    assert bool(mask[: lay.text_len].all()) and bool(mask[:, : lay.text_len].all())  # text dense
    q, k, v = _rand(n)
    out = _run_plan(plan, q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        ({"decay_factor": 0.0}, ValueError, "decay_factor"),
        ({"decay_factor": "big"}, TypeError, "decay_factor"),
        ({"dense_steps": -1}, ValueError, "dense_steps"),
        ({"dense_layers": 1.5}, TypeError, "dense_layers"),
        ({"block_size": 100}, ValueError, "block_size"),
        ({"attention_sink": 1}, TypeError, "attention_sink"),
        ({"dense_last_steps": -2}, ValueError, "dense_last_steps"),
    ],
)
def test_bad_parameters(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        Radial(**kw)

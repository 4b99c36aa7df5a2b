"""Neighborhood attention / GNA: equals a brute-force NA written here from the definition (and
natten.na3d / na2d when natten is installed); tiles, densities, text and errors."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import attn_kernels  # part of this repository: a missing package must fail, not skip
from diffusion_attn.variants import AttnContext, AttnPlan, Neighborhood, TokenLayout
from diffusion_attn.variants.neighborhood import choose_tile_shape


# -- brute force from the definition (NATTEN 0.21 window rules) -------------------------------
def _window_1d(x, n, k, s, d, causal):
    """Keys (absolute indices) of query x along one dimension."""
    g, p = x % d, x // d
    members = list(range(g, n, d))  # positions of x's dilation group
    ng = len(members)
    if causal:
        leader = min((p // s) * s + s - 1, ng - 1)
        lo = max(0, leader - k + 1)
        return {members[j] for j in range(lo, p + 1)}
    leader = min((p // s) * s + s // 2, ng - 1)
    start = min(max(leader - k // 2, 0), ng - k)
    return {members[j] for j in range(start, start + k)}


def _brute_mask(layout, k, s, d, c):
    f, h, w = layout.grid
    n = layout.seq_len
    v0 = layout.visual_slice.start
    m = torch.ones(n, n, dtype=torch.bool)
    m[layout.visual_slice, layout.visual_slice] = False
    for qt, qh, qw in itertools.product(range(f), range(h), range(w)):
        qi = v0 + (qt * h + qh) * w + qw
        wins = [_window_1d(x, e, *args) for x, e, args in zip((qt, qh, qw), (f, h, w), zip(k, s, d, c))]
        for kt, kh, kw in itertools.product(*wins):
            m[qi, v0 + (kt * h + kh) * w + kw] = True
    return m


def _ctx(layout, heads=2):
    return AttnContext(0, 1, 0, None, layout, 1, heads, 16, torch.device("cpu"), torch.float32, {})


def _run(variant, layout, q, k, v):
    plan = variant.plan(_ctx(layout, q.shape[1]), AttnPlan())
    if plan.perm is not None:
        q, k, v = (x[:, :, plan.perm] for x in (q, k, v))
    out = attn_kernels.attention(q, k, v, plan.layout, backend="reference")
    if plan.perm is not None:
        out = out[:, :, torch.argsort(plan.perm)]
    return out, plan


def _rand(n, heads=2, d=16):
    return [torch.randn(1, heads, n, d) for _ in range(3)]


CONFIGS = [
    # grid, text, text_first, kernel, stride, dilation, causal
    ((4, 6, 8), 0, False, (3, 3, 5), (1, 1, 1), (1, 1, 1), (False, False, False)),
    ((5, 7, 6), 0, False, (3, 4, 3), (2, 3, 1), (1, 1, 2), (False, False, False)),
    ((6, 5, 9), 5, False, (2, 5, 3), (2, 2, 3), (3, 1, 2), (True, False, False)),
    ((3, 9, 7), 6, True, (3, 3, 2), (3, 1, 2), (1, 3, 3), (False, False, True)),
    ((7, 4, 5), 0, False, (4, 2, 5), (4, 2, 4), (1, 2, 1), (True, True, False)),
]


@pytest.mark.parametrize("grid,t,tf,k,s,d,c", CONFIGS)
def test_equals_brute_force(grid, t, tf, k, s, d, c):
    lay = TokenLayout(grid, text_len=t, text_first=tf)
    na = Neighborhood(kernel_size=k, stride=s, dilation=d, is_causal=c, block_size=16)
    brute = _brute_mask(lay, k, s, d, c)
    assert torch.equal(na.token_mask(lay), brute)
    q, kk, v = _rand(lay.seq_len)
    out, plan = _run(na, lay, q, kk, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, v, attn_mask=brute)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # density: BlockLayout (element masks included) vs the brute-force pair count
    assert abs(plan.layout.density - brute.float().mean().item()) < 1e-6


def test_random_configs_mask_equals_brute_force():
    rng = random.Random(0)
    for _ in range(25):
        grid = tuple(rng.randint(1, 8) for _ in range(3))
        k = tuple(rng.randint(1, g) for g in grid)
        s = tuple(rng.randint(1, x) for x in k)
        d = tuple(rng.randint(1, g // x) for g, x in zip(grid, k))
        c = tuple(rng.random() < 0.3 for _ in range(3))
        lay = TokenLayout(grid)
        na = Neighborhood(kernel_size=k, stride=s, dilation=d, is_causal=c)
        assert torch.equal(na.token_mask(lay), _brute_mask(lay, k, s, d, c)), (grid, k, s, d, c)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_against_natten():
    natten = pytest.importorskip("natten")
    rng = random.Random(1)
    for it in range(4):
        grid = tuple(rng.randint(2, 7) for _ in range(3))
        k = tuple(rng.randint(2, g) for g in grid)
        s = tuple(rng.randint(1, x) for x in k)
        d = tuple(rng.randint(1, g // x) for g, x in zip(grid, k))
        c = (it % 2 == 1, False, False)
        lay = TokenLayout(grid)
        q, kk, v = _rand(lay.seq_len, heads=1)
        out, _ = _run(Neighborhood(kernel_size=k, stride=s, dilation=d, is_causal=c, block_size=16), lay, q, kk, v)

        def hl(x, grid=grid):
            return x[0].permute(1, 0, 2).reshape(1, *grid, 1, -1)

        ref = natten.na3d(hl(q), hl(kk), hl(v), kernel_size=k, stride=s, dilation=d, is_causal=c)
        torch.testing.assert_close(out[0].permute(1, 0, 2).reshape(1, *grid, 1, -1), ref, atol=1e-4, rtol=1e-4)
    # 2-D: an image layout (frames = 1); the int kernel applies to height and width only
    lay = TokenLayout((1, 9, 7))
    q, kk, v = _rand(lay.seq_len, heads=1)
    out, _ = _run(Neighborhood(kernel_size=5, stride=2, dilation=1, block_size=16), lay, q, kk, v)

    def hl2(x):
        return x[0].permute(1, 0, 2).reshape(1, 9, 7, 1, -1)

    ref = natten.na2d(hl2(q), hl2(kk), hl2(v), kernel_size=5, stride=2)
    torch.testing.assert_close(out[0].permute(1, 0, 2).reshape(1, 9, 7, 1, -1), ref, atol=1e-4, rtol=1e-4)


def test_full_window_equals_dense():
    lay = TokenLayout((3, 6, 10), text_len=8, text_first=True)
    na = Neighborhood(kernel_size=(3, 6, 10), block_size=32)
    q, k, v = _rand(lay.seq_len)
    out, plan = _run(na, lay, q, k, v)
    assert plan.layout.density == pytest.approx(1.0)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_small_window_changes_output_and_density():
    lay = TokenLayout((4, 8, 8))
    na = Neighborhood(kernel_size=3, block_size=64)
    q, k, v = _rand(lay.seq_len)
    out, plan = _run(na, lay, q, k, v)
    brute = _brute_mask(lay, (3,) * 3, (1,) * 3, (1,) * 3, (False,) * 3)
    assert plan.layout.density == pytest.approx(brute.float().mean().item())
    assert (out - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2


def test_tile_permutation_makes_blocks_tiles():
    """Pad-free tile when the grid allows (volume = block size), chosen to visit the fewest blocks;
    with an explicit tile each block of the permuted sequence is exactly one 3-D tile."""
    lay = TokenLayout((4, 12, 20))  # raster blocks of 64 tokens straddle rows of 20
    na = Neighborhood(kernel_size=(3, 5, 5), block_size=64)
    tile = choose_tile_shape(lay.grid, 64, na.dim_masks(lay.grid))
    assert math.prod(tile) == 64 and all(g % t == 0 for g, t in zip(lay.grid, tile))
    plan = na.plan(_ctx(lay), AttnPlan())
    raster = Neighborhood(kernel_size=(3, 5, 5), block_size=64, permute=False).plan(_ctx(lay), AttnPlan())
    assert raster.perm is None
    assert plan.perm is not None and sorted(plan.perm.tolist()) == list(range(lay.seq_len))
    assert plan.layout.block_density < 0.8 * raster.layout.block_density
    assert plan.layout.density == pytest.approx(raster.layout.density)  # same attention, other order
    cube = Neighborhood(kernel_size=3, block_size=64, tile_shape=(4, 4, 4)).plan(_ctx(lay), AttnPlan())
    for blk in range(0, lay.seq_len, 64):
        idx = cube.perm[blk : blk + 64]
        t, y, x = idx // 240, (idx // 20) % 12, idx % 20
        spans = [int(c.max() - c.min()) + 1 for c in (t, y, x)]
        assert spans == [4, 4, 4] and int(t.min()) % 4 == int(y.min()) % 4 == int(x.min()) % 4 == 0


def test_text_is_global():
    lay = TokenLayout((4, 5, 6), text_len=7)
    m = Neighborhood(kernel_size=2).token_mask(lay)
    ts = lay.text_slice
    assert bool(m[ts].all()) and bool(m[:, ts].all())


def test_causal_in_time():
    lay = TokenLayout((6, 3, 3))
    m = Neighborhood(kernel_size=(3, 3, 3), is_causal=(True, False, False)).token_mask(lay)
    t = torch.arange(lay.num_visual) // 9
    assert not bool((m & (t[None, :] > t[:, None])).any())  # never sees the future
    assert bool(m[t == 5][:, t == 3].any()) and not bool(m[t == 5][:, t == 2].any())  # 3 frames back


@pytest.mark.parametrize(
    "kw,grid,exc,msg",
    [
        (
            {"kernel_size": (3, 7, 3)},
            (4, 6, 8),
            ValueError,
            r"kernel_size\[1\] \(height, extent 6\) must be in \[1, 6\]",
        ),
        ({"kernel_size": 3, "stride": (1, 4, 1)}, (4, 6, 8), ValueError, r"stride\[1\].*\[1, kernel_size=3\]"),
        (
            {"kernel_size": 3, "dilation": (1, 1, 3)},
            (4, 6, 8),
            ValueError,
            r"dilation\[2\] \(width, extent 8\) must be in \[1, 2\]",
        ),
        ({"kernel_size": 9}, (4, 6, 8), ValueError, r"kernel_size\[0\] \(frames, extent 4\)"),
    ],
)
def test_bad_parameters_need_layout(kw, grid, exc, msg):
    na = Neighborhood(**kw)
    with pytest.raises(exc, match=msg):
        na.plan(_ctx(TokenLayout(grid)), AttnPlan())


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        ({"kernel_size": 0}, ValueError, r"kernel_size\[0\]"),
        ({"kernel_size": 2.5}, TypeError, "kernel_size"),
        ({"kernel_size": (3, 3)}, TypeError, "3-tuple"),
        ({"stride": (1, 0, 1)}, ValueError, r"stride\[1\] \(height\)"),
        ({"is_causal": (True, 1, False)}, TypeError, r"is_causal\[1\]"),
        ({"block_size": 48}, ValueError, "block_size"),
    ],
)
def test_bad_parameters(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        Neighborhood(**kw)


def test_int_kernel_on_image_layout():
    lay = TokenLayout((1, 6, 6))
    m = Neighborhood(kernel_size=3).token_mask(lay)
    assert torch.equal(m, _brute_mask(lay, (1, 3, 3), (1, 1, 1), (1, 1, 1), (False,) * 3))
    with pytest.raises(ValueError, match="frames, extent 1"):
        Neighborhood(kernel_size=(3, 3, 3)).plan(_ctx(lay), AttnPlan())

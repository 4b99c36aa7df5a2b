"""UltraViCo and RIFLEx (issue 11): length extrapolation on every video adapter, on tiny real models.

Logits are checked against an oracle written here from the rule (not from the variant's code): the attention
runtime's inputs (q, k, v after RoPE, in the canonical token order) and output are captured, and the output
must equal softmax(rule(q k^T * scale)) v computed in float64."""

from __future__ import annotations

import math

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.adapters.base import AttnRuntime

from .tiny import BUILDERS, run, tiny_hunyuan_video, tiny_wan

VIDEO = ("wan", "hunyuan_video", "cogvideox", "ltx_video")
TEXT = {"wan": (0, False), "hunyuan_video": (9, False), "cogvideox": (6, True), "ltx_video": (0, False)}


def build(family, frames):
    if family == "ltx_video":
        return BUILDERS[family](frames, 4, 6)
    return BUILDERS[family](frames)


@pytest.fixture
def runtime_calls(monkeypatch):
    """(q, k, v, out) in [B, N, H, D] of every call through attnplug's kernel (canonical token order)."""
    seen = []
    orig = AttnRuntime._kernel

    def spy(self, plan, q, k, v, key_mask, gather, *, run_after=True):
        out = orig(self, plan, q, k, v, key_mask, gather, run_after=run_after)
        seen.append((q.detach().double(), k.detach().double(), v.detach().double(), out.detach().double(), key_mask))
        return out

    monkeypatch.setattr(AttnRuntime, "_kernel", spy)
    return seen


def rule_logits(q, k, layout_text, alpha, window, beta=None, bands=()):
    """The UltraViCo rule, written from the paper's statement: s = q.k / sqrt(d); for visual pairs with token
    distance > window and s > 0, s *= alpha (beta on the harmonic bands); text rows and columns untouched."""
    text_len, text_first = layout_text
    n = q.shape[1]
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    nv = n - text_len
    vis = torch.zeros(n, dtype=torch.bool)
    if text_first:
        vis[text_len:] = True
    else:
        vis[:nv] = True
    idx = torch.cumsum(vis.long(), 0) - 1  # visual order index
    d = (idx[:, None] - idx[None, :]).abs()
    both = vis[:, None] & vis[None, :]
    far = both & (d > window)
    band = torch.zeros_like(far)
    for a, b in bands:
        band |= both & (d >= a) & (d <= b)
    factor = torch.ones(n, n, dtype=torch.float64)
    factor[far] = alpha
    if beta is not None:
        factor[band] = beta
    return torch.where(s > 0, s * factor, s), s, (far & ~band if beta is not None else far), band


def oracle(q, k, v, logits, key_mask=None):
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    p = torch.softmax(logits, -1)
    return torch.einsum("bhnm,bmhd->bnhd", p, v)


# -- within the training length: the model's own attention --------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO)
def test_within_training_length_is_dense_exactly(family):
    model, inputs = build(family, 3)
    ref = run(model, inputs)
    with da.apply(model, da.UltraViCo()) as handle:  # family default training length >> 3 frames
        assert torch.equal(run(model, inputs), ref) and handle.attention_calls == 0
    with da.apply(model, da.UltraViCo(train_frames=3)) as handle:  # exactly the training length
        assert torch.equal(run(model, inputs), ref) and handle.attention_calls == 0


# -- beyond it: the rule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO)
def test_beyond_training_length_logits_follow_the_rule(family, runtime_calls):
    model, inputs = build(family, 5)
    alpha = 0.7
    with da.apply(model, da.UltraViCo(alpha=alpha, train_frames=2)) as handle:
        run(model, inputs)
        f, h, w = handle.runtimes[0].grid
    window = h * w * 2 // 2  # tokens_per_frame * train_frames / 2
    assert len(runtime_calls) == len(handle.adapter.attention_modules(model))
    for q, k, v, out, km in runtime_calls:
        got, s, far, _ = rule_logits(q, k, TEXT[family], alpha, window)
        # the rule on the raw logits: positive far visual pairs scaled, negative ones and text untouched
        assert (far & (s > 0)).any() and (far & (s < 0)).any() and (~far).any()
        pos, neg = (s > 0) & far, (s <= 0) | ~far
        torch.testing.assert_close(got[pos], alpha * s[pos])
        assert torch.equal(got[neg], s[neg])
        if TEXT[family][0]:
            text = slice(0, 6) if TEXT[family][1] else slice(q.shape[1] - 9, q.shape[1])
            assert torch.equal(got[:, :, text], s[:, :, text]) and torch.equal(got[:, :, :, text], s[:, :, :, text])
        # and the kernel computed exactly this softmax
        torch.testing.assert_close(out, oracle(q, k, v, got, km), atol=2e-6, rtol=1e-5)
        assert not torch.allclose(out, oracle(q, k, v, s, km), atol=1e-4)  # the decay matters


def test_window_follows_the_actual_grid_and_family_defaults():
    from diffusion_attn.variants.base import TokenLayout

    v = da.UltraViCo()
    wan480 = TokenLayout((41, 30, 52), family="wan")  # 161 frames at 480x832: the official 1560 x 21 / 2
    assert v.threshold(wan480) == 1560 * 21 // 2 and v.applies(wan480)
    assert v.threshold(TokenLayout((41, 45, 80), family="wan")) == 3600 * 21 // 2  # 720p: the window scales
    assert not v.applies(TokenLayout((21, 30, 52), family="wan"))  # 81 frames: the training length
    hv = TokenLayout((65, 34, 60), text_len=256, family="hunyuan_video")  # 257 frames at 544x960
    assert v.threshold(hv) == 2040 * 33 // 2 and v.resolved("hunyuan_video")["beta"] == 0.6
    assert v.bands(hv) == [(46 * 2040, 54 * 2040)]  # official: [46, 54] x STEP (and 96.. once the video reaches it)
    assert da.UltraViCo(window=100).threshold(hv) == 100
    assert da.UltraViCo(beta=0.9).bands(hv) == []  # beta == alpha: no band


def test_hunyuan_beta_band_merges_two_passes_exactly(runtime_calls):
    """beta on frame distances within `harmonic_width` of multiples of the period: a second kernel pass on a
    disjoint block layout, merged by log-sum-exp, equals the one-softmax oracle (padded text keys masked)."""
    model, inputs = tiny_hunyuan_video(frames=12)
    alpha, beta, period, width = 0.8, 0.5, 5, 1
    var = da.UltraViCo(alpha=alpha, beta=beta, train_frames=2, harmonic_period=period, harmonic_width=width,
                       block_size=16)  # fmt: skip
    with da.apply(model, var) as handle:
        run(model, inputs)
    tpf = 16
    bands = [((j * period - width) * tpf, (j * period + width) * tpf) for j in (1, 2)]
    assert var.bands(handle.runtimes[0].layout(9, False)) == bands
    for q, k, v, out, km in runtime_calls:
        got, s, far, band = rule_logits(q, k, TEXT["hunyuan_video"], alpha, tpf * 2 // 2, beta, bands)
        assert (band & (s > 0)).any() and (far & (s > 0)).any()
        torch.testing.assert_close(out, oracle(q, k, v, got, km), atol=2e-6, rtol=1e-5)


def test_band_layouts_partition_the_pairs():
    from diffusion_attn.variants.base import TokenLayout
    from diffusion_attn.variants.ultravico import band_layouts, harmonic_bands

    for lay, block in (
        (TokenLayout((12, 3, 5), text_len=7), 16),
        (TokenLayout((9, 4, 4), text_len=5, text_first=True), 32),
    ):
        bands = harmonic_bands(lay.frames, lay.tokens_per_frame, 4, 1)
        main, band = band_layouts(lay, bands, block)
        m, b = main.to_token_mask(), band.to_token_mask()
        assert not (m & b).any() and (m | b).all()
        pos = torch.full((lay.seq_len,), -1)
        pos[lay.visual_slice] = torch.arange(lay.num_visual)
        d = (pos[:, None] - pos[None, :]).abs()
        want = torch.zeros_like(b)
        for a, c in bands:
            want |= (d >= a) & (d <= c)
        want &= (pos[:, None] >= 0) & (pos[None, :] >= 0)
        assert torch.equal(b, want)


def test_composes_with_a_sparsity_variant(runtime_calls):
    """UltraViCo + GNA (which permutes tokens into tiles) in one apply, UltraViCo listed first: GNA's mask,
    UltraViCo's logits at the canonical positions (sparsity variants plan first)."""
    model, inputs = tiny_wan(frames=5)
    gna = da.Neighborhood(kernel_size=(3, 3, 3), block_size=16)
    alpha = 0.6
    with da.apply(model, da.UltraViCo(alpha=alpha, train_frames=2), gna) as handle:
        run(model, inputs)
        lay = handle.runtimes[0].layout(0, False)
        plan = handle.runtimes[0].plan(1, lay, 1, 2, 16, torch.device("cpu"), torch.float32)
    assert plan.perm is not None and len(plan.modifiers) == 1
    mask = plan.layout.to_token_mask()[plan.inv][:, plan.inv]  # canonical order
    for q, k, v, out, _ in runtime_calls:
        got, s, far, _ = rule_logits(q, k, (0, False), alpha, lay.tokens_per_frame)
        assert (far & mask & (s > 0)).any()
        torch.testing.assert_close(out, oracle(q, k, v, got.masked_fill(~mask, -math.inf)), atol=2e-6, rtol=1e-5)


# -- bad inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"alpha": 0.0}, r"UltraViCo.alpha must be > 0 and <= 1 \(a logit multiplier\), got 0.0"),
        ({"alpha": -0.5}, r"UltraViCo.alpha must be > 0 and <= 1 .*got -0.5"),
        ({"alpha": 1.5}, r"UltraViCo.alpha must be > 0 and <= 1 .*got 1.5"),
        ({"alpha": math.nan}, r"UltraViCo.alpha must be > 0 and <= 1 .*got nan"),
        ({"beta": 0}, r"UltraViCo.beta must be > 0 and <= 1"),
        ({"train_frames": 0}, r"UltraViCo.train_frames must be an int >= 1, got 0"),
        ({"window": -1}, r"UltraViCo.window must be an int >= 0, got -1"),
        ({"harmonic_period": 4, "harmonic_width": 4}, r"UltraViCo.harmonic_width must be < harmonic_period \(4\)"),
        ({"block_size": 48}, r"UltraViCo.block_size must be one of \(16, 32, 64, 128\)"),
    ],
)
def test_bad_options_are_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        da.UltraViCo(**kw)


def test_refusals_leave_the_model_untouched():
    model, inputs = tiny_hunyuan_video(frames=3)
    ref = run(model, inputs)
    procs = [m.processor for _, m in da.find_adapter(model).attention_modules(model)]
    with pytest.raises(ValueError, match=r"UltraViCo.beta=0.6 \(hunyuan_video's RoPE-harmonic band\) .* 'radial'"):
        da.apply(model, da.Radial(), da.UltraViCo())
    with pytest.raises(ValueError, match=r"RIFLEx.k must be in \[1, 2\] .*got 4"):  # tiny rope: 2 temporal frequencies
        da.apply(model, da.RIFLEx())
    flux, _ = BUILDERS["flux"]()
    with pytest.raises(ValueError, match="variant 'ultravico' does not support model family 'flux'"):
        da.apply(flux, da.UltraViCo())
    assert [m.processor for _, m in da.find_adapter(model).attention_modules(model)] == procs
    assert not hasattr(model, "_diffusers_hook") and not hasattr(model.rope, "_diffusers_hook")
    assert torch.equal(run(model, inputs), ref)
    with da.apply(model, da.Radial(), da.UltraViCo(beta=0.9)):  # beta == alpha: no band, composes
        run(model, inputs)


# -- RIFLEx --------------------------------------------------------------------------------------------------------
def riflex_freqs(dim, pos, theta, k, length, dtype):
    """RIFLEx's temporal frequencies, from the paper's rule (official get_1d_rotary_pos_embed_riflex)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype)[: dim // 2] / dim))
    freqs[k - 1] = 0.9 * 2 * torch.pi / length
    f = torch.outer(pos.to(dtype), freqs)
    return f.cos().repeat_interleave(2, dim=1).float(), f.sin().repeat_interleave(2, dim=1).float()


def _rope_out(model, family, inputs):
    if family == "cogvideox":
        return inputs["image_rotary_emb"]
    out = model.rope(inputs["hidden_states"])
    return tuple(x.reshape(-1, x.shape[-1]) for x in out)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox"])
def test_riflex_sets_the_intrinsic_frequency(family):
    """Only the k-th temporal frequency changes (to 0.9 * 2 pi / L), exactly the official rule; only beyond the
    intrinsic period unless always=True; remove() restores the model's RoPE bit for bit."""
    frames = 6
    model, inputs = BUILDERS[family](frames)
    before = _rope_out(model, family, inputs)
    ref = run(model, inputs)
    from diffusion_attn.variants.riflex import rope_axis

    d_t, theta, dtype = rope_axis(family, model)
    k = 2
    seen = []
    if family == "cogvideox":  # the pipeline's rotary embedding, as the blocks receive it
        hook = model.transformer_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["image_rotary_emb"]), with_kwargs=True
        )
    else:  # the rope module's output, as the transformer receives it
        hook = model.rope.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        period = da.RIFLEx(k=k).period(d_t, theta, family)
        assert period >= frames  # tiny rope: the period exceeds this video, so the default does nothing
        with da.apply(model, da.RIFLEx(k=k)):
            assert torch.equal(run(model, inputs), ref)
        with da.apply(model, da.RIFLEx(k=k, always=True)):
            out = run(model, inputs)
        got = tuple(x.reshape(-1, x.shape[-1]) for x in seen[-1])
    finally:
        hook.remove()
    if family == "cogvideox":
        pos = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    else:
        pos = torch.arange(frames)
    exp = riflex_freqs(d_t, pos, theta, k, frames, dtype)
    per_frame = got[0].shape[0] // frames
    for g, b, e in zip(got, before, exp):
        assert torch.equal(g[:, d_t:], b[:, d_t:]) and torch.equal(g[:, : 2 * (k - 1)], b[:, : 2 * (k - 1)])
        assert torch.equal(g[:, 2 * k : d_t], b[:, 2 * k : d_t])
        assert torch.equal(g[:, :d_t], e.repeat_interleave(per_frame, 0))
    assert not torch.equal(out, ref)
    assert torch.equal(run(model, inputs), ref)
    if family != "cogvideox":
        assert not hasattr(model.rope, "_diffusers_hook") and "forward" not in model.rope.__dict__


def test_riflex_applies_beyond_the_period_and_uses_the_given_length():
    model, inputs = tiny_wan(frames=6)
    from diffusion_attn.variants.riflex import rope_axis

    d_t, theta, dtype = rope_axis("wan", model)
    v = da.RIFLEx(k=2, frames=100)
    assert v.period(d_t, theta, "wan") == round(2 * math.pi / (1 / theta ** (2 / d_t))) == 63
    assert v.columns(6, 4, d_t, theta, dtype, "wan") is not None  # L = 100 > N_k = 63
    assert da.RIFLEx(k=2).columns(6, 4, d_t, theta, dtype, "wan") is None  # 6 frames < N_k
    cos, _ = v.columns(6, 4, d_t, theta, dtype, "wan")
    assert torch.equal(cos[::4, 0], torch.cos(torch.arange(6, dtype=torch.float64) * (0.9 * 2 * math.pi / 100)).float())
    for bad, needle in (({"k": 0}, "RIFLEx.k must be an int >= 1"), ({"factor": 0}, "RIFLEx.factor must be > 0")):
        with pytest.raises(ValueError, match=needle):
            da.RIFLEx(**bad)

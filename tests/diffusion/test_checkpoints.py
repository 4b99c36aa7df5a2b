"""The official checkpoints at their real width (diffusion_attn.checkpoints): the table's token grids
against the pipelines' arithmetic, every family's REAL class with its real config but one layer
(seeded random weights) under each applicable variant, refusals that leave the model untouched, and
odd but real settings. Slow tests (the 3072-5120 wide models) run with `pytest -m slow`."""

from __future__ import annotations

import gc
import inspect
import random

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.checkpoints import CHECKPOINTS, get_checkpoint
from tests.diffusion.probes import Recorder

#: two narrow entries (72M / 110M parameters with one layer, quick to build): their core checks run in CI
FAST = ("wan2.1-t2v-1.3b", "ltx-video-0.9.x-2b")


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    """`@pytest.mark.slow` tests of this file run only when `-m` names slow (they build 3072-5120 wide layers)."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with pytest -m slow")


_MODELS: dict = {}


def _model(name: str):
    """One 1-layer real-width model per checkpoint, shared by this file's tests (built once)."""
    if name not in _MODELS:
        if name not in (*FAST, "cogvideox-2b"):
            _MODELS.clear()  # a wide model: keep only it in memory
            gc.collect()
        _MODELS[name] = get_checkpoint(name).build(num_layers=1)
    return _MODELS[name]


def _grid(c) -> tuple[int, int, int]:
    if c.family == "unet":
        return (1, 8, 8)  # latent 8 x 8: attention levels 8 x 8, 4 x 4, 2 x 2
    return (2, 2, 3) if c.video else (1, 4, 6)


@torch.no_grad()
def _run(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _untouched(model, procs) -> bool:
    registry = getattr(model, "_diffusers_hook", None)
    return (registry is None or not registry.hooks) and dict(model.attn_processors) == procs


# -- 1. the table --------------------------------------------------------------------------------------
def test_token_grids_follow_the_pipeline_arithmetic():
    """Grids written out by hand from each pipeline's latent shape and patchify (not from the table's code)."""
    expect = {
        # Wan2.1 VAE 8x / 4x, patch (1, 2, 2): 81 frames -> 21 latent frames
        ("wan2.1-t2v-1.3b", "default"): (21, 480 // 16, 832 // 16),  # 32,760 tokens
        ("wan2.1-t2v-14b", "default"): (21, 720 // 16, 1280 // 16),  # 75,600
        ("wan2.2-ti2v-5b", "default"): ((121 - 1) // 4 + 1, 704 // 32, 1280 // 32),  # Wan2.2 VAE 16x, 27,280
        ("hunyuanvideo", "default"): ((129 - 1) // 4 + 1, 720 // 16, 1280 // 16),  # 118,800
        ("hunyuanvideo", "gna-paper"): (30, 48, 80),  # the GNA paper's / NATTEN docs' grid
        ("cogvideox-5b", "default"): ((49 - 1) // 4 + 1, 480 // 16, 720 // 16),  # 17,550
        ("cogvideox1.5-5b", "default"): (22 // 2, 768 // 16, 1360 // 16),  # 21 latent frames padded to 22
        ("ltx-video-0.9.x-2b", "default"): ((161 - 1) // 8 + 1, 512 // 32, 704 // 32),  # 7,392
        ("flux.1-dev", "2048"): (1, 2048 // 16, 2048 // 16),
        ("flux.1-dev", "4096"): (1, 256, 256),  # the GNA paper's FLUX 4K grid
        ("sd3.5-medium", "default"): (1, 64, 64),
        ("sdxl-base-1.0", "default"): (1, 128, 128),  # latent; its attention starts at 1/2: 64 x 64
    }
    for (name, size), grid in expect.items():
        assert get_checkpoint(name).grid(size) == grid, (name, size)
    assert get_checkpoint("wan2.1-t2v-1.3b").tokens() == 32760
    assert get_checkpoint("hunyuanvideo").seq_len() == 118800 + 256
    assert get_checkpoint("sd3-medium").seq_len() == 4096 + 77 + 256
    assert get_checkpoint("sdxl-base-1.0").tokens() == 64 * 64
    assert get_checkpoint("flux.1-kontext-dev").seq_len() == 4096 + 4096 + 512
    with pytest.raises(ValueError, match=r"unknown checkpoint 'wan3'; known: wan2.1-t2v-1.3b"):
        get_checkpoint("wan3")
    with pytest.raises(ValueError, match=r"size '8k' is not one of default, 720p"):
        get_checkpoint("wan2.1-t2v-1.3b").grid("8k")


def test_every_config_field_is_a_parameter_of_the_real_class():
    import diffusers

    for c in CHECKPOINTS.values():
        params = inspect.signature(getattr(diffusers, c.model_class).__init__).parameters
        unknown = set(c.config) - set(params)
        assert not unknown, (c.name, unknown)
        assert c.repo.count("/") == 1 and c.config_source and c.size_source, c.name


# -- 2. every family at its real width -----------------------------------------------------------------
def _exact_variants(c) -> list:
    """(label, variant, bit-exact) that must leave the output unchanged on this family's tiny grid."""
    out = [
        ("radial dense warm-up", _radial(dense_steps=1), True),
        ("lite warm-up step (every tile visited)", da.LiteAttention(block_size=16), False),
        ("softpag u=0", da.SoftPAG(u=0.0, layers=(0,)), True),
    ]
    if c.family != "unet":  # UNet levels have other extents
        out.append(("gna window = grid", da.Neighborhood(kernel_size=_grid(c), block_size=16), False))
    if c.video:
        out.append(("ultravico at the training length", da.UltraViCo(), True))
    rope = c.family != "cogvideox" or c.config["use_rotary_positional_embeddings"]
    if c.family in ("wan", "hunyuan_video", "cogvideox") and rope:
        out.append(("riflex below the intrinsic period", da.RIFLEx(), True))
    if c.family in ("flux", "sd3", "wan"):
        out.append(("regional without entities", da.Regional(), True))
    return out


def _radial(**kw):
    """Radial with every option given (families without official settings refuse None options)."""
    opts = dict(dense_steps=0, dense_layers=0, decay_factor=0.95, attention_sink=False, block_size=16)
    return da.Radial(**{**opts, **kw})


def _acting_variants(c) -> list:
    out = [
        ("softpag u=1", da.SoftPAG(u=1.0, layers=(0,))),
        ("gna 1-token window", da.Neighborhood(kernel_size=1, block_size=16)),
    ]
    if c.video:
        out.append(("ultravico beyond 1 trained frame", da.UltraViCo(alpha=0.3, train_frames=1, window=0)))
    return out


def _check_real_width(name: str, full: bool = True) -> None:
    c = get_checkpoint(name)
    model = _model(name)
    procs = dict(model.attn_processors)
    inputs = c.tiny_inputs(model, _grid(c))
    dense = _run(model, inputs)

    rec = Recorder()
    with da.apply(model, rec):
        _run(model, inputs)
    heads = {(s[4]) for s in rec.seen}
    assert c.heads in heads, (name, heads)  # the table's heads are the real class's
    assert _untouched(model, procs)

    exact = _exact_variants(c)
    if not full:  # CI: the model's own processor (dense plan) and the kernel path (full window)
        exact = [e for e in exact if e[0].startswith(("radial", "gna"))]
    for label, var, bit_exact in exact:
        handle = da.apply(model, var)
        try:
            outs = []
            for step in (0, 1) if var.name == "lite" else (0,):
                handle.set_step(step)
                outs.append(_run(model, inputs))
        finally:
            handle.remove()
        tol = 0 if bit_exact else 2e-4
        for out in outs[:1] if var.name == "lite" else outs:
            torch.testing.assert_close(
                out, dense, atol=tol, rtol=tol, msg=lambda m, label=label: f"{name} {label}: {m}"
            )
        assert _untouched(model, procs), (name, label)
        assert torch.equal(_run(model, inputs), dense), (name, label)  # remove(): bit-exact

    for label, var in _acting_variants(c) if full else _acting_variants(c)[1:2]:
        with da.apply(model, var) as handle:
            handle.set_step(0)
            out = _run(model, inputs)
        assert (out - dense).abs().max() > 1e-4, (name, label)
        assert torch.equal(_run(model, inputs), dense), (name, label)

    for cls in (da.UltraViCo, da.RIFLEx, da.Regional, da.AgentSD, da.Boundary):
        if cls.families is None or c.family in cls.families:
            continue
        with pytest.raises(ValueError, match=rf"does not support model family {c.family!r}; it supports"):
            da.apply(model, _instance(cls))
        assert _untouched(model, procs), (name, cls.name)


def _instance(cls):
    if cls is da.Boundary:
        return da.Boundary(prompt="a cat", phrases=("cat",), boxes=((0.0, 0.0, 0.5, 0.5),))
    return cls()


@pytest.mark.parametrize("name", FAST)
def test_real_width_core(name):
    """CI subset: real width, dense plan bit-exact, full window ~ dense, a 1-token window acts, refusals."""
    _check_real_width(name, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_real_width_variants(name):
    """Every entry, every applicable variant (exact where it must be, acting where it must act)."""
    _check_real_width(name)


# -- 3. refusals a real config exposes ----------------------------------------------------------------
def test_riflex_refuses_cogvideox_2b_without_rope():
    """CogVideoX-2b adds sincos position embeddings (no RoPE): RIFLEx would have changed nothing, silently."""
    model = _model("cogvideox-2b")
    procs = dict(model.attn_processors)
    with pytest.raises(ValueError, match=r"RIFLEx needs a temporal rotary .*use_rotary_positional_embeddings=False"):
        da.apply(model, da.RIFLEx())
    assert _untouched(model, procs)


# -- odd but real settings -----------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_prompts_and_negative_prompts_equal_single_runs():
    """num_videos_per_prompt (the same prompt twice) and a negative prompt (another text) in one batch: every
    sample's output equals its own batch-1 run with GNA and with LiteAttention (per-sample skip sets)."""
    c = get_checkpoint("wan2.1-t2v-1.3b")
    model = _model(c.name)
    one = c.tiny_inputs(model, (2, 2, 3), seed=0)
    neg = c.tiny_inputs(model, (2, 2, 3), seed=1)
    batch = {k: torch.cat([v, v, neg[k]]) if torch.is_tensor(v) and v.dim() else v for k, v in one.items()}
    gna = da.Neighborhood(kernel_size=(2, 1, 3), block_size=16)
    lite = da.LiteAttention(threshold=-2.0, block_size=16)
    for var, steps in ((gna, (0,)), (lite, (0, 1))):  # lite step 1: the per-sample skip sets seeded at step 0
        with da.apply(model, var) as handle:
            for step in steps:
                handle.set_step(step)
                b, o1, o2 = _run(model, batch), _run(model, one), _run(model, neg)
                torch.testing.assert_close(b[0:1], o1, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(b[1:2], o1, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(b[2:3], o2, atol=1e-5, rtol=1e-5)
            assert handle.attention_calls > 0


def test_non_multiple_grids_full_window_equals_dense():
    """Token counts that are no multiple of the block (Wan 480p has 1,560 tokens per frame): 2 x 3 x 5 = 30
    tokens in blocks of 16, frames of 15 tokens straddling blocks. (Radial is not in this list: the official rule
    cuts each frame pair at ceil(15 / 16) blocks, so a straddling pair loses blocks even with an infinite band.)"""
    c = get_checkpoint("wan2.1-t2v-1.3b")
    model = _model(c.name)
    inputs = c.tiny_inputs(model, (2, 3, 5))
    dense = _run(model, inputs)
    for var in (
        da.Neighborhood(kernel_size=(2, 3, 5), block_size=16),
        da.LiteAttention(threshold=-1e4, block_size=16),  # nothing negligible: every tile visited
    ):
        with da.apply(model, var) as handle:
            handle.set_step(1)
            out = _run(model, inputs)
            assert handle.attention_calls > 0
        torch.testing.assert_close(out, dense, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_hunyuan_per_sample_text_lengths():
    """Batch of 2 with 5 and 9 valid text tokens (padding masked per sample): each sample equals its own run."""
    c = get_checkpoint("hunyuanvideo")
    model = _model(c.name)
    kw = c.tiny_inputs(model, (2, 2, 3), batch=2, text_len=9)
    kw["encoder_attention_mask"][0, 5:] = 0
    singles = []
    for i in range(2):
        s = {k: v[i : i + 1] if torch.is_tensor(v) and v.dim() else v for k, v in kw.items()}
        singles.append(s)
    with da.apply(model, da.Neighborhood(kernel_size=(2, 2, 3), block_size=16)) as handle:
        out = _run(model, kw)
        alone = [_run(model, s) for s in singles]
        assert handle.attention_calls > 0
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], alone[i], atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_flux_kontext_reference_tokens_refused_at_the_first_forward():
    """FLUX Kontext appends the reference image's tokens (img_ids[..., 0] = 1) after the generated image's:
    attnplug refuses the call clearly; after remove() the model runs as before."""
    c = get_checkpoint("flux.1-kontext-dev")
    model = _model(c.name)
    kw = c.tiny_inputs(model, (1, 4, 6))
    ref = kw["img_ids"].clone()
    ref[:, 0] = 1
    kw["img_ids"] = torch.cat([kw["img_ids"], ref])
    kw["hidden_states"] = torch.cat([kw["hidden_states"], kw["hidden_states"]], 1)
    plain = _run(model, kw)
    with da.apply(model, da.Neighborhood(kernel_size=3, block_size=16)):
        with pytest.raises(ValueError, match=r"FLUX Kontext, are not supported"):
            _run(model, kw)
    assert torch.equal(_run(model, kw), plain)


@pytest.mark.slow
def test_flux_guidance_distillation_and_sdxl_micro_conditioning_exact():
    """FLUX.1-dev's guidance embedding and SDXL's text_time micro-conditioning pass through untouched:
    outputs with a dense warm-up step equal the model's, and differ between guidance / size values."""
    for name, key in (("flux.1-dev", "guidance"), ("sdxl-base-1.0", "added_cond_kwargs")):
        c = get_checkpoint(name)
        model = _model(name)
        kw = c.tiny_inputs(model, _grid(c))
        other = dict(kw)
        if key == "guidance":
            other["guidance"] = kw["guidance"] * 2
        else:
            ids = kw[key]["time_ids"].clone()
            ids[:, :2] = 512.0
            other[key] = {**kw[key], "time_ids": ids}
        ref, ref_other = _run(model, kw), _run(model, other)
        assert (ref - ref_other).abs().max() > 1e-5  # the conditioning matters
        with da.apply(model, _radial(dense_steps=1)) as handle:
            handle.set_step(0)
            assert torch.equal(_run(model, kw), ref) and torch.equal(_run(model, other), ref_other)


# -- the fast GNA layout builder equals the token-mask one --------------------------------------------
def test_separable_layout_equals_from_mask_mod():
    from attn_kernels import BlockLayout
    from diffusion_attn.variants.base import TokenLayout
    from diffusion_attn.variants.neighborhood import separable_block_layout

    rng = random.Random(0)
    for _ in range(10):
        grid = (rng.randint(1, 4), rng.randint(1, 7), rng.randint(1, 9))
        ks = tuple(rng.randint(1, g) for g in grid)
        var = da.Neighborhood(
            kernel_size=ks,
            stride=tuple(rng.randint(1, k) for k in ks),
            dilation=tuple(rng.randint(1, max(1, g // k)) for g, k in zip(grid, ks)),
            is_causal=tuple(rng.random() < 0.3 for _ in grid),
            block_size=rng.choice([16, 32]),
            permute=rng.random() < 0.7,
        )
        lay = TokenLayout(grid=grid, text_len=rng.choice([0, 3, 17]), text_first=rng.random() < 0.5, family="wan")
        perm, _ = var.permutation(lay)
        n, b = lay.seq_len, var.block_size
        ref = BlockLayout.from_mask_mod(var.mask_mod(lay, perm), n, n, block_q=b, block_k=b, element_mask=True)
        new = separable_block_layout(var.dim_masks(grid), lay, perm, b)
        assert torch.equal(new.row_ptr, ref.row_ptr) and torch.equal(new.col_idx, ref.col_idx)
        assert (new.partial is None) == (ref.partial is None)
        if ref.partial is not None:
            assert torch.equal(new.partial, ref.partial) and torch.equal(new.elem_mask, ref.elem_mask)


# -- 3. layouts at real sizes (benchmarks/real_layouts.py) ---------------------------------------------
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "real_layouts.py"
    spec = importlib.util.spec_from_file_location("real_layouts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_layouts_bench_ltx_densities_are_the_windows():
    """LTX-Video 2B at 512 x 704 x 161 (7,392 tokens): the benchmark's rows; NA without text sees exactly its
    window, so the token density read from the layout lists equals prod(window) / prod(grid)."""
    out = _bench().main(["--only", "ltx-video-0.9.x-2b", "--variants", "gna", "lite", "ultravico"])
    rows = {r["variant"] + r["size"]: r for r in out["rows"]}
    gna = rows["gnadefault"]
    assert gna["grid"] == [21, 16, 22] and gna["tokens"] == 7392
    assert gna["token_density"] == pytest.approx(gna["window_density"], abs=1e-6) and gna["token_density"] < 0.2
    assert gna["block_density"] >= gna["token_density"]
    lite = rows["litedefault"]
    nb = -(-7392 // 128)
    assert lite["skip_state_bytes_per_layer"] == 32 * nb * nb  # bool [1, 32 heads, nb, nb]
    assert lite["skip_state_bytes_total"] == lite["skip_state_bytes_per_layer"] * 28 * 2  # 28 layers, CFG
    assert rows["ultravicodefaultx4"]["tokens"] == ((161 - 1) * 4 // 8 + 1) * 16 * 22


@pytest.mark.slow
def test_hunyuan_gna_published_setting_is_fully_block_sparse():
    """The GNA paper's HunyuanVideo setting (30 x 48 x 80, window 18 x 24 x 24, stride 16 x 8 x 8, tiles of
    2 x 8 x 8 = 128 tokens): every visited block is full (block density = token density) and the visual
    pairs are exactly the windows' 9.0% (NATTEN docs: ~91% sparsity); the 256 text tokens are global."""
    out = _bench().main(["--only", "hunyuanvideo", "--sizes", "gna-paper", "--variants", "gna"])
    row = next(r for r in out["rows"] if r["size"] == "gna-paper")
    nv, t = 30 * 48 * 80, 256
    n = nv + t
    expect = (nv * 18 * 24 * 24 + 2 * t * n - t * t) / n**2
    assert row["tile"] == [2, 8, 8]
    assert row["token_density"] == pytest.approx(expect, rel=1e-9)
    assert row["block_density"] == pytest.approx(row["token_density"], rel=1e-9)  # 115,200 = 900 blocks, text 2

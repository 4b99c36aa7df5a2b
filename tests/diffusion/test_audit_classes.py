"""Tests for the six bug classes an independent audit planted and the suite missed (issue 21, item 7):
a family's default for a modifier changed; a cache keyed on a tensor's shape instead of its contents; a greedy
search visiting candidates in the wrong order; an output file's permissions; a zero or empty CLI value not
overriding a preset; a guidance shift applied to half of a mixed batch. Each asserts the value that matters,
never only that something ran."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.adapters import ADAPTERS
from diffusion_attn.adapters.base import AttnRuntime

from .tiny import run, tiny_sd3

# ----------------------------------------------------------------------------------------------------------------------
# 1. official per-family defaults: every entry pinned to its source (a changed value is a different method)
# ----------------------------------------------------------------------------------------------------------------------
OFFICIAL = {
    # radial-attention scripts/{wan,hunyuan}_t2v_inference.sh: dense_layers, dense_timesteps, decay, sink (Wan)
    "radial": {
        "wan": {"dense_layers": 1, "dense_steps": 12, "decay_factor": 0.2, "attention_sink": True},
        "hunyuan_video": {"dense_layers": 0, "dense_steps": 12, "decay_factor": 0.95, "attention_sink": False},
    },
    # RIFLEx: intrinsic frequency index k per model (official repository)
    "riflex": {"wan": {"k": 6}, "hunyuan_video": {"k": 4}, "cogvideox": {"k": 2}},
    # UltraViCo: training length in token frames, beta band and harmonic period (HunyuanVideo's official beta)
    "ultravico": {
        "wan": {"train_frames": 21, "beta": None, "harmonic_period": None},
        "hunyuan_video": {"train_frames": 33, "beta": 0.6, "harmonic_period": 50},
        "cogvideox": {"train_frames": 13, "beta": None, "harmonic_period": None},
        "ltx_video": {"train_frames": 21, "beta": None, "harmonic_period": None},
    },
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_official_family_default_is_pinned(name):
    cls = da.VARIANTS[name]
    assert cls.family_defaults == OFFICIAL[name]
    for family, values in OFFICIAL[name].items():
        assert ADAPTERS[family].variant_defaults(cls) == values
        assert cls().resolved(family) == values  # what a default-constructed variant runs with
    for family in set(ADAPTERS) - set(OFFICIAL[name]):
        with pytest.raises(ValueError, match=f"for the '{family}' model family"):
            ADAPTERS[family].variant_defaults(cls)


# ----------------------------------------------------------------------------------------------------------------------
# 2. caches keyed on contents: two key masks of one shape and different padding never share a layout
# ----------------------------------------------------------------------------------------------------------------------
def test_key_mask_cache_is_keyed_on_contents_not_shape():
    from attn_kernels import BlockLayout

    rt = AttnRuntime(family="hunyuan_video", variants=())
    n = 32
    base = BlockLayout.dense(n, n, block_q=16, block_k=16)
    masks = [torch.ones(1, n, dtype=torch.bool) for _ in range(3)]
    masks[0][:, 20:] = False
    masks[1][:, 28:] = False  # same shape, other contents
    masks[2][:, 20:] = False  # equal contents to the first, another object
    got = []
    for m in masks:
        rt.begin_forward(None, None)  # a new forward: only contents can match an earlier mask
        lay = rt.key_masks.restrict(base, m, None, n, torch.device("cpu"))
        tok = lay.to_token_mask(0, 0)
        assert torch.equal(tok, m[0][None, :].expand(n, n)), "the layout must mask exactly this mask's padded keys"
        got.append(lay)
    assert got[0] is not got[1] and got[2] is got[0]  # reused only for equal contents


# ----------------------------------------------------------------------------------------------------------------------
# 3. greedy search order: candidates in (layer, head) order, ties to the lowest (layer, head)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan3():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=64,
    ).eval()  # fmt: skip


def test_greedy_search_visits_candidates_in_order_and_breaks_ties_low(wan3):
    from diffusion_attn.headhunter import HeadHunter

    visited: list[tuple] = []

    def gen(pipe, prompt, seed):
        visited.append(tuple(sorted(pipe._attnplug_handle.variants[0]._pairs)))
        return torch.tensor(1.0)  # every head scores the same: the tie rule decides

    hunter = HeadHunter(wan3, lambda outs, pairs: 0.0, ["x"], [0], rounds=2, top_k=1, generate=gen)
    first = [(layer, head) for layer in range(3) for head in range(2)]
    assert hunter.candidates == first
    result = hunter.run(progress=False, max_evaluations=4)
    assert visited == [(h,) for h in first[:4]] and result.stopped == "max_evaluations"
    visited.clear()
    result = HeadHunter(wan3, lambda outs, pairs: 0.0, ["x"], [0], rounds=2, top_k=1, generate=gen).run(progress=False)
    assert result.selected == [(0, 0), (0, 1)]  # ties: lowest (layer, head) first, round after round
    assert visited[6:] == [tuple(sorted([(0, 0), h])) for h in first[1:]]  # round 2: S + h, in order


# ----------------------------------------------------------------------------------------------------------------------
# 4. output file permissions: what the umask allows, like any file the user writes (not mkstemp's 0600)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_outputs_have_the_umask_permissions(tmp_path, umask):
    from attn_pipelines.io import OutputTarget

    old = os.umask(umask)
    try:
        target = OutputTarget(tmp_path / "out.png", "--out", formats=(".png",))
        target.check()
        target.write(lambda p: p.write_bytes(b"x"))
        target.write(lambda p: p.write_bytes(b"y"))  # overwriting keeps the same rule
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.png").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "out.png").read_bytes() == b"y" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


# ----------------------------------------------------------------------------------------------------------------------
# 5. a zero or empty CLI value overrides the preset (only "not given" falls back)
# ----------------------------------------------------------------------------------------------------------------------
def test_zero_and_empty_cli_values_override_the_preset(tmp_path):
    import diffusers

    from attn_pipelines.cli import build_parser
    from attn_pipelines.commands.generate import _resolve
    from attn_pipelines.loading import ModelInfo

    preset = {"steps": 9, "height": 64, "width": 64, "frames": 1, "guidance_scale": 5.0, "negative_prompt": "blur",
              "seed": 7}  # fmt: skip
    argv = [
        "generate",
        "--guidance-scale",
        "0",
        "--negative-prompt",
        "",
        "--seed",
        "0",
        "--out",
        str(tmp_path / "x.png"),
    ]
    args = build_parser().parse_args(argv)
    args.prompt = "a fox"
    s = _resolve(args, preset, diffusers.FluxPipeline, "flux", ModelInfo(), None, [], "--attn", [])
    assert (s.guidance, s.negative, s.seed, s.steps) == (0.0, "", 0, 9)
    args = build_parser().parse_args(["generate", "--out", str(tmp_path / "y.png")])
    args.prompt = "a fox"
    s = _resolve(args, preset, diffusers.FluxPipeline, "flux", ModelInfo(), None, [], "--attn", [])
    assert (s.guidance, s.negative, s.seed) == (5.0, "blur", 7)  # not given: the preset's


# ----------------------------------------------------------------------------------------------------------------------
# 6. a guidance shift on a mixed [uncond, cond] batch: both halves get the same shift, computed from the cond half
# ----------------------------------------------------------------------------------------------------------------------
def test_softpag_shifts_both_halves_of_a_batched_cfg_call_by_the_same_delta():
    model, inputs = tiny_sd3(batch=2)
    cond = {k: (v[1:] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in inputs.items()}
    with torch.no_grad():
        dense = run(model, inputs)
        dense_c = run(model, cond)
        with da.apply(model, da.SoftPAG(scale=2.0, u=0.75, layers=(0,), batched_cfg=True)):
            mixed = run(model, inputs)
        with da.apply(model, da.SoftPAG(scale=2.0, u=0.75, layers=(0,), batched_cfg=False)):
            alone = run(model, cond)  # the conditional half alone: eps_c + d
    torch.testing.assert_close(dense[1:], dense_c, rtol=1e-5, atol=1e-6)  # batch rows are independent
    d = alone - dense_c
    assert d.abs().max() > 1e-3  # the guidance does something
    torch.testing.assert_close(mixed[1:] - dense[1:], d, rtol=1e-4, atol=1e-5)  # cond half: eps_c + d
    torch.testing.assert_close(mixed[:1] - dense[:1], d, rtol=1e-4, atol=1e-5)  # uncond half: the SAME d


# ----------------------------------------------------------------------------------------------------------------------
# issue 21, item 6: a custom HeadHunter `generate` calling the transformer twice at one timestep without a cache context
# ----------------------------------------------------------------------------------------------------------------------
def _cfg_generate(use_context: bool):
    def generate(model, prompt, seed):
        g = torch.Generator().manual_seed(seed)
        x, e = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 7, 24, generator=g)
        t = torch.tensor([500.0])
        outs = []
        with torch.no_grad():
            for name, text in (("cond", e), ("uncond", torch.zeros_like(e))):  # a hand-written CFG step
                kw = dict(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)
                if use_context:
                    with model.cache_context(name):
                        outs.append(model(**kw)[0])
                else:
                    outs.append(model(**kw)[0])
        cond, uncond = outs
        return (uncond + 4.0 * (cond - uncond))[0, :3, 0].sigmoid()

    return generate


def test_headhunter_refuses_two_calls_of_one_step_without_a_cache_context(wan3):
    from diffusion_attn.headhunter import HeadHunter

    def objective(outs, pairs):
        return float(sum(o.mean() for o in outs))

    bad = HeadHunter(wan3, objective, ["x"], [0], rounds=1, top_k=1, layers=[0], generate=_cfg_generate(False))
    with pytest.raises(ValueError, match=r"called WanTransformer3DModel twice at timestep 500.0 with batch 1 outside"):
        bad.run(progress=False)
    assert getattr(wan3, "_attnplug_handle", None) is None  # removed after the refusal
    assert not wan3._forward_pre_hooks  # the guard is gone too
    good = HeadHunter(wan3, objective, ["x"], [0], rounds=1, top_k=1, layers=[0], generate=_cfg_generate(True))
    result = good.run(progress=False)
    assert result.complete and result.evaluations == 2 and len(set(result.rounds[0]["scores"].values())) == 2

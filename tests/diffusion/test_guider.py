"""SoftPAGGuidance (issue 11): the diffusers guider for modular pipelines, on a tiny real Wan modular pipeline."""

from __future__ import annotations

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.guidance import SoftPAGGuidance

from .test_softpag import capture, spy_steps


def modular_wan(guider):
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    from attn_pipelines.tiny import build_tiny_pipeline

    c = build_tiny_pipeline("wan").components
    pipe = WanCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=c["transformer"], scheduler=c["scheduler"], guider=guider)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, steps=3):
    pe = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    return pipe(
        prompt_embeds=pe, negative_prompt_embeds=-pe, num_inference_steps=steps, height=48, width=64, num_frames=5,
        generator=torch.Generator().manual_seed(0), output="latents",
    )  # fmt: skip


def test_guider_gives_the_formula_exactly():
    w, w_p = 4.0, 2.0
    guider = SoftPAGGuidance(guidance_scale=w, perturbed_guidance_scale=w_p, u=0.5, heads=[[0, 1], [1, 0]])
    pipe = modular_wan(guider)
    cap = capture(pipe.transformer)
    steps = spy_steps(pipe)
    call(pipe)
    handle = pipe.transformer._attnplug_handle
    assert handle.attention_calls == 2 * 3  # two perturbed layers in the third batch of each step
    assert len(cap.seen) == 9 and [p for _, _, p, _ in cap.seen] == [False, False, True] * 3
    for i, got in enumerate(steps):
        c, u, p = (o for _, _, _, o in cap.seen[3 * i : 3 * i + 3])
        assert (c - p).abs().max() > 1e-3
        assert torch.equal(got, u + w * (c - u) + w_p * (c - p))
    guider.remove()
    assert getattr(pipe.transformer, "_attnplug_handle", None) is None


def test_no_perturbation_is_diffusers_cfg_bit_for_bit():
    from diffusers.guiders import ClassifierFreeGuidance

    ref = call(modular_wan(ClassifierFreeGuidance(guidance_scale=4.0)))
    for kw in ({"perturbed_guidance_scale": 0.0}, {"u": 0.0}):
        pipe = modular_wan(SoftPAGGuidance(guidance_scale=4.0, layers=[0], **kw))
        assert torch.equal(call(pipe), ref)
        assert getattr(pipe.transformer, "_attnplug_handle", None) is None  # nothing was ever applied


def test_guider_without_cfg_and_its_schedule():
    """guidance_scale 1 (no CFG): two batches, pred_cond + w_p (pred_cond - pred_pert); the perturbation only in the
    second half of the steps."""
    w_p = 1.5
    guider = SoftPAGGuidance(guidance_scale=1.0, perturbed_guidance_scale=w_p, u=1.0, layers=[1],
                             perturbed_guidance_start=0.5)  # fmt: skip
    pipe = modular_wan(guider)
    cap = capture(pipe.transformer)
    steps = spy_steps(pipe)
    call(pipe, steps=4)
    flags = [p for _, _, p, _ in cap.seen]
    assert flags == [False, False, False, True, False, True]
    assert torch.equal(steps[0], cap.seen[0][3]) and torch.equal(steps[1], cap.seen[1][3])
    for i, j in ((2, 2), (3, 4)):
        c, p = cap.seen[j][3], cap.seen[j + 1][3]
        assert torch.equal(steps[i], c + w_p * (c - p))
    guider.remove()


def test_guider_drives_a_handle_with_other_variants_and_refuses_a_foreign_one():
    guider = SoftPAGGuidance(guidance_scale=4.0, perturbed_guidance_scale=2.0, u=0.5, layers=[1])
    pipe = modular_wan(guider)
    lite = da.LiteAttention(threshold=-0.05, block_size=16)
    handle = da.apply(pipe.transformer, lite, da.SoftPAG(mode="guider", layers=(1,)))
    try:
        call(pipe, steps=2)
        branches = handle.runtimes[0].branch_states()
        assert "None:perturbed" in branches  # the perturbed batch has its own LiteAttention state
    finally:
        handle.remove()
    for variants, needle in (
        ((da.Radial(),), r"already has attnplug variants applied \(\['radial'\]\)"),
        ((da.SoftPAG(layers=(0,)),), r"already has attnplug variants applied \(SoftPAG\(mode='hook'\)\)"),
    ):
        handle = da.apply(pipe.transformer, *variants)
        try:
            with pytest.raises(ValueError, match=needle):
                call(pipe, steps=2)
        finally:
            handle.remove()
            guider.cleanup_models(pipe.transformer)


def test_guider_on_a_non_default_backend(backend_spy, restore_active_backend):
    guider = SoftPAGGuidance(guidance_scale=4.0, perturbed_guidance_scale=2.0, u=1.0, layers=[0])
    pipe = modular_wan(guider)
    pipe.transformer.set_attention_backend("_native_math")
    call(pipe, steps=2)
    assert pipe.transformer._attnplug_handle.attention_calls == 2
    # self-attention: 2 layers in cond and uncond, 1 unperturbed in the perturbed batch; plus 2 cross per forward
    assert backend_spy.get("_native_math", 0) == 2 * (2 + 2 + 1 + 3 * 2)
    guider.remove()


def test_guider_config_round_trip_and_errors(tmp_path):
    guider = SoftPAGGuidance(guidance_scale=3.0, perturbed_guidance_scale=1.0, u=0.25, heads=[[0, 1]], layers=[2])
    guider.save_pretrained(tmp_path)
    again = SoftPAGGuidance.from_pretrained(tmp_path)
    public = {k: v for k, v in guider.config.items() if not k.startswith("_")}
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == public
    assert again._variant == guider._variant
    with pytest.raises(ValueError, match=r"SoftPAG.u must be in \[0.0, 1.0\], got 2.0"):
        SoftPAGGuidance(u=2.0, layers=[0])
    with pytest.raises(ValueError, match="SoftPAG needs the heads to perturb"):
        SoftPAGGuidance()
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        SoftPAGGuidance(guidance_scale=float("nan"), layers=[0])

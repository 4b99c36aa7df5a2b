"""SoftPAG (issue 11): head-level perturbed guidance through a hook on the transformer, on tiny real pipelines.

The three predictions are captured by a diffusers hook registered before `apply` (so it sees every forward,
the perturbed pass included, before SoftPAG shifts them) and the guided prediction by a spy on
`scheduler.step`, the value every pipeline hands its scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

import diffusion_attn as da

from .tiny import BUILDERS, run, tiny_flux, tiny_sd3, tiny_wan, tiny_wan_pipeline, wan_pipeline_inputs


class Capture(ModelHook):
    """Records (step, branch, perturbed, raw output) of every forward of the model it is registered on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, str | None, bool, torch.Tensor]] = []

    def post_forward(self, module, output):
        handle = getattr(module, "_attnplug_handle", None)
        rt = handle.runtimes[0] if handle is not None else None
        step = -1 if rt is None else rt.clock.step
        self.seen.append((step, rt and rt.branch, bool(rt and rt.perturbed), output[0].detach().clone()))
        return output

    def of(self, step: int, perturbed: bool = False, branch: str | None = "any") -> list[torch.Tensor]:
        return [o for s, b, p, o in self.seen if s == step and p == perturbed and (branch == "any" or b == branch)]


def capture(model) -> Capture:
    cap = Capture()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(cap, "test_capture")
    return cap


def spy_steps(pipe) -> list[torch.Tensor]:
    """The model_output of every scheduler.step call (the pipeline's guided prediction)."""
    seen: list[torch.Tensor] = []
    step = pipe.scheduler.step

    def spy(model_output, *args, **kwargs):
        seen.append(model_output.detach().clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = spy
    return seen


class Identity(ModelHook):
    """diffusers' own identity attention (PAG's `skip_attention_scores`): F.sdpa returns V inside one module."""

    def new_forward(self, module, *args, **kwargs):
        with AttentionScoreSkipFunctionMode():
            return self.fn_ref.original_forward(*args, **kwargs)


def tiny_sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model, _ = tiny_sd3(dual=False)
    pipe = StableDiffusion3Pipeline(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_inputs(steps=3, guidance=4.0, **extra):
    g = torch.Generator().manual_seed(0)
    pe, pp = torch.randn(1, 5, 24, generator=g), torch.randn(1, 8, generator=g)
    kw = dict(
        prompt_embeds=pe, negative_prompt_embeds=-pe, pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=-pp,
        height=64, width=64, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    kw.update(extra)
    return kw


def tiny_flux_pipeline():
    from attn_pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(steps=3, **extra):
    kw = dict(
        prompt="a red fox", height=32, width=32, num_inference_steps=steps, guidance_scale=3.5,
        output_type="latent", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    kw.update(extra)
    return kw


def _pipe_out(result) -> torch.Tensor:
    return result.frames if hasattr(result, "frames") else result.images


# -- the perturbation itself ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(BUILDERS))
def test_u1_on_every_head_of_a_layer_is_identity_attention(family):
    """u = 1 on all heads of layer 1: the perturbed pass equals the model run with that layer's attention map
    replaced by the identity (diffusers' own PAG trick: F.sdpa returns V), bit for bit."""
    model, inputs = BUILDERS[family]()
    mods = da.find_adapter(model).attention_modules(model)
    reg = HookRegistry.check_if_exists_or_initialize(mods[1][1])
    reg.register_hook(Identity(), "identity")
    ref = run(model, inputs)
    reg.remove_hook("identity")
    cap = capture(model)
    with da.apply(model, da.SoftPAG(u=1.0, scale=1.0, layers=(1,))) as handle:
        run(model, inputs)
        assert handle.attention_calls == 1  # only the perturbed layer of the perturbed pass ran attnplug's kernel
    (pert,) = [o for _, _, p, o in cap.seen if p]
    assert torch.equal(pert, ref)


def test_heads_select_exactly_their_heads():
    """(layer, head) pairs perturb those heads only: the OutputMix u vector of each layer, also with a head offset
    (Ulysses ranks), and the perturbed output differs from u = 1 on the whole layer."""
    from diffusion_attn.variants.base import AttnContext, TokenLayout

    v = da.SoftPAG(u=0.25, heads=((0, 1), (2, 0), (2, 3)), layers=(4,))

    def u_of(layer, heads, offset=0):
        ctx = AttnContext(layer, 5, 0, None, TokenLayout((1, 2, 2)), 1, heads, 16, torch.device("cpu"),
                          torch.float32, head_offset=offset, perturbed=True)  # fmt: skip
        plan = v.plan(ctx, da.AttnPlan())
        return None if not plan.modifiers else plan.modifiers[0].weights(heads).tolist()

    assert u_of(0, 4) == [0, 0.25, 0, 0]
    assert u_of(1, 4) is None
    assert u_of(2, 4) == [0.25, 0, 0, 0.25]
    assert u_of(2, 2, offset=2) == [0, 0.25]  # second rank of ulysses_degree=2 holds global heads 2, 3
    assert u_of(4, 4) == [0.25] * 4
    ctx = AttnContext(0, 5, 0, None, TokenLayout((1, 2, 2)), 1, 4, 16, torch.device("cpu"), torch.float32)
    assert v.plan(ctx, da.AttnPlan()).is_dense  # not a perturbed pass: nothing changes
    model, inputs = tiny_flux()
    cap = capture(model)
    with da.apply(model, da.SoftPAG(u=1.0, heads=((1, 0),))):
        run(model, inputs)
    with da.apply(model, da.SoftPAG(u=1.0, layers=(1,))):
        run(model, inputs)
    one, whole = [o for _, _, p, o in cap.seen if p]
    assert not torch.equal(one, whole)


# -- bit-identity when it does nothing ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"scale": 0.0, "u": 0.5}, {"scale": 3.0, "u": 0.0}], ids=["w_p=0", "u=0"])
def test_no_guidance_is_bit_identical_on_pipelines(kw, attnplug_log):
    """w_p = 0 or u = 0: the Wan (sequential CFG) and SD3 (batched CFG) pipelines give bit-identical latents, and
    the handle warns that the variant does nothing."""
    wan = tiny_wan_pipeline()
    ref = _pipe_out(wan(**wan_pipeline_inputs(wan, steps=2)))
    with da.apply(wan, da.SoftPAG(layers=(0, 1), **kw)) as handle:
        out = _pipe_out(wan(**wan_pipeline_inputs(wan, steps=2)))
        assert handle.attention_calls == 0
    assert torch.equal(out, ref)
    assert "SoftPAG.scale=0" in attnplug_log.text or "SoftPAG.u=0" in attnplug_log.text
    sd3 = tiny_sd3_pipeline()
    ref = _pipe_out(sd3(**sd3_inputs(steps=2)))
    with da.apply(sd3, da.SoftPAG(layers=(0,), **kw)):
        out = _pipe_out(sd3(**sd3_inputs(steps=2)))
    assert torch.equal(out, ref)


def test_remove_restores_bit_exactly():
    model, inputs = tiny_wan()
    ref = run(model, inputs)
    procs = [m.processor for _, m in da.find_adapter(model).attention_modules(model)]
    handle = da.apply(model, da.SoftPAG(u=1.0, layers=(0,)))
    guided = run(model, inputs)
    handle.remove()
    assert not torch.equal(guided, ref)
    assert torch.equal(run(model, inputs), ref)
    assert [m.processor for _, m in da.find_adapter(model).attention_modules(model)] == procs
    assert not hasattr(model, "_diffusers_hook") and "forward" not in model.__dict__


# -- the guidance formula, whatever the pipeline does for CFG ------------------------------------------------------
def test_formula_sequential_cfg_wan():
    """WanPipeline: cond / uncond calls in cache contexts. Per step, the prediction the scheduler gets equals
    eps_u + w (eps_c - eps_u) + w_p (eps_c - eps_pert), from the three captured predictions."""
    pipe = tiny_wan_pipeline()
    cap = capture(pipe.transformer)
    steps = spy_steps(pipe)
    w, w_p = 4.0, 2.0
    with da.apply(pipe, da.SoftPAG(scale=w_p, u=0.5, heads=((0, 1), (1, 0)))) as handle:
        pipe(**wan_pipeline_inputs(pipe, steps=3, guidance_scale=w))
        assert handle.attention_calls == 2 * 3  # two perturbed layers, one perturbed pass per step
    assert len(steps) == 3
    for i, got in enumerate(steps):
        (c,), (u,), (p,) = cap.of(i, branch="cond"), cap.of(i, branch="uncond"), cap.of(i, perturbed=True)
        expected = u + w * (c - u) + w_p * (c - p)
        assert (c - p).abs().max() > 1e-3  # the perturbation matters
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_formula_batched_cfg_sd3_with_skip_layer_guidance():
    """StableDiffusion3Pipeline: one batched [uncond, cond] call, no cache context; the perturbed pass runs on the
    conditional half. Its own skip-layer guidance (a third call per step) composes additively."""
    pipe = tiny_sd3_pipeline()
    cap = capture(pipe.transformer)
    steps = spy_steps(pipe)
    w, w_p = 4.0, 1.5
    texts = []  # the text stream of every transformer call: the perturbed one must be the conditional half's
    hook = pipe.transformer.context_embedder.register_forward_pre_hook(lambda m, a: texts.append(a[0].clone()))
    try:
        with da.apply(pipe, da.SoftPAG(scale=w_p, u=0.75, layers=(0,))):
            pipe(**sd3_inputs(steps=3, guidance=w))
    finally:
        hook.remove()
    pairs = [(a, b) for a, b in zip(texts, texts[1:]) if a.shape[0] == 2 and b.shape[0] == 1]
    assert len(pairs) == 3 and not torch.equal(texts[0][0], texts[0][1])
    assert all(torch.equal(b[0], a[1]) for a, b in pairs), "the perturbed pass must run on the conditional half"
    for i, got in enumerate(steps):
        (both,), (p,) = cap.of(i), cap.of(i, perturbed=True)
        u, c = both.chunk(2)
        torch.testing.assert_close(got, u + w * (c - u) + w_p * (c - p), rtol=1e-5, atol=1e-6)
    # SD3's skip-layer guidance: eps += s * (eps_c - eps_skip); both get the shift, so it cancels there
    cap.seen.clear()
    steps.clear()
    with da.apply(pipe, da.SoftPAG(scale=w_p, u=0.75, layers=(0,))):
        pipe(**sd3_inputs(steps=3, guidance=w, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                          skip_layer_guidance_stop=1.0, skip_layer_guidance_scale=2.0))  # fmt: skip
    checked = 0
    for i, got in enumerate(steps):
        plain = cap.of(i)
        if len(plain) != 2:
            continue  # SD3 runs skip-layer guidance only for 0 < i < stop * steps
        (both, skip), (p,) = plain, cap.of(i, perturbed=True)
        u, c = both.chunk(2)
        expected = u + w * (c - u) + w_p * (c - p) + 2.0 * (c - skip)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 1


def test_formula_batched_cfg_cogvideox_cond_uncond_context():
    """CogVideoXPipeline: one "cond_uncond" call of batch 2; CFG read from the pipeline's guidance scale."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    from .tiny import tiny_cogvideox

    model, _ = tiny_cogvideox()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=CogVideoXDDIMScheduler())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    cap = capture(model)
    steps = spy_steps(pipe)
    pe = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(0))
    w, w_p = 5.0, 2.0
    with da.apply(pipe, da.SoftPAG(scale=w_p, u=0.5, heads=((1, 1),))):
        pipe(prompt_embeds=pe, negative_prompt_embeds=-pe, height=64, width=64, num_frames=9, num_inference_steps=2,
             guidance_scale=w, output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
    for i, got in enumerate(steps):
        (both,), (p,) = cap.of(i, branch="cond_uncond"), cap.of(i, perturbed=True)
        u, c = both.float().chunk(2)
        torch.testing.assert_close(got, u + w * (c - u) + w_p * (c - p.float()), rtol=1e-5, atol=1e-6)


def test_formula_without_cfg_flux_dev_style():
    """FluxPipeline, guidance-distilled (no negative prompt): eps = eps_c + w_p (eps_c - eps_pert), bit for bit."""
    pipe = tiny_flux_pipeline()
    cap = capture(pipe.transformer)
    steps = spy_steps(pipe)
    w_p = 2.5
    with da.apply(pipe, da.SoftPAG(scale=w_p, u=0.5, layers=(0,), heads=((1, 1),))):
        pipe(**flux_inputs(steps=2))
    assert len(steps) == 2
    for i, got in enumerate(steps):
        (c,), (p,) = cap.of(i, branch="cond"), cap.of(i, perturbed=True)
        assert torch.equal(got, c + w_p * (c - p))


def test_formula_flux_true_cfg_sequential():
    """FluxPipeline with true CFG (negative prompt, true_cfg_scale): sequential cond / uncond contexts."""
    pipe = tiny_flux_pipeline()
    cap = capture(pipe.transformer)
    steps = spy_steps(pipe)
    w, w_p = 3.0, 1.0
    with da.apply(pipe, da.SoftPAG(scale=w_p, u=1.0, heads=((0, 0),))):
        pipe(**flux_inputs(steps=2, negative_prompt="blurry", true_cfg_scale=w))
    for i, got in enumerate(steps):
        (c,), (u,), (p,) = cap.of(i, branch="cond"), cap.of(i, branch="uncond"), cap.of(i, perturbed=True)
        torch.testing.assert_close(got, u + w * (c - u) + w_p * (c - p), rtol=1e-5, atol=1e-6)


def test_schedule_start_stop_and_explicit_steps():
    """start / stop are fractions of the pipeline's steps (int(start*n) <= i < int(stop*n)); `steps` lists them;
    outside the schedule the scheduler gets the pipeline's own CFG prediction, bit for bit."""
    pipe = tiny_wan_pipeline()
    cap = capture(pipe.transformer)
    steps = spy_steps(pipe)
    for variant, active in (
        (da.SoftPAG(u=1.0, layers=(1,), start=0.5), {2, 3}),
        (da.SoftPAG(u=1.0, layers=(1,), start=0.25, stop=0.75), {1, 2}),
        (da.SoftPAG(u=1.0, layers=(1,), steps=(0, 3)), {0, 3}),
    ):
        cap.seen.clear()
        steps.clear()
        with da.apply(pipe, variant):
            pipe(**wan_pipeline_inputs(pipe, steps=4))
        assert {s for s, _, p, _ in cap.seen if p} == active
        for i, got in enumerate(steps):
            if i not in active:
                (c,), (u,) = cap.of(i, branch="cond"), cap.of(i, branch="uncond")
                assert torch.equal(got, u + 4.0 * (c - u))
    model, inputs = tiny_wan()
    with da.apply(model, da.SoftPAG(layers=(0,), start=0.5)):
        with pytest.raises(ValueError, match=r"SoftPAG\(start=0.5, stop=1.0\) counts in fractions"):
            run(model, inputs)
    with da.apply(model, da.SoftPAG(layers=(0,), start=0.5), num_steps=4) as handle:
        assert handle.phase_steps() == (0, 2)


def test_non_default_attention_backend(backend_spy, restore_active_backend):
    """set_attention_backend("_native_math"): the model's own calls stay on it, the perturbed heads run attnplug's
    kernel (diffusers' identity trick intercepts F.sdpa and is skipped on non-torch backends), and the result
    still follows the formula; the perturbed pass equals the identity reference on the same backend."""
    pipe = tiny_flux_pipeline()
    pipe.transformer.set_attention_backend("_native_math")
    model = pipe.transformer
    cap = capture(model)
    steps = spy_steps(pipe)
    w_p = 2.0
    with da.apply(pipe, da.SoftPAG(scale=w_p, u=1.0, layers=(1,))) as handle:
        pipe(**flux_inputs(steps=2))
        assert handle.attention_calls == 2  # layer 1 of the perturbed pass, at each step
    # per step: 2 layers in the normal pass + 1 unperturbed layer in the perturbed pass
    assert backend_spy.get("_native_math", 0) == 2 * 3 and backend_spy.get("native", 0) == 0
    for i, got in enumerate(steps):
        (c,), (p,) = cap.of(i, branch="cond"), cap.of(i, perturbed=True)
        assert torch.equal(got, c + w_p * (c - p))
    assert model.transformer_blocks[0].attn.processor._attention_backend == "_native_math"


def test_steady_state_perturbed_forward_reads_nothing_on_the_host():
    from .test_sync_free import HostSync, NoHostSync

    model, inputs = tiny_wan()
    with da.apply(model, da.SoftPAG(u=0.5, heads=((0, 1), (1, 0))), step_source="callback") as handle:
        with torch.no_grad():
            for step in (0, 1):
                handle.set_step(step)
                model(**inputs, return_dict=False)
            handle.set_step(2)
            calls = handle.attention_calls
            guard = NoHostSync(tolerate=("attn_kernels/reference.py",))
            try:
                with guard:
                    out = model(**inputs, return_dict=False)[0]
            except HostSync as e:  # pragma: no cover - the failure message names the read
                pytest.fail(str(e))
        assert handle.attention_calls - calls == 2 and torch.isfinite(out).all()


# -- bad inputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"u": 1.5, "layers": (0,)}, r"SoftPAG.u must be in \[0.0, 1.0\], got 1.5"),
        ({"u": -0.1, "layers": (0,)}, r"SoftPAG.u must be in \[0.0, 1.0\], got -0.1"),
        ({"u": math.nan, "layers": (0,)}, r"SoftPAG.u must be in \[0.0, 1.0\], got nan"),
        ({"scale": -1.0, "layers": (0,)}, r"SoftPAG.scale must be in \[0.0, inf\], got -1.0"),
        ({"scale": math.inf, "layers": (0,)}, r"SoftPAG.scale must be a finite number >= 0"),
        ({}, r"SoftPAG needs the heads to perturb"),
        ({"heads": ((0, -1),)}, r"SoftPAG.heads\[0\] = \(0, -1\): layer and head must be >= 0"),
        ({"heads": ((0,),)}, r"SoftPAG.heads\[0\] must be a \(layer, head\) pair of ints"),
        ({"layers": (0,), "start": 0.6, "stop": 0.5}, r"SoftPAG.start must be < SoftPAG.stop"),
        ({"heads_file": "/nonexistent/heads.json"}, r"SoftPAG.heads_file '/nonexistent/heads.json': no such file"),
    ],
)
def test_bad_options_are_refused_with_the_range(kw, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        da.SoftPAG(**kw)


@pytest.mark.parametrize(
    ("variant", "needle"),
    [
        (lambda: da.SoftPAG(heads=((2, 0),)), r"layer must be in \[0, 1\] \(wan has 2 hooked attention layers, 0 = "),
        (lambda: da.SoftPAG(heads=((1, 2),)), r"head must be in \[0, 1\] \(layer 1 = blocks.1.attn1 has 2 heads\)"),
        (lambda: da.SoftPAG(layers=(0, 7)), r"SoftPAG.layers\[1\] = 7: layer must be in \[0, 1\]"),
    ],
)
def test_unknown_heads_are_refused_before_patching(variant, needle):
    model, inputs = tiny_wan()
    ref = run(model, inputs)
    procs = [m.processor for _, m in da.find_adapter(model).attention_modules(model)]
    with pytest.raises(ValueError, match=needle):
        da.apply(model, variant())
    assert [m.processor for _, m in da.find_adapter(model).attention_modules(model)] == procs
    assert not hasattr(model, "_diffusers_hook") and getattr(model, "_attnplug_handle", None) is None
    assert torch.equal(run(model, inputs), ref)


def test_uncond_before_cond_is_a_clear_error():
    model, inputs = tiny_wan()
    with da.apply(model, da.SoftPAG(layers=(0,))):
        with model.cache_context("uncond"), pytest.raises(RuntimeError, match="came before the conditional one"):
            run(model, inputs)

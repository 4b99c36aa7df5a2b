"""What users stack on a pipeline with a variant applied (issue 20): diffusers' caches, fused QKV,
compilation, gradient checkpointing. Each combination either works (and the variant's effect is
measured) or is refused with a clear error before anything runs, in either order."""

from __future__ import annotations

import pytest
import torch
from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

import diffusion_attn as da
from diffusion_attn.hooks import find_caches

from .test_softpag import flux_inputs, tiny_flux_pipeline
from .tiny import tiny_cogvideox, tiny_sd3, tiny_wan_pipeline, wan_pipeline_inputs


def _pab(pipe) -> PyramidAttentionBroadcastConfig:
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    )


def _faster(pipe) -> FasterCacheConfig:
    return FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
        attention_weight_callback=lambda _: 0.3,
        unconditional_batch_skip_range=2,
        unconditional_batch_timestep_skip_range=(-1, 1001),
        tensor_format="BCHW",
    )


def _flux_embedded(pipe, steps: int = 2) -> dict:
    """Tiny FLUX call arguments with prompt embeddings given (no text encoder run: faster)."""
    g = torch.Generator().manual_seed(0)
    dim, pooled = pipe.transformer.config.joint_attention_dim, pipe.transformer.config.pooled_projection_dim
    return flux_inputs(steps=steps, guidance_scale=1.0, prompt=None, prompt_embeds=torch.randn(1, 8, dim, generator=g),
                       pooled_prompt_embeds=torch.randn(1, pooled, generator=g))  # fmt: skip


def _softpag(scale: float = 2.0) -> da.SoftPAG:
    return da.SoftPAG(scale=scale, layers=(0,))


# -- caches that skip attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["pab", "faster"])
def test_softpag_with_a_shared_state_cache_is_refused_in_either_order(cache):
    """PAB / FasterCache keep one cache per attention module: SoftPAG's perturbed pass would be served the
    conditional pass's attention (a silent no-op on FLUX, a batch mismatch on CogVideoX). Refused before
    anything runs, whichever was enabled first; the model is left as it was."""
    pipe = tiny_flux_pipeline()
    config = _pab(pipe) if cache == "pab" else _faster(pipe)
    pipe.transformer.enable_cache(config)
    procs = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match=r"softpag cannot run with diffusers' (PyramidAttentionBroadcast|FasterCache)"):
        da.apply(pipe, _softpag())
    assert dict(pipe.transformer.attn_processors) == procs
    assert getattr(pipe.transformer, "_attnplug_handle", None) is None
    pipe.transformer.disable_cache()

    handle = da.apply(pipe, _softpag())
    with pytest.raises(ValueError, match=r"enable_cache\(\).*softpag.*\(the cache was not enabled\)"):
        pipe.transformer.enable_cache(config)
    assert not pipe.transformer.is_cache_enabled and not find_caches(pipe.transformer)
    handle.remove()
    assert "enable_cache" not in pipe.transformer.__dict__  # the guard is gone with the handle


def test_softpag_with_pab_on_cogvideox_is_refused_not_crashed():
    """The reported crash (`size of tensor a (4) must match ... (8)`): batched CFG, PAB cached batch 2."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    model, _ = tiny_cogvideox()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=CogVideoXDDIMScheduler())  # fmt: skip
    model.enable_cache(_pab(pipe))
    with pytest.raises(ValueError, match="PyramidAttentionBroadcast"):
        da.apply(pipe, da.SoftPAG(scale=2.0, heads=((1, 1),)))


def test_cache_hooks_added_without_enable_cache_are_refused_at_the_first_forward():
    """diffusers' apply_pyramid_attention_broadcast(model, config) bypasses enable_cache: caught before any
    attention of the generation runs."""
    from diffusers.hooks import apply_pyramid_attention_broadcast

    pipe = tiny_flux_pipeline()
    with da.apply(pipe, _softpag()) as handle:
        apply_pyramid_attention_broadcast(pipe.transformer, _pab(pipe))
        with pytest.raises(ValueError, match="PyramidAttentionBroadcast"):
            pipe(**flux_inputs(steps=2))
        assert handle.attention_calls == 0


def test_softpag_cooperates_with_first_block_cache():
    """FirstBlockCache keeps its state per cache context: the perturbed pass runs in its own context
    ("cond:perturbed"), so the guidance acts (scale 2 and 50 differ) and the conditional pass's cache state
    is not overwritten by the perturbed one."""
    outs = []
    pipe = tiny_flux_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    manager = pipe.transformer.transformer_blocks[0]._diffusers_hook.hooks["fbc_leader_block_hook"].state_manager
    for scale in (2.0, 50.0):
        contexts: set = set()

        def seen(pipe, i, t, kw, contexts=contexts, manager=manager):
            contexts.update(manager._state_cache)
            return kw

        with da.apply(pipe, _softpag(scale)) as handle:
            outs.append(pipe(**_flux_embedded(pipe), callback_on_step_end=seen).images)
            assert handle.attention_calls > 0
        assert {"cond", "cond:perturbed"} <= contexts  # the perturbed pass had its own cache state
    assert (outs[0] - outs[1]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["radial", "lite"])
def test_step_dependent_plans_cooperate_with_pab_on_wan(name):
    """A cache reuses attnplug's attention outputs on the steps it skips: the sparse plan still runs (calls > 0)
    and changes the result against the same cache on the dense model."""
    variant = {"radial": lambda: da.Radial(dense_steps=1, block_size=16),
               "lite": lambda: da.LiteAttention(threshold=-0.05, block_size=16)}[name]  # fmt: skip
    outs = []
    for apply_variant in (False, True):
        pipe = tiny_wan_pipeline()
        pipe.transformer.enable_cache(_pab(pipe))
        handle = da.apply(pipe, variant()) if apply_variant else None
        outs.append(pipe(**wan_pipeline_inputs(pipe, steps=4)).frames)
        if handle is not None:
            assert handle.attention_calls > 0
            handle.remove()
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_lite_recalibration_with_a_cache_is_refused():
    pipe = tiny_wan_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match=r"lite cannot run with diffusers' FirstBlockCache.*recalibrate_every=2"):
        da.apply(pipe, da.LiteAttention(recalibrate_every=2, block_size=16))
    da.apply(pipe, da.LiteAttention(block_size=16)).remove()  # without recalibration it cooperates


# -- fused QKV ---------------------------------------------------------------------------------------------------
def test_fused_qkv_is_refused_in_either_order():
    """The README's promise: attnplug does not reproduce diffusers' fused QKV processors."""
    model, _ = tiny_sd3(dual=False)
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"FusedJointAttnProcessor2_0.*nothing was patched"):
        da.apply(model, da.SoftPAG(layers=(0,)))
    model.unfuse_qkv_projections()
    with da.apply(model, da.SoftPAG(layers=(0,))):
        with pytest.raises(ValueError, match=r"fuse_qkv_projections\(\).*nothing was fused"):
            model.fuse_qkv_projections()
        assert not any("Fused" in type(p).__name__ for p in model.attn_processors.values())


# -- gradient checkpointing ----------------------------------------------------------------------------------------
def test_softpag_backward_with_gradient_checkpointing_equals_without():
    """The checkpointed blocks are recomputed in backward, after the perturbed pass ended: attnplug's
    checkpoint function replays the runtime's state, so the recomputation takes the perturbed path again
    (without it: `CheckpointError: A different number of tensors was saved`)."""
    from .tiny import tiny_flux

    model, inputs = tiny_flux()
    model.train()
    grads = []
    for checkpointing in (True, False):
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        model.zero_grad()
        with da.apply(model, da.SoftPAG(scale=2.0, layers=(0,), batched_cfg=False)) as handle:
            model(**inputs, return_dict=False)[0].square().mean().backward()
            assert handle.attention_calls == (2 if checkpointing else 1)  # the perturbed layer, recomputed
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert not any(
        getattr(f, "_attnplug", False)
        for m in model.modules()
        for f in [m.__dict__.get("_gradient_checkpointing_func")]
    )  # fmt: skip  (restored by remove)


# -- compilation ---------------------------------------------------------------------------------------------------
SPARSE = {
    "radial": lambda: da.Radial(dense_steps=1, block_size=16),
    "gna": lambda: da.Neighborhood(kernel_size=(1, 3, 3), block_size=16),
    "lite": lambda: da.LiteAttention(threshold=-0.05, block_size=16),
    "ultravico": lambda: da.UltraViCo(train_frames=1),
    "riflex": lambda: da.RIFLEx(k=2, always=True),
}


def _transformer_inputs(pipe) -> dict:
    """The keyword arguments of the pipeline's first transformer call."""
    seen: list[dict] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        pipe(**wan_pipeline_inputs(pipe, steps=2))
    finally:
        hook.remove()
    return seen[0]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


TRACED = {**SPARSE, "softpag": lambda: da.SoftPAG(scale=2.0, layers=(0,))}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRACED))
def test_explain_shows_no_graph_break_with_the_default_step_hook(name, fresh_dynamo):
    """torch._dynamo.explain of the applied transformer (step_source "hook", the pipeline known): the step
    hook reads nothing on the host while traced (the step comes from the cache context / scheduler), so the
    steady-state forward is one graph."""
    pipe = tiny_wan_pipeline()
    with da.apply(pipe, TRACED[name]()) as handle:
        kwargs = _transformer_inputs(pipe)  # eager generation: every phase's layouts exist
        pipe.scheduler._step_index = 1  # the step the traced forward reads: a sparse one
        calls = handle.attention_calls
        with pipe.transformer.cache_context("cond"):  # as WanPipeline calls it (SoftPAG: + its perturbed pass)
            explained = torch._dynamo.explain(pipe.transformer)(**kwargs)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        if name not in ("riflex",):  # RIFLEx changes RoPE; the attention is the model's
            assert handle.attention_calls > calls  # the sparse path was traced


@pytest.mark.slow
@pytest.mark.parametrize("name", ["radial", "lite"])
def test_compile_repeated_blocks_fullgraph_on_a_pipeline_without_prepare(name, fresh_dynamo):
    """`transformer.compile_repeated_blocks(fullgraph=True)` after apply(): attnplug compiles the whole
    transformer in place (per-layer state would make one graph per block), runs each phase's first call
    eagerly to build its layouts (no handle.prepare), and the compiled generations equal the eager one."""
    import torch._dynamo.utils as du

    pipe = tiny_wan_pipeline()
    with da.apply(pipe, SPARSE[name]()) as handle:
        ref = pipe(**wan_pipeline_inputs(pipe, steps=3)).frames
        eager_calls = handle.attention_calls
        graphs = du.counters["stats"]["unique_graphs"]
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
        for _ in range(2):
            out = pipe(**wan_pipeline_inputs(pipe, steps=3)).frames
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert handle.attention_calls == 3 * eager_calls
        assert du.counters["stats"]["unique_graphs"] - graphs <= 8  # (cond, uncond) x phases, within Dynamo's limit
    assert "_compiled_call_impl" not in pipe.transformer.__dict__ or not getattr(
        pipe.transformer._compiled_call_impl, "_attnplug_entry", False
    )


@pytest.mark.slow
def test_apply_unwraps_a_compiled_model(fresh_dynamo):
    """apply(torch.compile(model)) patches the wrapped model and warms each phase up by itself."""
    from .tiny import run, tiny_wan

    model, inputs = tiny_wan(frames=3)
    handle = da.apply(model, da.Radial(dense_steps=1, block_size=16), step_source="callback")
    eager = []
    for step in (0, 1, 2):
        handle.set_step(step)
        eager.append(run(model, inputs))
    handle.remove()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with da.apply(compiled, da.Radial(dense_steps=1, block_size=16), step_source="callback") as handle:
        assert model._attnplug_handle is handle and "forward" in compiled.__dict__
        for step, ref in zip((0, 1, 2), eager):
            handle.set_step(step)
            with torch.no_grad():
                torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
        assert handle.attention_calls > 0

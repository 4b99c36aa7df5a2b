"""Processors (issues 9 and 15): dense calls run the model's own processor on the user's backend, IP-Adapter on
FLUX and SD3 is kept, processors attnplug does not reproduce are refused before patching, and remove()
respects what the user set while applied."""

from __future__ import annotations

import logging

import pytest
import torch

import diffusion_attn as da

from .probes import ForceKernel
from .tiny import BUILDERS, run, tiny_flux, tiny_sd3, tiny_wan


@pytest.mark.parametrize("family", list(BUILDERS))
def test_dense_plans_are_the_models_own_processor(family, restore_active_backend):
    """A dense plan runs the original processor: bit-identical outputs, also under diffusers' attention_backend
    context (SD3 / CogVideoX processors call F.scaled_dot_product_attention directly and ignore it)."""
    from diffusers.models.attention_dispatch import attention_backend

    model, inputs = BUILDERS[family]()
    with attention_backend("_native_math"):
        ref = run(model, inputs)
        radial = da.Radial(dense_steps=5, dense_layers=0, decay_factor=0.95, attention_sink=False)  # any family
        with da.apply(model, radial) as handle:
            out = run(model, inputs)
            assert handle.attention_calls == 0
    assert torch.equal(out, ref)


# -- IP-Adapter -------------------------------------------------------------------------------------------
def _flux_ip(scale=0.7):
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model, inputs = tiny_flux()
    torch.manual_seed(3)
    proc = FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=12, num_tokens=(4,), scale=scale)
    model.transformer_blocks[0].attn.set_processor(proc)
    ip = [torch.randn(1, 4, 12)]
    return model, {**inputs, "joint_attention_kwargs": {"ip_hidden_states": ip}}, proc


def _sd3_ip(scale=0.5):
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    model, inputs = tiny_sd3()
    torch.manual_seed(3)
    proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=32, ip_hidden_states_dim=12, head_dim=16, timesteps_emb_dim=20)
    proc.scale = scale
    model.transformer_blocks[0].attn.set_processor(proc)
    kw = {"ip_hidden_states": torch.randn(1, 4, 12), "temb": torch.randn(1, 20)}
    return model, {**inputs, "joint_attention_kwargs": kw}, proc


@pytest.mark.parametrize("build", [_flux_ip, _sd3_ip], ids=["flux", "sd3"])
def test_ip_adapter_is_kept(build):
    """IP-Adapter processors are wrapped: attnplug's joint attention + diffusers' IP term, same outputs as the
    model's own processor through the kernel path, same state_dict keys, IP weights follow .to()."""
    model, inputs, proc = build()
    ref = run(model, inputs)
    keys = list(model.state_dict())
    proc.scale = [0.0] if isinstance(proc.scale, list) else 0.0
    no_ip = run(model, inputs)
    proc.scale = [0.7] if isinstance(proc.scale, list) else 0.5
    assert (ref - no_ip).abs().max() > 1e-3  # the IP term matters
    with da.apply(model, ForceKernel()) as handle:
        out = run(model, inputs)
        assert handle.attention_calls == len(handle.adapter.attention_modules(model))
        assert list(model.state_dict()) == keys
        model.double()
        assert proc.to_k_ip.weight.dtype == torch.float64 if hasattr(proc.to_k_ip, "weight") else True
        assert all(p.dtype == torch.float64 for p in proc.parameters())
        model.float()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert model.transformer_blocks[0].attn.processor is proc and list(model.state_dict()) == keys
    with da.apply(model, da.Neighborhood(kernel_size=(1, 3, 3), block_size=16)):  # sparse: the IP term still counts
        sparse_ip = run(model, inputs)
        proc.scale = [0.0] if isinstance(proc.scale, list) else 0.0
        sparse_no_ip = run(model, inputs)
    assert (sparse_ip - sparse_no_ip).abs().max() > 1e-3


# -- refusals ---------------------------------------------------------------------------------------------
def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def test_processors_not_reproduced_are_refused_before_patching():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, _ = tiny_sd3()
    model.fuse_qkv_projections()
    before = _processors(model)
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn of SD3Transformer2DModel uses FusedJoint"):
        da.apply(model, da.Radial())
    assert _processors(model) == before and not hasattr(model, "_diffusers_hook")

    class MyFluxProcessor(FluxAttnProcessor):
        pass

    model, _ = tiny_flux()
    model.single_transformer_blocks[0].attn.set_processor(MyFluxProcessor())
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.attn .* uses MyFluxProcessor.*nothing was"):
        da.apply(model, da.Radial())
    assert model.transformer_blocks[0].attn.processor.__class__ is FluxAttnProcessor

    class FluxAttnProcessorCopy(FluxAttnProcessor):  # same-looking name, different module
        pass

    FluxAttnProcessorCopy.__name__ = "FluxAttnProcessor"
    model.single_transformer_blocks[0].attn.set_processor(FluxAttnProcessorCopy())
    with pytest.raises(ValueError, match="does not reproduce"):
        da.apply(model, da.Radial())

    model, _ = tiny_wan()
    model.blocks[1].attn1.set_processor(lambda *a, **k: WanAttnProcessor()(*a, **k))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1 .* uses function"):
        da.apply(model, da.Radial())


def test_set_attn_processor_while_applied_is_kept_by_remove(attnplug_log):
    """The user replaces attnplug's processors while applied: attnplug warns at the next generation, the
    user's processors run, and remove() leaves them in place."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs = tiny_wan()
    ref = run(model, inputs)
    handle = da.apply(model, ForceKernel())
    run(model, inputs)
    mine = WanAttnProcessor()
    model.blocks[0].attn1.set_processor(mine)
    handle.reset()
    calls = handle.attention_calls
    out = run(model, inputs)
    assert handle.attention_calls - calls == 1  # only block 1 still runs attnplug
    warned = [r.getMessage() for r in attnplug_log.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "blocks.0.attn1" in warned[0] and "no longer use attnplug" in warned[0]
    handle.remove()
    assert model.blocks[0].attn1.processor is mine
    assert type(model.blocks[1].attn1.processor).__name__ == "WanAttnProcessor"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(run(model, inputs), ref)

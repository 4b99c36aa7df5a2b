"""Variant settings travel with a model (issue 20): `handle.save_pretrained(dir)` and `save_pretrained` of a
pipeline or model while applied write `attnplug_config.json` beside the weights; `apply_pretrained` re-applies
it after `from_pretrained`; `attnplug generate --config <dir>` reads the same file."""

from __future__ import annotations

import json

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.hooks import CONFIG_NAME

from .tiny import run, tiny_wan, tiny_wan_pipeline, wan_pipeline_inputs


def _radial() -> da.Radial:
    return da.Radial(dense_steps=1, decay_factor=0.5, block_size=16)


def test_model_round_trip_reapplies_the_same_variants(tmp_path):
    model, inputs = tiny_wan(frames=3)
    with da.apply(model, _radial(), da.RIFLEx(k=2, always=True), num_steps=4) as handle:
        handle.set_step(2)
        ref = run(model, inputs)
        path = handle.save_pretrained(tmp_path / "m")
    saved = json.loads(path.read_text())
    assert saved["format"] == "attnplug-config" and saved["families"] == {"WanTransformer3DModel": "wan"}
    assert saved["attn"] == ["radial:decay_factor=0.5,dense_steps=1,block_size=16", "riflex:k=2,always=True"]
    assert saved["apply"] == {"num_steps": 4, "step_source": "hook", "kernel_backend": "auto"}
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = type(model).from_pretrained(tmp_path / "m").eval()
    assert getattr(loaded, "_attnplug_handle", None) is None  # from_pretrained loads plain weights
    with da.apply_pretrained(loaded) as again:  # found beside the weights it was loaded from
        assert [v.name for v in again.variants] == ["radial", "riflex"]
        assert again.variants[0] == _radial() and again.num_steps == 4
        again.set_step(2)
        torch.testing.assert_close(run(loaded, inputs), ref, rtol=0, atol=0)
        assert again.attention_calls > 0


@pytest.mark.slow
def test_pipeline_saved_while_applied_writes_the_config_beside_the_weights(tmp_path):
    from diffusers import WanPipeline

    pipe = tiny_wan_pipeline()
    with da.apply(pipe, _radial()):
        ref = pipe(**wan_pipeline_inputs(pipe, steps=3)).frames
        pipe.save_pretrained(tmp_path / "p")  # the user's own call
    assert (tmp_path / "p" / CONFIG_NAME).is_file() and (tmp_path / "p" / "transformer" / CONFIG_NAME).is_file()
    assert "save_pretrained" not in pipe.__dict__ and "save_pretrained" not in pipe.transformer.__dict__
    loaded = WanPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    handle = da.apply_pretrained(loaded)
    out = loaded(**wan_pipeline_inputs(loaded, steps=3)).frames
    assert handle.attention_calls > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    handle.remove()
    plain = loaded(**wan_pipeline_inputs(loaded, steps=3)).frames
    assert (plain - ref).abs().max() > 1e-4  # the variant, not the weights, made the difference


def test_missing_and_bad_configs_are_clear(tmp_path):
    model, _ = tiny_wan(frames=3)
    with pytest.raises(ValueError, match=r"no attnplug_config\.json beside the weights.*pass path="):
        da.apply_pretrained(model)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an attnplug config"):
        da.apply_pretrained(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "attnplug-config", "version": 1,
                                                    "attn": ["radial:decay_factor=-1"]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"decay_factor"):
        da.apply_pretrained(model, tmp_path / CONFIG_NAME)
    assert getattr(model, "_attnplug_handle", None) is None  # refused before anything was patched


def test_options_without_a_literal_form_are_refused_before_writing(tmp_path):
    """A Regional mask is a tensor: save_pretrained names the option instead of writing a config that
    cannot be read back (the check runs before any file is written)."""
    from diffusion_attn.hooks import variant_spec

    mask = torch.zeros(48, 64, dtype=torch.bool)
    mask[:24] = True
    with pytest.raises(ValueError, match=r"regional option\(s\) \['entities'\] have no literal form"):
        variant_spec(da.Regional(entities=[("a fox", mask)], height=48, width=64))
    assert variant_spec(_radial()) == "radial:decay_factor=0.5,dense_steps=1,block_size=16"

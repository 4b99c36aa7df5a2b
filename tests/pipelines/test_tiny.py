"""The embedded tiny pipelines: deterministic from the seed, real classes, tokenizer built in code."""

from __future__ import annotations

import pytest
import torch

from attn_pipelines.tiny import TINY_DEFAULTS, build_tiny_pipeline, save_tiny_pipeline


def _params(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v for n in ("transformer", "vae", "text_encoder") for k, v in getattr(pipe, n).state_dict().items()
    }


def test_weights_come_from_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = _params(build_tiny_pipeline("flux", seed=0))
    assert torch.equal(torch.rand(3), expected)  # global RNG untouched
    b = _params(build_tiny_pipeline("flux", seed=0))
    c = _params(build_tiny_pipeline("flux", seed=1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_saved_pipeline_round_trips(tmp_path):
    from diffusers import DiffusionPipeline

    save_tiny_pipeline(tmp_path / "w", "wan")
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "w"))
    built = build_tiny_pipeline("wan")
    assert type(loaded).__name__ == "WanPipeline"
    assert type(loaded.transformer).__name__ == "WanTransformer3DModel" and loaded.transformer.config.num_layers == 2
    assert type(loaded.text_encoder).__name__ == "UMT5EncoderModel"
    a, b = _params(loaded), _params(built)
    assert all(torch.equal(a[k], b[k]) for k in b)
    ids = loaded.tokenizer("a fox in the snow").input_ids
    assert ids == built.tokenizer("a fox in the snow").input_ids
    assert ids[-1] == loaded.tokenizer.eos_token_id and loaded.tokenizer.unk_token_id not in ids
    assert len(ids) == 6  # five known words + </s>


def test_tiny_defaults_fit_the_models():
    assert TINY_DEFAULTS["wan"]["frames"] % 4 == 1 and TINY_DEFAULTS["flux"]["frames"] == 1
    for d in TINY_DEFAULTS.values():
        assert d["height"] % 16 == 0 and d["width"] % 16 == 0


def test_bad_kind_and_seed():
    with pytest.raises(ValueError, match=r"kind must be one of \('wan', 'flux'\)"):
        build_tiny_pipeline("sdxl")
    with pytest.raises(TypeError, match="seed must be int"):
        build_tiny_pipeline("wan", seed=1.5)


@pytest.mark.parametrize("kind", ["wan", "flux"])
def test_every_module_is_in_eval_mode(kind):
    """Freshly built transformers modules are in train mode: dropout would make same-seed runs differ."""
    pipe = build_tiny_pipeline(kind)
    modules = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
    assert modules and not any(m.training for m in modules)

"""One home for each family fact: the adapter class. The CLI's latent rules, class names, fps and text order
are read from the adapters (a family added by one adapter file is known everywhere); a variant's official
per-family defaults are reachable from the adapter, and a family absent from a variant's table is refused
with the options to give, never handed another family's values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import pytest
import torch

import diffusion_attn as da
from attn_pipelines.cli import main
from attn_pipelines.commands.generate import default_fps
from attn_pipelines.latent import FAMILY_OF_TRANSFORMER, FAMILY_RULES, check_fit, rule_for
from attn_spec import Range, check_options, parse_spec
from diffusion_attn.adapters import ADAPTERS, LatentRule, family_of_class, register_adapter
from diffusion_attn.adapters.base import Adapter
from diffusion_attn.variants.base import VARIANTS, Variant, register_variant
from tests.diffusion.tiny import tiny_cogvideox, tiny_flux

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = tuple(ADAPTERS)


def test_the_cli_tables_are_the_adapters_facts():
    assert FAMILY_RULES == {n: c.latent for n, c in ADAPTERS.items() if c.latent is not None}
    assert FAMILY_OF_TRANSFORMER == {m: n for n, c in ADAPTERS.items() for m in c.model_classes}
    assert family_of_class("WanTransformer3DModel") == "wan" and family_of_class("Nope") is None
    assert {n: default_fps(n) for n in ("wan", "hunyuan_video", "cogvideox", "ltx_video")} == {
        "wan": 16,
        "hunyuan_video": 24,
        "cogvideox": 8,
        "ltx_video": 24,
    }
    assert [n for n, c in ADAPTERS.items() if c.text_first] == ["cogvideox", "flux"]
    from attn_pipelines.commands.listing import family_facts  # what `attnplug list` prints per family

    ltx = "32 px per token side, 8 frames per token frame, 24 fps, joint text last"
    assert family_facts(ADAPTERS["ltx_video"]) == ltx
    assert family_facts(ADAPTERS["flux"]) == "16 px per token side, images, joint text first"
    assert family_facts(ADAPTERS["unet"]).startswith("token grid known after loading")


def test_a_family_added_by_one_adapter_file_is_known_to_the_cli(tmp_path, capsys):
    """Nothing outside the adapter lists families: a new adapter's latent rule, fps and text order are used."""
    assert da.ADAPTERS is ADAPTERS  # one registry, filled by @register_adapter

    try:

        @register_adapter
        class NewAdapter(Adapter):
            name = "newfam"
            model_classes = ("NewTransformer3DModel",)
            latent = LatentRule(video=True, vae_t=2, vae_s=4, patch_t=1, patch=2)
            default_fps = 30
            text_first = True

        assert rule_for("newfam").multiple == 8 and default_fps("newfam") == 30
        assert family_of_class("NewTransformer3DModel") == "newfam"
        assert NewAdapter.token_grid(64, 32, 9) == (5, 8, 4)  # (9 - 1) // 2 + 1 frames, 64 / 8 x 32 / 8
        out = tmp_path / "m.png"
        argv = ["show-mask", "--variant", "gna:kernel_size=(1,3,3),block_size=16", "--grid", "2x4x4", "--text-len", "3"]
        assert main([*argv, "--family", "newfam", "--out", str(out)]) == 0
        assert "+ 3 text (first)" in capsys.readouterr().out  # the new adapter's text order
    finally:
        ADAPTERS.pop("newfam", None)


def test_a_new_adapter_file_brings_its_official_defaults_and_capabilities():
    """A variant's official per-family values and its supported families are read from the adapters: one new adapter
    file with a temporal RoPE and an official RIFLEx k is supported by RIFLEx with that k, by UltraViCo (a video
    family) only with train_frames given, and by none of the prompt-encoding variants (it encodes no prompts)."""
    try:

        @register_adapter
        class RopeFam(Adapter):
            name = "ropefam"
            model_classes = ("RopeFamTransformer3DModel",)
            default_fps = 12
            official_defaults = {"riflex": {"k": 3}}
            rope_site = "module"
            temporal_rope = staticmethod(lambda model: (16, 10000.0, torch.float64))

        assert "ropefam" in da.RIFLEx.families and da.RIFLEx.family_defaults["ropefam"] == {"k": 3}
        assert RopeFam.variant_defaults(da.RIFLEx) == {"k": 3} and da.RIFLEx().resolved("ropefam")["k"] == 3
        assert "ropefam" in da.UltraViCo.families and "ropefam" not in da.UltraViCo.family_defaults
        with pytest.raises(ValueError, match=r"UltraViCo has no official train_frames for the 'ropefam' model family"):
            da.UltraViCo().resolved("ropefam")
        for v in (da.Regional, da.Boundary, da.AgentSD):
            assert "ropefam" not in v.families
        with pytest.raises(ValueError, match=r"Radial has no official defaults for the 'ropefam' model family"):
            RopeFam.variant_defaults(da.Radial)
    finally:
        ADAPTERS.pop("ropefam", None)
    assert "ropefam" not in da.RIFLEx.families and "ropefam" not in da.RIFLEx.family_defaults
    assert set(da.Regional.families) == {"flux", "sd3", "wan"} and set(da.Boundary.families) == {"sd3", "unet"}
    assert set(da.AgentSD.families) == {"unet", "flux", "sd3"}


def test_variant_defaults_are_reachable_from_the_adapter_and_never_borrowed():
    wan, flux = ADAPTERS["wan"], ADAPTERS["flux"]
    official = {"dense_layers": 1, "dense_steps": 12, "decay_factor": 0.2, "attention_sink": True}
    assert wan.variant_defaults(da.Radial) == official
    assert ADAPTERS["hunyuan_video"].variant_defaults(da.RIFLEx) == {"k": 4}
    assert ADAPTERS["hunyuan_video"].variant_defaults(da.UltraViCo) == {
        "train_frames": 33,
        "beta": 0.6,
        "harmonic_period": 50,
    }
    assert flux.variant_defaults(da.Neighborhood) == {}  # no family table: nothing to borrow
    with pytest.raises(ValueError, match=r"Radial has no official defaults for the 'flux' model family \(only for "):
        flux.variant_defaults(da.Radial)
    r = da.Radial(dense_steps=3)
    assert r.resolved("wan") == {**official, "dense_steps": 3}
    with pytest.raises(ValueError, match=r"no official dense_layers, decay_factor, attention_sink for the 'flux'"):
        r.resolved("flux")
    given = dict(dense_layers=0, dense_steps=3, decay_factor=0.5, attention_sink=False)
    assert da.Radial(**given).resolved("flux") == given  # every option given: any family runs
    with pytest.raises(ValueError, match=r"UltraViCo has no official train_frames for the 'sd3' model family"):
        da.UltraViCo().resolved("sd3")
    assert da.UltraViCo(train_frames=4).resolved("sd3") == {"train_frames": 4, "beta": None, "harmonic_period": None}
    with pytest.raises(ValueError, match=r"RIFLEx has no official k for the 'ltx_video' model family"):
        da.RIFLEx().resolved("ltx_video")


@pytest.mark.parametrize(("build", "family"), [(tiny_flux, "flux"), (tiny_cogvideox, "cogvideox")])
def test_apply_refuses_a_family_without_radial_defaults_model_untouched(build, family):
    model, inputs = build()
    procs = {n: type(p) for n, p in model.attn_processors.items()}
    with pytest.raises(ValueError, match=rf"Radial has no official .*attention_sink for the '{family}' model family"):
        da.apply(model, da.Radial(dense_steps=0, decay_factor=0.5, block_size=16))
    assert {n: type(p) for n, p in model.attn_processors.items()} == procs
    assert getattr(model, "_attnplug_handle", None) is None
    radial = da.Radial(dense_steps=0, dense_layers=0, decay_factor=0.5, attention_sink=False, block_size=16)
    with torch.no_grad(), da.apply(model, radial) as handle:
        model(**inputs)
    assert handle.attention_calls > 0  # given explicitly, it runs


def test_cli_refuses_radial_defaults_for_a_family_without_them(tiny_flux_dir, tmp_path, capsys, monkeypatch):
    import attn_pipelines.commands.generate as gen

    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    argv = ["generate", "--model", str(tiny_flux_dir), "--height", "32", "--width", "32", "--attn", "radial"]
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert (
        "radial: Radial has no official dense_layers, dense_steps, decay_factor, attention_sink for the 'flux'" in err
    )
    with pytest.raises(ValueError, match=r"radial: Radial has no official attention_sink for the 'cogvideox'"):
        check_fit([da.Radial(decay_factor=0.9, dense_steps=1, dense_layers=0)], "cogvideox", (4, 4, 4))
    assert main(["show-mask", "--variant", "radial", "--grid", "4x4x4", "--family", "sd3", "--out", "x.png"]) == 2
    assert (
        "no official dense_layers, dense_steps, decay_factor, attention_sink for the 'sd3'" in capsys.readouterr().err
    )


_FAMILY = re.compile("[\"'](?:" + "|".join(FAMILIES) + ")[\"']")
#: Files outside diffusion_attn/adapters/ that still name families, and why (the rest must not).
_STILL_NAMING = {
    "attn_pipelines/tiny.py": "builds the embedded tiny Wan and FLUX pipelines (its kinds are those models)",
    "attn_pipelines/commands/generate.py": "the embedded tiny pipeline kinds",
    "attn_pipelines/commands/headhunt.py": "the embedded tiny FLUX pipeline",
    "attn_pipelines/embedded.py": "the CLI's image default falls back to the embedded tiny FLUX (a tiny.py kind)",
    "diffusion_attn/hooks.py": 'the pipeline component "unet" (an attribute name, not the family)',
    "attn_pipelines/loading.py": 'the model_index.json component "unet" (not the family)',
}


def test_no_other_source_file_names_a_family():
    named = set()
    for pkg in ("attn_pipelines", "diffusion_attn", "vision_attn", "attn_spec", "attn_kernels"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("diffusion_attn/adapters/"):
                continue
            if _FAMILY.search(path.read_text()):
                named.add(rel)
    assert named <= set(_STILL_NAMING), sorted(named - set(_STILL_NAMING))
    for rel in ("attn_pipelines/latent.py", "attn_pipelines/commands/show_mask.py", "attn_pipelines/config.py"):
        assert rel not in named


def test_a_variant_registered_by_its_own_file_is_in_attn_presets_and_list(capsys):
    """A variant is one file: @register_variant puts it in VARIANTS, which --attn, presets and `list` read."""
    from attn_pipelines.config import build_variant, validate_preset

    try:

        @register_variant
        @dataclass
        class Echo(Variant):
            """Echo: a variant defined in one place."""

            name: ClassVar[str] = "echo_test"
            aliases: ClassVar[tuple[str, ...]] = ("echo_alias",)
            strength: Annotated[float, Range(0, 2)] = 1.0

            def __post_init__(self) -> None:
                check_options(self)

        assert build_variant(parse_spec("echo_alias:strength=2")) == Echo(strength=2.0)
        preset = {"name": "p", "description": "d", "model": "o/m", "pipeline": {}, "attn": ["echo_test"]}
        preset["pipeline"] = {
            "height": 8,
            "width": 8,
            "frames": 1,
            "steps": 1,
            "guidance_scale": 1.0,
            "dtype": "float32",
        }
        assert validate_preset(preset).usable
        assert main(["list"]) == 0
        out = capsys.readouterr().out
        assert "  echo_test    Echo [modifier] Echo: a variant defined in one place." in out
        assert "      strength: float = 1.0  (in [0, 2])" in out and "  echo_alias   alias of echo_test" in out
        with pytest.raises(ValueError, match=r"'echo_test' is already Echo's name"):

            @register_variant
            @dataclass
            class Other(Variant):
                name: ClassVar[str] = "echo_test"
    finally:
        for key in ("echo_test", "echo_alias"):
            VARIANTS.pop(key, None)


def test_riflex_reads_the_temporal_rope_from_the_adapters():
    """Where a family's temporal RoPE lives is a fact of its adapter: the families RIFLEx supports are exactly those
    whose adapter declares one, and any other family is refused by name (never read as another family's)."""
    from diffusion_attn.variants.riflex import rope_axis

    with_rope = {name for name, a in ADAPTERS.items() if getattr(a, "temporal_rope", None) is not None}
    assert with_rope == set(da.RIFLEx.families)
    assert {ADAPTERS[name].rope_site for name in with_rope} == {"module", "image_rotary_emb"}
    with pytest.raises(ValueError, match=r"RIFLEx supports .*; got model family 'flux'"):
        rope_axis("flux", None)

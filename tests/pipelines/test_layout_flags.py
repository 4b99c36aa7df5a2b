"""`attnplug generate --region / --boundary` (regional and boundary attention from the command line) and
`attnplug list` showing every registered variant: items parsed and range-checked before anything loads,
boxes in fractions of the frame turned into the pixels of the generated size, the effect on real pipelines."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import diffusion_attn
from attn_pipelines.cli import main
from attn_pipelines.config import ConfigError, fill_layout, layout_specs, parse_box_item, variant_registry
from attn_spec import Spec


class _Stop(ValueError):
    pass


@pytest.fixture
def captured(monkeypatch):
    """`diffusion_attn.apply` replaced by one that records the variants and stops the run (CLIError, rc 2)."""
    seen: list = []

    def apply(pipe, *variants, **kw):
        seen.append(variants)
        raise _Stop("stopped by the test after apply received the variants")

    monkeypatch.setattr(diffusion_attn, "apply", apply)
    return seen


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def test_box_items_parse_to_the_text_and_the_fractions():
    assert parse_box_item("a red circle@0,0,0.5,1", "--region") == ("a red circle", (0.0, 0.0, 0.5, 1.0))
    assert parse_box_item(" cat@home @ 0.1, 0.2, 0.3, 0.4 ", "--boundary") == ("cat@home", (0.1, 0.2, 0.3, 0.4))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("no box", "--region 'no box': expected PROMPT@x0,y0,x1,y1 with the box in fractions of the frame"),
        ("@0,0,1,1", "expected PROMPT@x0,y0,x1,y1"),
        ("a@0,0,1", "the box must be 4 numbers x0,y0,x1,y1"),
        ("a@0,0,x,1", "the box must be 4 numbers x0,y0,x1,y1"),
        ("a@0,0,1.5,1", "box (x0, y0, x1, y1) = (0.0, 0.0, 1.5, 1.0) must be fractions of the frame in [0, 1]"),
        ("a@-0.1,0,1,1", "must be fractions of the frame in [0, 1] with x0 < x1 and y0 < y1"),
        ("a@0.5,0,0.5,1", "with x0 < x1 and y0 < y1"),
        ("a@0,0.7,1,0.2", "with x0 < x1 and y0 < y1"),
        ("a@nan,0,1,1", "must be fractions of the frame in [0, 1]"),
    ],
)
def test_bad_box_items_name_the_flag_and_the_range(text, needle):
    with pytest.raises(ConfigError) as e:
        parse_box_item(text, "--region")
    assert needle in str(e.value) and str(e.value).startswith(f"--region {text!r}")


def test_flags_add_their_variant_once_and_never_override_spec_options():
    assert layout_specs((Spec("radial"),), ["a@0,0,1,1"], ["b@0,0,1,1"]) == (
        Spec("radial"),
        Spec("regional"),
        Spec("boundary"),
    )
    kept = (Spec("regional", {"entity_global": False}),)
    assert layout_specs(kept, ["a@0,0,1,1"]) == kept
    with pytest.raises(ConfigError, match=r"--region sets regional's entities, height, width; drop entities="):
        layout_specs((Spec("regional", {"entities": ()}),), ["a@0,0,1,1"])
    with pytest.raises(ConfigError, match=r"--boundary sets boundary's phrases, boxes, prompt; drop prompt="):
        layout_specs((Spec("boundary", {"prompt": "x"}),), None, ["a@0,0,1,1"])


def test_fill_layout_scales_the_boxes_to_the_size_and_keeps_the_other_options():
    base = [diffusion_attn.Regional(entity_global=False, block_size=16), diffusion_attn.Boundary(loss_scale=5.0)]
    out = fill_layout(
        base, ["a@0,0,0.5,1", "b@0.25,0.5,1,1"], ["red fox@0,0,0.5,0.5"], prompt="a red fox", size=(64, 128)
    )
    reg, bnd = out
    assert [(e.prompt, e.mask) for e in reg.entities] == [
        ("a", (0.0, 0.0, 64.0, 64.0)),
        ("b", (32.0, 32.0, 128.0, 64.0)),
    ]
    assert (reg.height, reg.width, reg.entity_global, reg.block_size) == (64, 128, False, 16)
    assert (bnd.prompt, bnd.phrases, bnd.boxes, bnd.loss_scale) == ("a red fox", ("red fox",), ((0, 0, 0.5, 0.5),), 5.0)
    assert base[0].entities == () and base[1].phrases == ()  # new objects: the unsized ones are untouched
    with pytest.raises(ConfigError, match=r"--region boxes are fractions of the frame: give --height and --width"):
        fill_layout(base, ["a@0,0,1,1"], None, size=(None, 64))
    with pytest.raises(ConfigError, match=r"--region \(--attn regional\): Regional.entities\[1\].name 'a' is also"):
        fill_layout(base, ["a@0,0,1,1", "a@0,0,0.5,0.5"], None)


# ----------------------------------------------------------------------------------------------
# the command: refused before loading, sized by the generation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--region", "a cat@0,0,2,1"], "--region 'a cat@0,0,2,1': box (x0, y0, x1, y1) = (0.0, 0.0, 2.0, 1.0)"),
        (["--boundary", "a dog"], "--boundary 'a dog': expected PHRASE@x0,y0,x1,y1"),
        (["--boundary", "a dog@0,0,1,1", "--prompt", "a cat"], "Boundary.phrases[0] 'a dog' is not part of the prompt"),
        (["--region", "a@0,0,1,1", "--attn", "regional:entities=()"], "--region sets regional's entities"),
        (["--region", "a@0,0,1,1", "--attn", "regional:block_size=3"], "Regional.block_size must be one of"),
    ],
)
def test_bad_layout_flags_fail_before_loading(captured, argv, needle, tmp_path, capsys, monkeypatch):
    import attn_pipelines.commands.generate as gen

    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    assert main(["generate", "--frames", "1", *argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("error") == 1, err
    assert not captured


def test_region_boxes_become_pixels_of_the_generated_size(captured, tiny_flux_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_flux_dir), "--height", "64", "--width", "128", "--steps", "1"]
    argv += [
        "--region",
        "a red circle@0,0,0.5,1",
        "--region",
        "a blue cup@0.5,0.25,1,1",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(argv) == 2
    assert "stopped by the test after apply received the variants" in capsys.readouterr().err
    ((reg,),) = captured
    assert isinstance(reg, diffusion_attn.Regional) and (reg.height, reg.width) == (64, 128)
    assert [(e.prompt, e.mask) for e in reg.entities] == [
        ("a red circle", (0.0, 0.0, 64.0, 64.0)),
        ("a blue cup", (64.0, 16.0, 128.0, 64.0)),
    ]
    assert reg._pixels[0][:, :64].all() and not reg._pixels[0][:, 64:].any()  # the mask Regional will use


def test_region_needs_a_size_when_the_pipeline_has_no_default(captured, tiny_flux_dir, tmp_path, capsys, monkeypatch):
    import attn_pipelines.commands.generate as gen

    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    argv = ["generate", "--model", str(tiny_flux_dir), "--region", "a@0,0,1,1", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert "--region boxes are fractions of the frame: give --height and --width" in capsys.readouterr().err


def test_attn_regional_is_accepted(captured, tiny_flux_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_flux_dir), "--height", "32", "--width", "32", "--steps", "1"]
    assert main([*argv, "--attn", "regional:entity_global=false", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "planned" not in err and "Regional has no entities" in err
    ((reg,),) = captured
    assert isinstance(reg, diffusion_attn.Regional) and reg.entity_global is False


def test_list_shows_every_registered_variant_with_options_and_flags(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    diffusion = out[: out.index("Model families")]
    assert "planned" not in diffusion
    for name in diffusion_attn.VARIANTS:
        assert f"\n  {name} " in diffusion
    assert set(variant_registry()) >= {"regional", "boundary"}
    regional = diffusion[diffusion.index("  regional ") : diffusion.index("  boundary ")]
    assert "entity_global: bool = True" in regional and "--region 'PROMPT@x0,y0,x1,y1'" in regional
    boundary = diffusion[diffusion.index("  boundary ") :]
    assert "loss_scale: float = 30.0" in boundary and "--boundary 'PHRASE@x0,y0,x1,y1'" in boundary


# ----------------------------------------------------------------------------------------------
# effect on real pipelines
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_region_changes_the_image_through_the_kernel(tiny_flux_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_flux_dir), "--height", "32", "--width", "32", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "dense.png")]) == 0
    assert main([*argv, "--region", "a red apple@0,0,0.5,1", "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "[4 attention calls through attnplug]" in out  # 2 steps x 2 joint layers of the tiny FLUX
    dense, regional = (np.asarray(Image.open(tmp_path / f)) for f in ("dense.png", "r.png"))
    assert not np.array_equal(dense, regional)


@pytest.mark.slow
def test_boundary_guides_the_latents_of_a_saved_sd_pipeline(tmp_path, capsys, monkeypatch):
    from tests.diffusion.tiny_layout import PROMPT, tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    applied: list = []
    real_apply = diffusion_attn.apply

    def apply(pipe, *variants, **kw):
        applied.extend(variants)
        return real_apply(pipe, *variants, **kw)

    monkeypatch.setattr(diffusion_attn, "apply", apply)
    argv = ["generate", "--model", str(tmp_path / "sd"), "--prompt", PROMPT, "--height", "64", "--width", "64"]
    argv += ["--steps", "3", "--attn", "boundary:downsample=2,guidance_steps=2,max_iterations=2,loss_threshold=0.0"]
    argv += [
        "--boundary",
        "red fox@0,0,0.5,0.5",
        "--boundary",
        "blue car@0.5,0.25,1,1",
        "--out",
        str(tmp_path / "b.png"),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    (b,) = applied
    assert b.prompt == PROMPT and b.boxes == ((0.0, 0.0, 0.5, 0.5), (0.5, 0.25, 1.0, 1.0))
    assert [h["step"] for h in b.history] == [1, 1, 2, 2]  # the chained callback ran: steps 1..2, two updates each
    for s in (1, 2):
        first, last = (h for h in b.history if h["step"] == s)
        assert last["loss"] < first["loss"]  # the update lowered the layout loss

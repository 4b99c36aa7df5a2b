"""Presets: schema, typed options through attn_spec, planned variants, and every shipped preset run."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import pytest
import torch
import yaml

import diffusion_attn as da
from attn_pipelines.cli import main
from attn_pipelines.config import (
    PLANNED_VARIANTS,
    ConfigError,
    build_variant,
    iter_presets,
    load_preset,
    merge_attn,
    preset_names,
    validate_preset,
)
from attn_pipelines.latent import FAMILY_RULES, check_fit, token_grid
from attn_spec import Spec
from diffusion_attn.variants.base import Variant
from tests.diffusion.tiny import BUILDERS, run

GOOD = {
    "name": "t",
    "description": "d",
    "model": "owner/model",
    "pipeline": {"height": 32, "width": 32, "frames": 1, "steps": 2, "guidance_scale": 3, "dtype": "float32"},
    "attn": [{"radial": {"decay_factor": 0.5}}],
}

#: Shipped presets expected to name a variant that is planned but not implemented yet. Every other
#: preset must run (`test_every_runnable_preset_builds_and_runs`); a preset listed here whose variant
#: has landed runs there automatically.
NOT_YET_RUNNABLE = {
    "flux.1-dev-softpag": "softpag",
    "sd3.5-large-softpag": "softpag",
    "hunyuanvideo-ultravico": "ultravico",
    "wan2.1-t2v-1.3b-ultravico": "ultravico",
}


def _load_all() -> dict[str, object]:
    """name -> Preset, or the ConfigError it raised (reported by a test, not at collection)."""
    out: dict[str, object] = {}
    for name in preset_names():
        try:
            out[name] = load_preset(name)
        except ConfigError as e:
            out[name] = e
    return out


_PRESETS = _load_all()
_BLOCKED = {n: p.missing for n, p in _PRESETS.items() if not isinstance(p, ConfigError) and not p.usable}
RUNNABLE = [
    pytest.param(n, marks=pytest.mark.slow) if n == "hunyuanvideo-gna" else n  # a 10k-token GNA layout: ~30 s
    for n, p in _PRESETS.items()
    if not isinstance(p, ConfigError) and p.usable
]


@dataclasses.dataclass
class _V(Variant):
    name: ClassVar[str] = "v"
    k: int | tuple[int, int, int] = 7
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    opt: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, int) and self.k < 1:
            raise ValueError(f"V.k must be >= 1, got {self.k}")


def test_every_shipped_preset_validates():
    invalid = {n: str(e) for n, e in _PRESETS.items() if isinstance(e, ConfigError)}
    assert not invalid, invalid
    names = preset_names()
    presets = list(iter_presets())
    assert [p.name for p in presets] == names and len(names) >= 10  # name == file stem
    models = {p.model for p in presets}
    for hub_id in (
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "hunyuanvideo-community/HunyuanVideo",
        "THUDM/CogVideoX-5b",
        "Lightricks/LTX-Video",
        "black-forest-labs/FLUX.1-dev",
        "stabilityai/stable-diffusion-3.5-large",
    ):
        assert hub_id in models, hub_id
    assert {p.family for p in presets} == set(FAMILY_RULES)
    assert all(p.attn for p in presets)


def test_presets_that_cannot_run_are_only_the_expected_planned_ones():
    """Not silently skipped: a preset that cannot run is either listed above, with its variant, or fails here."""
    unexpected = {n: m for n, m in _BLOCKED.items() if (NOT_YET_RUNNABLE.get(n),) != m}
    assert not unexpected, f"presets naming unimplemented variants: {unexpected}"
    assert set(NOT_YET_RUNNABLE.values()) <= set(PLANNED_VARIANTS) | set(da.VARIANTS)


@pytest.mark.parametrize("name", sorted(_BLOCKED) or [pytest.param("-", marks=pytest.mark.skip("none blocked"))])
def test_generate_refuses_a_preset_whose_variant_is_not_implemented(name, tmp_path, capsys):
    assert main(["generate", "--config", name, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"variant {NOT_YET_RUNNABLE[name]!r} is planned but not implemented in this version" in err
    assert f"--config {name}" in err and err.count("\n") == 1


def _test_grid(preset, variants, real_grid) -> tuple[int, int, int]:
    """A small token grid for the preset: its own latent frames (variants like UltraViCo act only past
    the training length) on 4x4 tokens; GNA presets get kernel * dilation tokens per axis instead."""
    grid = [real_grid[0], 4, 4]
    for v in variants:
        if isinstance(v, da.Neighborhood):  # the window, not the length, matters (and 30x24x24 would be slow)
            k, d = (x if isinstance(x, tuple) else (x,) * 3 for x in (v.kernel_size, v.dilation))
            grid = [ki * di for ki, di in zip(k, d)]
            grid = [max(g, n) for g, n in zip(grid, (1 if real_grid[0] == 1 else 3, 4, 4))]
    return tuple(grid)  # type: ignore[return-value]


def _tiny(family: str, grid: tuple[int, int, int]):
    f, h, w = grid
    if family == "flux":
        return BUILDERS["flux"](h, w)
    if family == "sd3":
        return BUILDERS["sd3"](2 * h, 2 * w)
    if family == "ltx_video":
        return BUILDERS["ltx_video"](f, h, w)
    return BUILDERS[family](f, 2 * h, 2 * w)


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_runnable_preset_builds_and_runs(name):
    """Every shipped preset whose variants exist: its variants are built from the file, fit the token
    grid of the preset's own size (the CLI's pre-load check), and run on a tiny instance of the
    preset's model family at every phase of their schedule, with calls through attnplug's kernel."""
    preset = load_preset(name)
    variants = [build_variant(s) for s in preset.attn]
    pipe = preset.pipeline
    real_grid = token_grid(FAMILY_RULES[preset.family], pipe["height"], pipe["width"], pipe["frames"])
    check_fit(variants, preset.family, real_grid)
    for v in variants:  # the preset's own steps leave room for the sparse phase
        assert v.inactive_reason(preset.family, pipe["steps"], 0) is None, v
    model, inputs = _tiny(preset.family, _test_grid(preset, variants, real_grid))
    handle = da.apply(model, *variants, num_steps=pipe["steps"], step_source="callback")
    try:
        assert handle.adapter.name == preset.family
        phases = handle.phase_steps()
        for step in phases:
            handle.set_step(step, num_steps=pipe["steps"])
            out = run(model, inputs)
            assert torch.isfinite(out).all()
        assert handle.attention_calls > 0, f"{name}: no call ran through attnplug at steps {phases}"
    finally:
        handle.remove()


def test_check_fit_names_the_variant_and_option():
    needle = r"gna: Neighborhood.kernel_size\[0\] \(frames, extent 3\) must be in \[1, 3\]"
    with pytest.raises(ValueError, match=needle):
        check_fit([da.Neighborhood()], "wan", (3, 4, 4))
    check_fit([da.Neighborhood(kernel_size=3), da.Radial()], "wan", (3, 4, 4))


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"modle": "x/y"}, "unknown key 'modle'; allowed keys: name, description, model"),
        ({"model": None}, "key 'model': expected str, got None"),
        ({"model": "  "}, "key 'model' must not be empty"),
        ({"pipeline": {**GOOD["pipeline"], "stpes": 3}}, "unknown key 'pipeline.stpes'"),
        ({"pipeline": {**GOOD["pipeline"], "steps": "many"}}, "key 'pipeline.steps': expected int, got 'many'"),
        ({"pipeline": {**GOOD["pipeline"], "steps": 2.5}}, "key 'pipeline.steps': expected int, got 2.5"),
        ({"pipeline": {**GOOD["pipeline"], "dtype": "float8"}}, "'pipeline.dtype': expected one of float32, float16"),
        ({"pipeline": {**GOOD["pipeline"], "height": 0}}, "key 'pipeline.height' must be in [1, inf], got 0"),
        ({"pipeline": {**GOOD["pipeline"], "seed": -1}}, "'pipeline.seed' must be in [0, 18446744073709551615]"),
        ({"pipeline": {**GOOD["pipeline"], "seed": 2**64}}, "'pipeline.seed' must be in [0, 18446744073709551615]"),
        ({"pipeline": {**GOOD["pipeline"], "guidance_scale": math.nan}}, "'pipeline.guidance_scale' must be in"),
        ({"pipeline": [1]}, "key 'pipeline': expected dict, got [1]"),
        ({"family": "no-such-family"}, "key 'family' must be one of cogvideox, flux"),
        ({"attn": [{"radiall": {}}]}, "attn[0]: unknown variant 'radiall'; valid variants: radial"),
        ({"attn": [{"radial": {}, "gna": {}}]}, "attn[0] must be a single-key mapping"),
        ({"attn": [{"radial": {}}, {"radial": {}}]}, "more than once"),
        ({"attn": {"radial": {}}}, "key 'attn': expected list"),
        ({"attn": [{"radial": {"decay_factor": "nan"}}]}, "Radial.decay_factor must be in [1e-06, inf], got nan"),
    ],
)
def test_schema_errors_name_key_and_file(patch, needle):
    data = {**GOOD, **patch}
    with pytest.raises(ConfigError) as e:
        validate_preset(data, source="some/file.yaml")
    assert needle in str(e.value) and "some/file.yaml" in str(e.value) and "\n" not in str(e.value)


def test_missing_pipeline_key_and_missing_top_key():
    pipe = dict(GOOD["pipeline"])
    del pipe["dtype"]
    with pytest.raises(ConfigError, match=r"f.yaml: missing required key 'pipeline.dtype'"):
        validate_preset({**GOOD, "pipeline": pipe}, source="f.yaml")
    data = dict(GOOD)
    del data["description"]
    with pytest.raises(ConfigError, match=r"missing required key 'description'"):
        validate_preset(data, source="f.yaml")


def test_option_names_and_values_checked_against_the_dataclass():
    reg = {"v": _V}
    ok = validate_preset({**GOOD, "attn": [{"v": {"k": [1, 3, 3], "mode": "b"}}]}, registry=reg)
    assert build_variant(ok.attn[0], registry=reg) == _V(k=(1, 3, 3), mode="b")
    with pytest.raises(ConfigError, match=r"unknown option 'kk' for variant 'v'; valid options: k, mode, flag, opt"):
        validate_preset({**GOOD, "attn": [{"v": {"kk": 1}}]}, source="p.yaml", registry=reg)
    with pytest.raises(ConfigError, match=r"p.yaml: attn\[0\] v: V.k must be >= 1"):
        validate_preset({**GOOD, "attn": [{"v": {"k": 0}}]}, source="p.yaml", registry=reg)
    with pytest.raises(ConfigError, match=r"v.mode: expected one of a, b, got 'c'"):
        validate_preset({**GOOD, "attn": [{"v": {"mode": "c"}}]}, source="p.yaml", registry=reg)


def test_planned_variant_loads_marked_not_usable():
    planned = [n for n in PLANNED_VARIANTS if n not in da.VARIANTS]
    if not planned:
        pytest.skip("every planned variant is implemented")
    p = validate_preset({**GOOD, "attn": [{planned[0]: {"anything": 1}}]})
    assert not p.usable and p.missing == (planned[0],)
    with pytest.raises(ConfigError, match=f"variant '{planned[0]}' is planned but not implemented"):
        build_variant(p.attn[0])


def test_attn_items_use_the_cli_syntax_too():
    """String items go through the --attn parser; YAML strings like 1e-3 and (1,3,3) parse the same way."""
    reg = {"v": _V}
    p = validate_preset({**GOOD, "attn": ["v:k=(1,3,3),opt=1e-3,flag=true"]}, registry=reg)
    assert p.attn == (Spec("v", {"k": (1, 3, 3), "opt": 0.001, "flag": True}),)
    p = validate_preset({**GOOD, "attn": [{"v": {"k": "(1,3,3)", "opt": "1e-3"}}]}, registry=reg)
    assert build_variant(p.attn[0], registry=reg) == _V(k=(1, 3, 3), opt=0.001)


def test_radial_presets_carry_the_official_settings():
    wan = load_preset("wan2.1-t2v-14b-radial")
    assert (wan.pipeline["height"], wan.pipeline["width"], wan.pipeline["frames"]) == (768, 1280, 69)
    assert wan.attn == (Spec("radial", {"decay_factor": 0.2, "dense_steps": 12, "dense_layers": 1}),)
    hy = load_preset("hunyuanvideo-radial")
    assert hy.attn[0].options == {"decay_factor": 0.95, "dense_steps": 12, "dense_layers": 0}
    assert hy.pipeline["frames"] == 117


def test_merge_attn_cli_over_preset():
    base = (Spec("radial", {"decay_factor": 0.2, "dense_steps": 12}),)
    merged = merge_attn(base, [Spec("radial", {"dense_steps": 20}), Spec("gna", {"kernel_size": 3})])
    assert merged == (Spec("radial", {"decay_factor": 0.2, "dense_steps": 20}), Spec("gna", {"kernel_size": 3}))
    assert merge_attn(base, [Spec("none")]) == ()
    with pytest.raises(ConfigError, match="--attn none takes no options"):
        merge_attn(base, [Spec("none", {"x": 1})])


def test_load_preset_from_path_and_invalid_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "attn": []}))
    assert load_preset(str(p)).model == "owner/model"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_preset(str(p))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_preset(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown preset 'nope'; shipped presets: cogvideox-5b-lite"):
        load_preset("nope")


@pytest.mark.parametrize(
    ("family", "size", "grid"),
    [
        ("wan", (480, 832, 81), (21, 30, 52)),  # 32,760 tokens: Wan2.1 480p x 81 frames
        ("hunyuan_video", (768, 1280, 117), (30, 48, 80)),  # NATTEN's HunyuanVideo grid
        ("cogvideox", (480, 720, 49), (13, 30, 45)),  # 17,550 tokens
        ("ltx_video", (480, 704, 161), (21, 15, 22)),  # LTX-Video: 1:8 in time, 32 x 32 pixels per token
        ("flux", (1024, 1024, 1), (1, 64, 64)),  # 4,096 image tokens
        ("sd3", (1024, 1024, 1), (1, 64, 64)),
    ],
)
def test_token_grids_of_the_families(family, size, grid):
    assert token_grid(FAMILY_RULES[family], *size) == grid

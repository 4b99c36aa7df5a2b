"""Presets and `--attn` specs: schema validation, typed options, merging, shipped presets."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import pytest
import yaml

from attn_pipelines.config import (
    KNOWN_VARIANTS,
    AttnSpec,
    ConfigError,
    build_variant,
    coerce_value,
    iter_presets,
    load_preset,
    merge_attn,
    parse_attn_spec,
    preset_names,
    validate_preset,
    variant_registry,
)
from diffusion_attn.variants.base import Variant

GOOD = {
    "name": "t",
    "description": "d",
    "model": "owner/model",
    "pipeline": {"height": 32, "width": 32, "frames": 1, "steps": 2, "guidance_scale": 3, "dtype": "float32"},
    "attn": [{"radial": {"decay_factor": 0.5}}],
}


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
    names = preset_names()
    assert len(names) >= 10
    presets = list(iter_presets())
    assert [p.name for p in presets] == names  # name == file stem
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
    reg = variant_registry()
    for p in presets:
        assert p.attn, p.name
        for spec in p.attn:
            assert spec.name in KNOWN_VARIANTS
            if spec.name in reg:  # implemented: options build a real variant
                build_variant(spec, registry=reg)


def test_radial_presets_carry_the_official_settings():
    wan = load_preset("wan2.1-t2v-14b-radial")
    assert (wan.pipeline["height"], wan.pipeline["width"], wan.pipeline["frames"]) == (768, 1280, 69)
    assert wan.attn == (AttnSpec("radial", {"decay_factor": 0.2, "dense_steps": 12, "dense_layers": 1}),)
    hy = load_preset("hunyuanvideo-radial")
    assert hy.attn[0].options == {"decay_factor": 0.95, "dense_steps": 12, "dense_layers": 0}
    assert hy.pipeline["frames"] == 117


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"modle": "x/y"}, "unknown key 'modle'"),
        ({"model": None}, "key 'model' must be a non-empty string"),
        ({"pipeline": {**GOOD["pipeline"], "stpes": 3}}, "unknown key 'pipeline.stpes'"),
        ({"pipeline": {**GOOD["pipeline"], "steps": "many"}}, "key 'pipeline.steps' has the wrong type"),
        ({"pipeline": {**GOOD["pipeline"], "dtype": "float8"}}, "'pipeline.dtype' must be one of"),
        ({"pipeline": {**GOOD["pipeline"], "height": 0}}, "'pipeline.height' must be >= 1"),
        ({"attn": [{"radiall": {}}]}, "attn[0]: unknown variant 'radiall'"),
        ({"attn": [{"radial": {}, "gna": {}}]}, "attn[0] must be a single-key mapping"),
        ({"attn": [{"radial": {}}, {"radial": {}}]}, "more than once"),
        ({"attn": {"radial": {}}}, "key 'attn' must be a list"),
    ],
)
def test_schema_errors_name_key_and_file(patch, needle):
    data = {**GOOD, **patch}
    with pytest.raises(ConfigError) as e:
        validate_preset(data, source="some/file.yaml", registry={})
    assert needle in str(e.value) and "some/file.yaml" in str(e.value)


def test_missing_pipeline_key_and_missing_top_key():
    pipe = dict(GOOD["pipeline"])
    del pipe["dtype"]
    with pytest.raises(ConfigError, match=r"f.yaml: missing required key 'pipeline.dtype'"):
        validate_preset({**GOOD, "pipeline": pipe}, source="f.yaml", registry={})
    data = dict(GOOD)
    del data["description"]
    with pytest.raises(ConfigError, match=r"missing required key 'description'"):
        validate_preset(data, source="f.yaml", registry={})


def test_option_names_and_values_checked_against_the_dataclass():
    reg = {"v": _V}
    ok = validate_preset({**GOOD, "attn": [{"v": {"k": [1, 3, 3], "mode": "b"}}]}, registry=reg)
    assert build_variant(ok.attn[0], registry=reg) == _V(k=(1, 3, 3), mode="b")
    with pytest.raises(ConfigError, match=r"unknown option 'kk' for variant 'v'; valid options: k, mode, flag, opt"):
        validate_preset({**GOOD, "attn": [{"v": {"kk": 1}}]}, source="p.yaml", registry=reg)
    with pytest.raises(ConfigError, match=r"invalid options for variant 'v': V.k must be >= 1"):
        validate_preset({**GOOD, "attn": [{"v": {"k": 0}}]}, source="p.yaml", registry=reg)
    with pytest.raises(ConfigError, match=r"v.mode: expected one of \['a', 'b'\]"):
        validate_preset({**GOOD, "attn": [{"v": {"mode": "c"}}]}, source="p.yaml", registry=reg)
    # unimplemented known variant: name accepted, options not checked
    validate_preset({**GOOD, "attn": [{"softpag": {"anything": 1}}]}, registry=reg)


def test_cli_spec_parsing_and_typing():
    spec = parse_attn_spec("v:k=(1,3,3),flag=true,opt=none,mode=b")
    assert spec == AttnSpec("v", {"k": "(1,3,3)", "flag": "true", "opt": "none", "mode": "b"})
    assert build_variant(spec, registry={"v": _V}) == _V(k=(1, 3, 3), flag=True, opt=None, mode="b")
    assert build_variant(parse_attn_spec("v:k=5,opt=0.5"), registry={"v": _V}) == _V(k=5, opt=0.5)
    assert parse_attn_spec("RADIAL") == AttnSpec("radial", {})
    with pytest.raises(ConfigError, match="given twice"):
        parse_attn_spec("v:k=1,k=2")
    with pytest.raises(ConfigError, match=r"expected int \| tuple\[int, int, int\]"):
        build_variant(parse_attn_spec("v:k=(1,2)"), registry={"v": _V})
    with pytest.raises(ConfigError, match="expected bool"):
        build_variant(parse_attn_spec("v:flag=maybe"), registry={"v": _V})


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        ("3", int, 3),
        (3, float, 3.0),
        ("1e-2", float, 0.01),
        ("[1, 2]", tuple[int, ...], (1, 2)),
        ([1, 2], list[float], [1.0, 2.0]),
        ("off", bool, False),
        ("null", int | None, None),
        ("((0,2),(5,6))", tuple, ((0, 2), (5, 6))),
    ],
)
def test_coerce_value(value, tp, expected):
    got = coerce_value(value, tp, where="x")
    assert got == expected and type(got) is type(expected)


def test_merge_attn_cli_over_preset():
    base = (AttnSpec("radial", {"decay_factor": 0.2, "dense_steps": 12}),)
    merged = merge_attn(base, [AttnSpec("radial", {"dense_steps": "20"}), AttnSpec("ultravico", {"alpha": "0.9"})])
    assert merged == (
        AttnSpec("radial", {"decay_factor": 0.2, "dense_steps": "20"}),
        AttnSpec("ultravico", {"alpha": "0.9"}),
    )
    assert merge_attn(base, [AttnSpec("none")]) == ()


def test_load_preset_from_path_and_invalid_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "attn": []}))
    assert load_preset(str(p)).model == "owner/model"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_preset(str(p))
    with pytest.raises(ConfigError, match="no such file"):
        load_preset(str(tmp_path / "missing.yaml"))

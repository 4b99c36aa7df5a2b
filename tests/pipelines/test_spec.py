"""`attn_spec`: the one option parser of `--attn`, presets and `vision_attn.finetune --variant`."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import ClassVar, Literal

import pytest

from attn_spec import Spec, SpecError, build, coerce, describe, format_value, parse_spec, parse_value


@dataclasses.dataclass
class _V:
    name: ClassVar[str] = "v"
    k: int | tuple[int, int, int] = 7
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    opt: float | None = None
    blocks: tuple[int, ...] | None = None
    _private: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, int) and self.k < 1:
            raise ValueError(f"V.k must be in [1, inf], got {self.k}")


REG = {"v": _V}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        ("-10.5", -10.5),
        ("1e-3", 0.001),
        ("(0,1)", (0, 1)),
        ("(0,)", (0,)),
        ("[1, 2]", [1, 2]),
        ("True", True),
        ("true", True),
        ("FALSE", False),
        ("none", None),
        ("null", None),
        ("None", None),
        ("'a,b'", "a,b"),
        ("identity", "identity"),
        ("-inf", -math.inf),
        ("inf", math.inf),
    ],
)
def test_values_are_python_literals_with_a_few_words(text, expected):
    got = parse_value(text)
    assert got == expected and type(got) is type(expected)


def test_nan_parses_to_a_float_nan():
    assert math.isnan(parse_value("nan")) and math.isnan(parse_value("NaN"))


def test_spec_parsing_splits_on_top_level_commas_only():
    s = parse_spec("V:k=(1,3,3),blocks=[0, 1],mode='a,b',opt=0.5")
    assert s == Spec("v", {"k": (1, 3, 3), "blocks": [0, 1], "mode": "a,b", "opt": 0.5})
    assert parse_spec("radial") == Spec("radial", {})
    assert parse_spec(" gna : ") == Spec("gna", {})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty variant spec"),
        ("v:k", "option 'k' is not key=value"),
        ("v:k=1,k=2", "option 'k' given twice"),
        ("v:=3", "is not key=value"),
        ("v x:k=1", "is not a word"),
    ],
)
def test_bad_spec_syntax(text, needle):
    with pytest.raises(SpecError, match=needle) as e:
        parse_spec(text, where="--variant")
    assert str(e.value).startswith("--variant") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "spec",
    [Spec("v", {"k": (1, 3, 3), "mode": "b", "opt": None}), Spec("v", {"blocks": (0,), "mode": "a,b", "opt": -1.5})],
)
def test_str_round_trips(spec):
    assert parse_spec(str(spec)) == spec


def test_format_value_of_strings_quotes_only_when_needed():
    assert format_value("identity") == "identity"
    assert format_value("a,b") == "'a,b'"
    assert format_value("true") == "'true'"  # a bare `true` would parse as a bool


def test_build_types_options_against_the_dataclass():
    v = build(parse_spec("v:k=(1,3,3),flag=true,opt=none,mode=b,blocks=[0,2]"), REG)
    assert v == _V(k=(1, 3, 3), flag=True, opt=None, mode="b", blocks=(0, 2))
    v = build(parse_spec("v:k=5,opt=1"), REG)
    assert v.k == 5 and v.opt == 1.0 and type(v.opt) is float  # int widens to float


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("w", "--attn: unknown variant 'w'; valid variants: v"),
        ("v:kk=1", "unknown option 'kk' for variant 'v'; valid options: k, mode, flag, opt, blocks"),
        ("v:_private=1", "unknown option '_private'"),
        ("v:k=(1,2)", "--attn v.k: expected tuple[int, int, int] (3 items), got (1, 2)"),
        ("v:k=1.5", "v.k: expected int | tuple[int, int, int], got 1.5"),
        ("v:flag=1", "v.flag: expected bool, got 1"),
        ("v:flag=maybe", "v.flag: expected bool, got 'maybe'"),
        ("v:mode=c", "v.mode: expected one of a, b, got 'c'"),
        ("v:opt=big", "v.opt: expected float | None, got 'big'"),
        ("v:blocks=(0,x)", "v.blocks[1]: expected int, got 'x'"),
        ("v:k=0", "--attn v: V.k must be in [1, inf], got 0"),
    ],
)
def test_build_errors_name_the_variant_and_option(text, needle):
    with pytest.raises(SpecError) as e:
        build(parse_spec(text), REG)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        (3, float, 3.0),
        ([1, 2], tuple[int, ...], (1, 2)),
        ((1.0, 2), list[float], [1.0, 2.0]),
        (None, int | None, None),
        (((0, 2), (5, 6)), tuple, ((0, 2), (5, 6))),
        ("x", typing.Any, "x"),
        (True, bool, True),
    ],
)
def test_coerce(value, tp, expected):
    got = coerce(value, tp, where="x")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("value", "tp"), [(True, int), (True, float), (1, bool), ("1", int), (None, int), (1, str)])
def test_coerce_refuses(value, tp):
    with pytest.raises(SpecError):
        coerce(value, tp, where="x")


def test_describe_lists_options_types_and_defaults():
    assert describe(_V)[:2] == [("k", "int | tuple[int, int, int]", 7), ("mode", "Literal['a', 'b']", "a")]


# ----------------------------------------------------------------------------------------------
# every float option of every shipped variant refuses NaN (diffusion_attn's check_range; vision_attn)
# ----------------------------------------------------------------------------------------------
def _all_variant_classes() -> list[type]:
    import diffusion_attn
    import vision_attn

    classes = list(dict.fromkeys(diffusion_attn.VARIANTS.values()))
    classes += [vision_attn.Agent, vision_attn.CoordAttention, vision_attn.ECA]
    return classes


def _float_options() -> list[tuple[type, str]]:
    from attn_spec import option_types

    out = []
    for cls in _all_variant_classes():
        for name, tp in option_types(cls).items():
            if tp is float or float in typing.get_args(tp):
                out.append((cls, name))
    return out


def test_there_are_float_options_to_check():
    names = {f"{cls.__name__}.{name}" for cls, name in _float_options()}
    assert {"Radial.decay_factor", "LiteAttention.threshold"} <= names


@pytest.mark.parametrize(("cls", "option"), _float_options(), ids=lambda x: getattr(x, "__name__", x))
def test_every_float_option_refuses_nan(cls, option):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{option}.*nan"):
        cls(**{option: math.nan})
    with pytest.raises(SpecError, match=rf"--attn x: {cls.__name__}\.{option} .*nan"):
        build(parse_spec(f"x:{option}=nan"), {"x": cls})

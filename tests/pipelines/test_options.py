"""Options declared once: a variant option's range or choices live on its annotation (`Annotated[float,
Range(lo, hi)]`, `BlockSize`), and the Python constructor, the spec parser (`--attn`, presets) and
`attnplug list` all read that one declaration, with the same message naming the option and the range."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Annotated

import pytest

import diffusion_attn as da
from attn_pipelines.cli import main
from attn_spec import (
    OneOf,
    Range,
    SpecError,
    build,
    check_options,
    describe_rules,
    format_value,
    option_rules,
    parse_spec,
)


def _cases() -> list[tuple[type, str, object, object]]:
    out = []
    for cls in dict.fromkeys(da.VARIANTS.values()):
        for name, (tp, rules) in option_rules(cls).items():
            is_float = tp is float or float in typing.get_args(tp)
            for rule in rules:
                if isinstance(rule, OneOf):
                    bads = [max(rule.values) + 1]
                else:
                    bads = [math.nan] if is_float else []
                    if rule.lo is not None:
                        bads.append(rule.lo - 0.5 * max(abs(rule.lo), 1e-3) if is_float else rule.lo - 1)
                        bads += [rule.lo] if rule.lo_open else []
                    if rule.hi is not None:
                        bads.append(rule.hi + 1)
                        bads += [rule.hi] if rule.hi_open else []
                out += [(cls, name, rule, bad) for bad in bads]
    return out


def test_the_converted_variants_declare_their_ranges():
    names = {f"{cls.__name__}.{n}" for cls, n, _, _ in _cases()}
    assert {"Radial.decay_factor", "Radial.block_size", "Boundary.loss_scale", "Regional.block_size"} <= names


@pytest.mark.parametrize(("cls", "option", "rule", "bad"), _cases(), ids=lambda x: getattr(x, "__name__", repr(x)))
def test_constructor_and_spec_parser_give_the_declared_rule_the_same_message(cls, option, rule, bad):
    what = f"one of {rule.values}" if isinstance(rule, OneOf) else f"in {rule}"
    expected = f"{cls.__name__}.{option} must be {what}, got {bad!r}"
    with pytest.raises(ValueError) as direct:
        cls(**{option: bad})
    assert str(direct.value) == expected
    with pytest.raises(SpecError) as parsed:
        build(parse_spec(f"{cls.name}:{option}={format_value(bad)}"), da.VARIANTS)
    assert str(parsed.value) == f"--attn {cls.name}: {expected}"
    if isinstance(rule, Range):  # the closed bounds themselves are inside
        for edge, open_ in ((rule.lo, rule.lo_open), (rule.hi, rule.hi_open)):
            if edge is not None and not open_:
                assert getattr(cls(**{option: edge}), option) == edge


def test_check_options_widens_ints_and_skips_none():
    @dataclass
    class V:
        x: Annotated[float | None, Range(0, 1)] = None
        n: Annotated[int, Range(1, 8)] = 2
        b: Annotated[int, OneOf(16, 32)] = 16

        def __post_init__(self) -> None:
            check_options(self)

    assert V().x is None and type(V(x=1).x) is float
    with pytest.raises(TypeError, match=r"^V.n must be int, got 2.0$"):
        V(n=2.0)
    with pytest.raises(ValueError, match=r"^V.b must be one of \(16, 32\), got 64$"):
        V(b=64)
    assert describe_rules(V) == {"x": "in [0, 1]", "n": "in [1, 8]", "b": "one of (16, 32)"}
    assert str(Range(0, 1, lo_open=True)) == "(0, 1]" and str(Range(None, 2, hi_open=True)) == "[-inf, 2)"


def test_list_shows_the_declared_ranges(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "decay_factor: float | None = None  (in [1e-06, inf])" in out
    assert "block_size: int = 128  (one of (16, 32, 64, 128))" in out
    assert "loss_scale: float = 30.0  (in [0.0, 1000000.0])" in out

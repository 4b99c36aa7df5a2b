"""Options declared once: a variant option's range or choices live on its annotation (`Annotated[float,
Range(lo, hi)]`, `BlockSize`), and the Python constructor, the spec parser (`--attn`, presets) and
`attnplug list` all read that one declaration, with the same message naming the option and the range."""

from __future__ import annotations

import math
import re
import types
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


def _registries() -> list[tuple[dict, str]]:
    """(registry, where) of every variant registry the spec parser serves: --attn and finetune --variant."""
    import vision_attn as va

    return [(da.VARIANTS, "--attn"), (va.VARIANTS, "--variant")]


def _bads(tp: object, rule: object) -> list:
    """Values just outside each bound of `rule` (and NaN for float options; an even int for `odd`)."""
    is_float = tp is float or float in typing.get_args(tp)
    if isinstance(rule, OneOf):
        return [max(rule.values) + 1] if all(isinstance(v, int) for v in rule.values) else ["not-a-choice"]
    bads = [math.nan] if is_float else []
    if rule.lo is not None:
        bads.append(rule.lo - 0.5 * max(abs(rule.lo), 1e-3) if is_float else rule.lo - 1)
        bads += [rule.lo] if rule.lo_open else []
        bads += [rule.lo + 1] if rule.odd and rule.lo % 2 else []
    if rule.hi is not None:
        bads.append(rule.hi + 1)
        bads += [rule.hi] if rule.hi_open else []
    if rule.finite:
        bads.append(math.inf)
    return [float(b) for b in bads] if is_float else bads


def _cases() -> list[tuple[type, str, str, object, object]]:
    out = []
    for registry, where in _registries():
        for cls in dict.fromkeys(registry.values()):
            for name, (tp, rules) in option_rules(cls).items():
                out += [(cls, where, name, rule, bad) for rule in rules for bad in _bads(tp, rule)]
    return out


def test_the_converted_variants_declare_their_ranges():
    names = {f"{cls.__name__}.{n}" for cls, _, n, _, _ in _cases()}
    assert {"Radial.decay_factor", "Radial.block_size", "Boundary.loss_scale", "Regional.block_size"} <= names
    assert {
        "Neighborhood.kernel_size",
        "LiteAttention.threshold",
        "LiteAttention.must_do",
        "SoftPAG.scale",
        "SoftPAG.u",
        "UltraViCo.alpha",
        "UltraViCo.train_frames",
        "RIFLEx.k",
        "RIFLEx.factor",
        "AgentSD.merge_ratio",
        "AgentSD.agent_ratio",
        "Regional.height",
        "Agent.num_agents",
        "Agent.dwc_kernel",
        "CoordAttention.reduction",
        "ECA.kernel_size",
    } <= names


def _shaped(tp: object, item: object) -> object:
    """`item` as a value of annotation `tp`: itself where `tp` takes a scalar, else put in `tp`'s tuple shape."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    members = [m for m in (typing.get_args(tp) if union else (tp,)) if m is not type(None)]
    if any(typing.get_origin(m) not in (tuple, list) for m in members):
        return item
    args = typing.get_args(members[0])
    if len(args) == 2 and args[1] is Ellipsis:
        return (_shaped(args[0], item),)
    return tuple(_shaped(a, item) for a in args)


def _kinds(tp: object) -> tuple:
    from attn_spec import _kind

    return _kind(tp)[0]


def _refuses(rule: object, tp: object, value: object) -> bool:
    try:
        rule.check("x", value, _kinds(tp))
    except (TypeError, ValueError):
        return True
    return False


def _registry_of(cls: type) -> dict:
    return next(reg for reg, _ in _registries() if cls in reg.values())


@pytest.mark.parametrize(
    ("cls", "where", "option", "rule", "bad"), _cases(), ids=lambda x: getattr(x, "__name__", repr(x))
)
def test_constructor_and_spec_parser_give_the_declared_rule_the_same_message(cls, where, option, rule, bad):
    """Every declared bound of every registered variant (a new one included): a value just outside it is refused
    by the Python constructor and by the spec parser with one message, naming the option (or the item of a tuple
    option) and the declared requirement; the closed bounds themselves pass the declaration."""
    tp, rules = option_rules(cls)[option]
    value = _shaped(tp, bad)
    with pytest.raises(ValueError) as direct:
        cls(**{option: value})
    message = str(direct.value)
    opt = re.escape(f"{cls.__name__}.{option}")
    assert re.fullmatch(rf"{opt}(\[\d\])*( \(\w+\))? must be .+, got .+", message), message
    assert message.endswith(f", got {bad!r}"), message
    first = next(r for r in rules if _refuses(r, tp, value))  # the rules of an option run in their order
    with pytest.raises(ValueError) as declared:
        first.check(f"{cls.__name__}.{option}", value, _kinds(tp))
    assert message == str(declared.value)  # the declaration's own message, not a hand-written one
    with pytest.raises(SpecError) as parsed:
        build(parse_spec(f"{cls.name}:{option}={format_value(value)}", where=where), _registry_of(cls), where=where)
    assert str(parsed.value) == f"{where} {cls.name}: {message}"
    if isinstance(rule, Range):  # the closed bounds themselves are inside every rule of the option
        for edge, open_ in ((rule.lo, rule.lo_open), (rule.hi, rule.hi_open)):
            if edge is not None and not open_ and not any(_refuses(r, tp, edge) for r in rules):
                try:
                    assert getattr(cls(**{option: _shaped(tp, edge)}), option) == _shaped(tp, edge)
                except ValueError as e:  # refused by a check across options (SoftPAG's start < stop), not the range
                    assert f"{cls.__name__}.{option} must be {rule.text(_kinds(tp))}" not in str(e)


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

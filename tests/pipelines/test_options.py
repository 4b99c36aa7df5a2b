"""Options declared once: a variant option's range or choices live on its annotation (`Annotated[float,
Range(lo, hi)]`, `BlockSize`; for tuple options also `Length`, `Unique`, `Ordered`), and the Python constructor,
the spec parser (`--attn`, presets) and `attnplug list` all read that one declaration, with the same message naming
the option and the range."""

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
    Length,
    OneOf,
    Ordered,
    Range,
    SpecError,
    Unique,
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


def _item(tp: object) -> object:
    """A zero in the shape of one item of the tuple annotation `tp` (0.0 where the items hold floats)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    member = next(m for m in (typing.get_args(tp) if union else (tp,)) if m is not type(None))
    args = typing.get_args(member)
    return _shaped(args[0], 0.0 if float in _kinds(args[0]) else 0) if args else 0


def _values(tp: object, rule: object) -> list[tuple[object, str]]:
    """(value of the option, the end of its message after ', got ') refused by `rule`: values just outside each
    bound (`_bads`, in the option's shape), one item too few / too many, a repeated item, an item not ordered."""
    if isinstance(rule, Length):
        counts = ([rule.lo - 1] if rule.lo else []) + ([rule.hi + 1] if rule.hi is not None else [])
        return [((_item(tp),) * n, str(n)) for n in counts]
    if isinstance(rule, Unique):
        return [((_item(tp),) * 2, repr((_item(tp),) * 2))]
    if isinstance(rule, Ordered):  # every position equal: not increasing
        return [((_item(tp),), repr(_item(tp)))]
    return [(_shaped(tp, bad), repr(bad)) for bad in _bads(tp, rule)]


def _bads(tp: object, rule: object) -> list:
    """Values just outside each bound of `rule` (and NaN for float options; an even int for `odd`, a non-power of
    two for `pow2`)."""
    is_float = tp is float or float in typing.get_args(tp)
    if isinstance(rule, OneOf):
        return [max(rule.values) + 1] if all(isinstance(v, int) for v in rule.values) else ["not-a-choice"]
    bads = [math.nan] if is_float else []
    if rule.lo is not None:
        bads.append(rule.lo - 0.5 * max(abs(rule.lo), 1e-3) if is_float else rule.lo - 1)
        bads += [rule.lo] if rule.lo_open else []
        bads += [rule.lo + 1] if rule.odd and rule.lo % 2 else []
        bads += [3 * max(rule.lo, 1)] if rule.pow2 else []
    if rule.hi is not None:
        bads.append(rule.hi + 1)
        bads += [rule.hi] if rule.hi_open else []
    if rule.finite:
        bads.append(math.inf)
    return [float(b) for b in bads] if is_float else bads


def _cases() -> list[tuple[type, str, str, object, object, str]]:
    out = []
    for registry, where in _registries():
        for cls in dict.fromkeys(registry.values()):
            for name, (tp, rules) in option_rules(cls).items():
                out += [(cls, where, name, rule, *v) for rule in rules for v in _values(tp, rule)]
    return out


def _case_id(x: object) -> str:
    if isinstance(x, tuple) and len(x) > 4:
        return f"<{len(x)} items>"
    return getattr(x, "__name__", repr(x))


def test_the_converted_variants_declare_their_ranges():
    names = {f"{cls.__name__}.{n}" for cls, _, n, _, _, _ in _cases()}
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
    kinds = {(f"{cls.__name__}.{n}", type(rule)) for cls, _, n, rule, _, _ in _cases()}
    assert {  # tuple options: per-item bounds and order, lengths, distinct items
        ("Boundary.boxes", Range),
        ("Boundary.boxes", Ordered),
        ("Boundary.downsample", Range),
        ("Boundary.layers", Length),
        ("AgentSD.layers", Length),
        ("LiteAttention.must_do", Ordered),
        ("SoftPAG.heads", Range),
        ("Regional.entities", Length),
        ("Agent.blocks", Range),
        ("Agent.blocks", Unique),
        ("Agent.stages", Unique),
        ("ECA.mode", OneOf),
        ("CoordAttention.mode", OneOf),
    } <= kinds


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


@pytest.mark.parametrize(("cls", "where", "option", "rule", "value", "tail"), _cases(), ids=_case_id)
def test_constructor_and_spec_parser_give_the_declared_rule_the_same_message(cls, where, option, rule, value, tail):
    """Every declared rule of every registered variant (a new one included): a value just outside it is refused
    by the Python constructor and by the spec parser with one message, naming the option (or the item of a tuple
    option) and the declared requirement (or the rule's own `message`); the closed bounds themselves pass."""
    tp, rules = option_rules(cls)[option]
    with pytest.raises(ValueError) as direct:
        cls(**{option: value})
    message = str(direct.value)
    first = next(r for r in rules if _refuses(r, tp, value))  # the rules of an option run in their order
    with pytest.raises(ValueError) as declared:
        first.check(f"{cls.__name__}.{option}", value, _kinds(tp))
    assert message == str(declared.value)  # the declaration's own message, not a hand-written one
    opt = re.escape(f"{cls.__name__}.{option}")
    if first.message:  # wording kept from before the declaration: it still names the option first
        assert re.match(rf"{opt}\b", message), message
    else:
        assert re.fullmatch(rf"{opt}(\[\d\])*( \(\w+\))? must (be|hold) .+, got .+", message), message
        assert message.endswith(f", got {tail}"), message
    with pytest.raises(SpecError) as parsed:
        build(parse_spec(f"{cls.name}:{option}={format_value(value)}", where=where), _registry_of(cls), where=where)
    assert str(parsed.value) == f"{where} {cls.name}: {message}"
    if isinstance(rule, Length):  # as many items as a bound allows: not refused for their number
        for n in (rule.lo, rule.hi):
            if n is not None:
                try:
                    cls(**{option: (_item(tp),) * n})
                except (TypeError, ValueError) as e:  # refused for the items themselves (Regional's entities)
                    assert str(e) != message
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


def test_tuple_rules_name_the_item_and_keep_a_declared_message():
    @dataclass
    class T:
        boxes: Annotated[
            tuple[tuple[float, float], ...] | None,
            Range(0, 1, message="{name}[{index}] end must be {requirement}, got {bad!r}"),
            Ordered((0, 1), size=2, text="a (lo, hi) pair with lo < hi"),
            Length(1, 3, noun="boxes"),
        ] = None
        ids: Annotated[tuple[int, ...], Range(0, None, words=True), Unique(noun="ids")] = ()
        level: Annotated[int, Range(1, None, pow2=True)] = 1

        def __post_init__(self) -> None:
            check_options(self)

    assert T(boxes=[(0, 1)]).boxes == [(0, 1)] and T(ids=(0, 2)).level == 1
    for kwargs, msg in [
        ({"boxes": ((0.5, 1.5),)}, "T.boxes[0] end must be in [0, 1], got 1.5"),
        ({"boxes": ((0.5, 0.5),)}, "T.boxes[0] must be a (lo, hi) pair with lo < hi, got (0.5, 0.5)"),
        ({"boxes": ((0.1, 0.5), 0.2)}, "T.boxes[1] must be a (lo, hi) pair with lo < hi, got 0.2"),
        ({"boxes": ()}, "T.boxes must hold 1 to 3 boxes, got 0"),
        ({"ids": [1, 2, 1]}, "T.ids must hold distinct ids, got (1, 2, 1)"),
        ({"ids": (1, -1)}, "T.ids[1] must be an int >= 0, got -1"),
        ({"level": 6}, "T.level must be a power of two >= 1, got 6"),
    ]:
        with pytest.raises(ValueError) as e:
            T(**kwargs)
        assert str(e.value) == msg
    with pytest.raises(TypeError, match=r"^T.boxes\[0\] end must be int or float, got 'a'$"):
        T(boxes=(("a", 1),))
    assert describe_rules(T) == {
        "boxes": "in [0, 1], a (lo, hi) pair with lo < hi, 1 to 3 boxes",
        "ids": "an int >= 0, distinct ids",
        "level": "a power of two >= 1",
    }


def test_list_shows_the_declared_ranges(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "decay_factor: float | None = None  (in [1e-06, inf])" in out
    assert "block_size: int = 128  (one of (16, 32, 64, 128))" in out
    assert "loss_scale: float = 30.0  (in [0.0, 1000000.0])" in out
    assert "entities: tuple = ()  (at most 62 entities (membership is a bit mask in an int64))" in out

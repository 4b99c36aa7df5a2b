"""Variant specs: `name:key=value,key=(0,1)` with Python-literal values, typed against a variant dataclass.

One syntax and one typing layer for `attnplug generate --attn`, the `attn:` list of presets and
`python -m vision_attn.finetune --variant`. Standard library only, and it knows no variant: callers
pass their own registry (`{name: dataclass}`), so every attnplug package can import it without an
upward import (imports flow downward; see docs/architecture.md).

    spec = parse_spec("gna:kernel_size=(1,3,3),stride=1")  # Spec("gna", {"kernel_size": (1, 3, 3), "stride": 1})
    variant = build(spec, {"gna": Neighborhood}, where="--attn")  # Neighborhood(kernel_size=(1, 3, 3), stride=1)

Values are Python literals (`0.5`, `(1, 3, 3)`, `True`, `None`, `'text'`); also accepted: `true`,
`false`, `none`, `null` (any case), `nan`, `inf`, `-inf`, and bare words as strings (`mode=identity`).
Every error is a `SpecError` (a ValueError) with a one-line message naming `where`, the variant and
the option.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SpecError", "Spec", "parse_spec", "parse_value", "format_value", "option_fields", "option_types"]
__all__ += [
    "type_name",
    "coerce",
    "build",
    "describe",
    "Rule",
    "Range",
    "OneOf",
    "Length",
    "Unique",
    "Ordered",
    "check_range",
    "option_rules",
    "check_options",
    "require",
    "describe_rules",
]

_WORDS = {"true": True, "false": False, "none": None, "null": None, "nan": math.nan, "inf": math.inf}
_WORDS |= {"+inf": math.inf, "-inf": -math.inf}


class SpecError(ValueError):
    """A spec, an option name or an option value is invalid; the message is one line."""


def format_value(value: Any) -> str:
    """`value` in spec syntax (parses back to an equal value): tuples as (a,b), floats with repr."""
    if isinstance(value, (tuple, list)):
        inner = ",".join(format_value(v) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    if isinstance(value, str):
        return value if _is_bare_word(value) else repr(value)
    return repr(value)


def _is_bare_word(text: str) -> bool:
    return bool(text) and text == text.strip() and parse_value(text) == text and not set(text) & set(",:=()[]{}'\"")


@dataclass(frozen=True)
class Spec:
    """One variant request: registry name and option values (Python values, not yet typed)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={format_value(v)}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


def parse_value(text: str) -> Any:
    """A Python literal, one of the words true/false/none/null/nan/inf (any case), a bracketed list of
    such values, else the text itself (a bare word)."""
    s = text.strip()
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    word = s.lower()
    if word in _WORDS:
        return _WORDS[word]
    if len(s) >= 2 and (s[0], s[-1]) in (("(", ")"), ("[", "]")):  # e.g. (1,nan) or (a,b): element-wise
        items = [parse_value(x) for x in _split_top(s[1:-1])] if s[1:-1].strip() else []
        return tuple(items) if s[0] == "(" else items
    return s


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_spec(text: str, *, where: str = "--attn") -> Spec:
    """Parse `name[:key=value[,key=value...]]`; the name is lower-cased."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"{where}: empty variant spec; expected name[:key=value,...]")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if not name.replace("_", "").isalnum():
        raise SpecError(f"{where} {text!r}: variant name {name!r} is not a word; expected name[:key=value,...]")
    options: dict[str, Any] = {}
    for item in _split_top(rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise SpecError(f"{where} {text!r}: option {item!r} is not key=value")
        if key in options:
            raise SpecError(f"{where} {text!r}: option {key!r} given twice")
        options[key] = parse_value(value)
    return Spec(name, options)


def option_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The user-settable options of a variant dataclass: init fields not starting with '_'."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"variant class {cls!r} is not a dataclass")
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


class Rule:
    """An option's declared requirement, on its annotation (`Annotated[tp, rule, ...]`): `check_options` runs the
    rules of each option in their order, so the constructor and the spec parser refuse a value with the rule's one
    message, and `attnplug list` shows `text()`. Subclasses: Range, OneOf (values), Length, Unique, Ordered (tuples).

    `message`, where a rule has it: the error as a format string instead of the standard one, for wording that
    predates the declaration; its fields are the option's `name` (`Class.option`) and `value` (the whole value),
    and per rule those its docstring lists."""

    message: str = ""

    def check(self, name: str, value: Any, kind: type | tuple) -> None:
        raise NotImplementedError

    def text(self, kind: type | tuple = (int, float)) -> str:
        """The requirement as the error message and `attnplug list` write it."""
        return str(self)

    def _fail(self, standard: str, error: type = ValueError, **fields: Any) -> None:
        raise error(self.message.format(**fields) if self.message else standard)


def _items(value: Any) -> Any:
    """A list item shown as the tuple the option stores."""
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Range(Rule):
    """Bounds of a numeric option, declared on its annotation: `x: Annotated[float, Range(0, 1)] = 0.5`.

    lo / hi are inclusive unless `lo_open` / `hi_open` (None: unbounded); NaN is never in range.
    `check_options` enforces it when the object is built, so the Python constructor and the spec parser give
    the same message: `{option} must be in [lo, hi], got {value}`. `words` writes the requirement as
    comparisons instead (`an int >= 1`, `> 0 and <= 1`); `finite` refuses +-inf (`a finite number >= 0`);
    `odd` asks for an odd int, `pow2` for a power of two; `note` is appended as written (`(a logit multiplier)`,
    `or None`); with `words` or `odd` a value of the wrong type gets that message as a ValueError (else a
    TypeError). A tuple value is checked item by item, each named `option[i]` (with `labels[i]` after it:
    `kernel_size[1] (height)`; with labels, a scalar stands for every item), a nested tuple's values
    `option[i][j]`. `message` (see Rule) has the fields `where` (the value at fault as the standard message
    names it, `option[1] (height)`), `index` / `item` (the tuple option's item holding it; for a scalar None and
    the value), `bad` (the value at fault), `requirement` (the range in words, or the type when `bad` has the
    wrong one) and `bounds` (the comparisons alone: `>= 0`): `"{name}[{index}] coordinate must be
    {requirement}, got {bad!r}"`."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    words: bool = False
    finite: bool = False
    odd: bool = False
    pow2: bool = False
    note: str = ""
    labels: tuple[str, ...] = ()
    message: str = ""

    def bounds(self) -> str:
        """The bounds as comparisons: `>= 1`, `> 0 and <= 1` (empty when unbounded)."""
        out = [f"{'>' if self.lo_open else '>='} {self.lo}"] if self.lo is not None else []
        out += [f"{'<' if self.hi_open else '<='} {self.hi}"] if self.hi is not None else []
        return " and ".join(out)

    def text(self, kind: type | tuple = (int, float), *, finite: bool = False) -> str:
        """The requirement as the error message and `attnplug list` write it: `in [0, 1]`, `an int >= 1`."""
        if self.words or self.odd or self.pow2 or finite:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            subject = (
                "an odd int" if self.odd else "a power of two" if self.pow2 else "a finite number" if finite
                else "an int" if kinds == (int,) else ""
            )  # fmt: skip
            out = " ".join(filter(None, (subject, self.bounds())))
        else:
            out = f"in {self}"
        return f"{out} {self.note}" if self.note else out

    def check(self, name: str, value: Any, kind: type | tuple) -> None:
        items = value
        if self.labels and not isinstance(value, (tuple, list)):  # a scalar stands for every labelled item
            items = (value,) * len(self.labels)
        if isinstance(items, (tuple, list)):  # a tuple option: every item in range
            for i, item in enumerate(items):
                label = f" ({self.labels[i]})" if i < len(self.labels) else ""
                at = {"name": name, "value": _items(value), "index": i, "item": _items(item)}
                self._check_item(f"{name}[{i}]{label}", item, kind, at)
            return
        self._check_item(name, value, kind, {"name": name, "value": value, "index": None, "item": value})

    def _check_item(self, where: str, value: Any, kind: type | tuple, at: dict) -> None:
        if isinstance(value, (tuple, list)):  # nested: (start, end) pairs
            for i, item in enumerate(value):
                self._check_item(f"{where}[{i}]", item, kind, at)
            return
        fields = {**at, "where": where, "bad": value}
        if isinstance(value, bool) or not isinstance(value, kind):
            if self.words or self.odd:  # the requirement names the type ("an int >= 1"): the same message
                req = self.text(kind)
                self._fail(f"{where} must be {req}, got {value!r}", requirement=req, bounds=self.bounds(), **fields)
            kinds = kind if isinstance(kind, tuple) else (kind,)
            types_ = " or ".join(k.__name__ for k in kinds)
            if self.message:
                self._fail("", TypeError, requirement=types_, bounds=types_, **fields)
            check_range(where, value, kind=kind)  # raises the TypeError
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        odd_bad = self.odd and value % 2 == 0
        pow2_bad = self.pow2 and not (isinstance(value, int) and value >= 1 and not value & (value - 1))
        if value != value or lo_bad or hi_bad or odd_bad or pow2_bad:
            req = self.text(kind)
            self._fail(f"{where} must be {req}, got {value!r}", requirement=req, bounds=self.bounds(), **fields)
        if self.finite and value in (math.inf, -math.inf):
            req = self.text(kind, finite=True)
            self._fail(f"{where} must be {req}, got {value!r}", requirement=req, bounds=self.bounds(), **fields)

    def __str__(self) -> str:
        lo = f"{'(' if self.lo_open else '['}{'-inf' if self.lo is None else self.lo}"
        return f"{lo}, {'inf' if self.hi is None else self.hi}{')' if self.hi_open else ']'}"


class OneOf(Rule):
    """The values an option may take, declared on its annotation: `block: Annotated[int, OneOf(16, 32)] = 16`;
    `note` is appended to the requirement as written."""

    def __init__(self, *values: Any, note: str = "") -> None:
        self.values = tuple(values)
        self.note = note

    def check(self, name: str, value: Any, kind: type | tuple) -> None:
        if not any(value == v and type(value) is type(v) for v in self.values):
            raise ValueError(f"{name} must be {self}, got {value!r}")

    def __str__(self) -> str:
        return f"one of {self.values}{f' {self.note}' if self.note else ''}"

    def __repr__(self) -> str:
        return f"OneOf{self.values}"


@dataclass(frozen=True)
class Length(Rule):
    """How many items a tuple option holds, declared on its annotation: `entities: Annotated[tuple,
    Length(hi=62, noun="entities")] = ()`. lo / hi inclusive (None: unbounded); the message is `{option} must
    hold at most 62 entities, got 63`; `note` is appended to the requirement as written; `message` (see Rule)
    has the field `count`. A value that is not a tuple or list is left to the option's type (None: unset)."""

    lo: int | None = None
    hi: int | None = None
    noun: str = "items"
    note: str = ""
    message: str = ""

    def check(self, name: str, value: Any, kind: type | tuple) -> None:
        if not isinstance(value, (tuple, list)):
            return
        n = len(value)
        if (self.lo is not None and n < self.lo) or (self.hi is not None and n > self.hi):
            self._fail(f"{name} must hold {self}, got {n}", name=name, value=_items(value), count=n)

    def __str__(self) -> str:
        lo, hi, noun = self.lo, self.hi, self.noun
        out = (
            f"exactly {lo} {noun}" if lo is not None and lo == hi else f"{lo} to {hi} {noun}" if None not in (lo, hi)
            else f"at least {lo} {noun}" if lo is not None else f"at most {hi} {noun}" if hi is not None
            else f"any number of {noun}"
        )  # fmt: skip
        return f"{out} {self.note}" if self.note else out


@dataclass(frozen=True)
class Unique(Rule):
    """A tuple option's items are distinct, declared on its annotation: `blocks: Annotated[tuple[int, ...],
    Unique()]`; the message is `{option} must hold distinct {noun}, got {value}`; `message` (see Rule) has
    the field `index` (the first repeat). A value that is not a tuple or list is left to the option's type."""

    noun: str = "items"
    message: str = ""

    def check(self, name: str, value: Any, kind: type | tuple) -> None:
        if not isinstance(value, (tuple, list)):
            return
        for i, item in enumerate(value):
            if item in value[:i]:
                self._fail(f"{name} must hold {self}, got {_items(value)!r}", name=name, value=_items(value), index=i)

    def __str__(self) -> str:
        return f"distinct {self.noun}"


class Ordered(Rule):
    """Every item of a tuple option is a tuple of `size` values increasing at the given positions, declared on
    its annotation: `Ordered((0, 2), (1, 3), size=4, text="(x0, y0, x1, y1) with x0 < x1 and y0 < y1")` asks
    item[0] < item[2] and item[1] < item[3] of each item; the message is `{option}[i] must be {text}, got
    {item}`; `message` (see Rule) has the fields `index` and `item`. Values are compared only when they are
    numbers (the option's Range, declared before, refuses the others); a value that is not a tuple or list is
    left to the option's type."""

    def __init__(self, *less: tuple[int, int], size: int | None = None, text: str = "", message: str = "") -> None:
        self.less = tuple(less)
        self.size = size
        self.message = message
        self._text = text or " and ".join(f"item[{a}] < item[{b}]" for a, b in self.less)

    def check(self, name: str, value: Any, kind: type | tuple) -> None:
        if not isinstance(value, (tuple, list)):
            return
        for i, item in enumerate(value):
            if not self._holds(item):
                fields = {"name": name, "value": _items(value), "index": i, "item": _items(item)}
                self._fail(f"{name}[{i}] must be {self}, got {_items(item)!r}", **fields)

    def _holds(self, item: Any) -> bool:
        if not isinstance(item, (tuple, list)) or (self.size is not None and len(item) != self.size):
            return False
        for a, b in self.less:
            x, y = item[a], item[b]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
            if numbers and not x < y:
                return False
        return True

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Ordered{self.less}"


def check_range(
    name: str, value: Any, lo: float | None = None, hi: float | None = None, *, kind: type | tuple = (int, float)
) -> None:
    """Raise a TypeError naming `name` when `value` is not of `kind` (bools are not numbers), a ValueError naming
    `name` and the allowed range when it is outside [lo, hi] (None: unbounded; NaN is never in range)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise TypeError(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):  # NaN: never in range
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")


def require(ok: bool, name: str, requirement: str, value: Any) -> None:
    """A check no annotation can declare (across options, or against a model), worded like `check_options`:
    raise `ValueError("{name} must be {requirement}, got {value!r}")` unless `ok`."""
    if not ok:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def option_rules(cls: type) -> dict[str, tuple[Any, tuple]]:
    """{option: (annotation without its metadata, (Range / OneOf / ..., ...))} for the options of `cls` whose
    annotation declares rules: `Annotated[..., Range(...)]`, `Annotated[..., OneOf(...)]` (any `Rule`)."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as e:  # never skip declared ranges silently
        raise TypeError(
            f"the option annotations of {cls.__name__} cannot be resolved ({e}); import their names at module level"
        ) from e
    out = {}
    for name in option_fields(cls):
        tp = hints.get(name)
        if typing.get_origin(tp) is typing.Annotated:
            rules = tuple(m for m in tp.__metadata__ if isinstance(m, Rule))
            if rules:
                out[name] = (tp.__origin__, rules)
    return out


def _kind(tp: Any) -> tuple[tuple, bool]:
    """(accepted Python types, None allowed) of a numeric annotation: float accepts int (widened)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    optional = type(None) in args
    members = [a for a in args if a is not type(None)]
    kinds: list[type] = []
    for m in members:
        if typing.get_origin(m) in (tuple, list):  # a tuple option: the kinds of its items
            for item in typing.get_args(m):
                kinds += [k for k in _kind(item)[0] if k is not object] if item is not Ellipsis else []
        else:
            kinds += [int, float] if m is float else [m] if isinstance(m, type) else []
    return tuple(dict.fromkeys(kinds)) or (object,), optional


def check_options(obj: Any) -> None:
    """Enforce the declared ranges and choices of a dataclass instance's options (the one place they live):
    the error names `Class.option` and the range; a float option given an int is stored as a float.
    Variants call it first in `__post_init__`; the spec parser reaches it through the constructor."""
    cls = type(obj)
    for name, (tp, rules) in option_rules(cls).items():
        value = getattr(obj, name)
        kind, optional = _kind(tp)
        if value is None and optional:
            continue
        if float in kind and int in kind and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # widened first: the message says 2.0 as the spec parser's would
            object.__setattr__(obj, name, value)
        for rule in rules:
            rule.check(f"{cls.__name__}.{name}", value, kind)


def option_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the options of `cls` (Any where an annotation cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something unimportable: leave those options untyped
        hints = {}
    return {name: hints.get(name, Any) for name in option_fields(cls)}


def type_name(tp: Any) -> str:
    """Readable annotation: `int | None`, `tuple[int, int, int]`, `Literal['a', 'b']`."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def coerce(value: Any, tp: Any, *, where: str) -> Any:
    """`value` checked against annotation `tp` (int widens to float, lists become tuples); SpecError otherwise.

    Understands int, float, bool, str, None, unions, Literal, tuple[...] and list[...]; any other
    annotation accepts instances of it (or anything, for Any and unresolvable annotations).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = SpecError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if tp is Any or isinstance(tp, (str, typing.TypeVar)):
        return value
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise fail
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        seq_errors = []
        for member in args:
            if member is not type(None):
                try:
                    return coerce(value, member, where=where)
                except SpecError as e:
                    if isinstance(value, (tuple, list)) and typing.get_origin(member) in (tuple, list):
                        seq_errors.append(e)
        raise seq_errors[0] if len(seq_errors) == 1 else fail  # a sequence: say which item is wrong
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise SpecError(f"{where}: expected one of {', '.join(format_value(a) for a in args)}, got {value!r}")
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise fail
        if not args or (len(args) == 2 and args[1] is Ellipsis) or origin is list:
            elems = [args[0] if args else Any] * len(value)
        elif len(args) == len(value):
            elems = list(args)
        else:
            raise SpecError(f"{where}: expected {type_name(tp)} ({len(args)} items), got {value!r}")
        out = [coerce(v, t, where=f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, elems))]
        return list(out) if (origin or tp) is list else tuple(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail
    return value  # annotations this layer does not model (Callable, Annotated, ...): the dataclass checks


def build(spec: Spec, registry: Mapping[str, type], *, where: str = "--attn", extra: str = "") -> Any:
    """Instantiate `registry[spec.name]` with the spec's options typed against its fields.

    Unknown names and options list the valid ones; the dataclass's own validation errors (ranges)
    come back as SpecError naming the variant. `extra` is appended to the unknown-name message.
    """
    cls = registry.get(spec.name)
    if cls is None:
        raise SpecError(f"{where}: unknown variant {spec.name!r}; valid variants: {', '.join(registry)}{extra}")
    types_ = option_types(cls)
    unknown = [k for k in spec.options if k not in types_]
    if unknown:
        raise SpecError(
            f"{where}: unknown option {unknown[0]!r} for variant {spec.name!r}; valid options: "
            f"{', '.join(types_) or '(none)'}"
        )
    kwargs = {k: coerce(v, types_[k], where=f"{where} {spec.name}.{k}") for k, v in spec.options.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise SpecError(f"{where} {spec.name}: {msg}") from e


def describe(cls: type) -> list[tuple[str, str, Any]]:
    """(option, type name, default) of every option of `cls` ('<required>' when it has no default)."""
    out = []
    for name, tp in option_types(cls).items():
        f = option_fields(cls)[name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        out.append((name, type_name(tp), default))
    return out


def describe_rules(cls: type) -> dict[str, str]:
    """{option: its declared range or choices as text} (`in [0, 1]`, `one of (16, 32)`) for `attnplug list`."""
    return {name: ", ".join(r.text(_kind(tp)[0]) for r in rules) for name, (tp, rules) in option_rules(cls).items()}

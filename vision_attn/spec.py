"""Variant specs on the command line: `name[:key=value[,key=value...]]` -> a vision_attn variant.

The grammar is the one `attnplug --attn` uses (values in brackets may hold commas, e.g.
`agent:num_agents=16,blocks=(1,2,3)`); values are Python literals (`49`, `0.5`, `(0, 1)`, `None`,
`true` / `false`) or bare strings (`mode=original`). `VARIANTS` is the registry a shared CLI parser
can take as-is; `variant_spec` writes a variant back as a spec (config files round-trip).
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from .variants.agent import Agent
from .variants.coord import CoordAttention
from .variants.eca import ECA

__all__ = ["VARIANTS", "SpecError", "parse_variant", "split_options", "variant_spec"]

#: name accepted in a spec -> vision_attn variant class
VARIANTS: dict[str, type] = {"agent": Agent, "coord": CoordAttention, "eca": ECA}


class SpecError(ValueError):
    """A spec that cannot be parsed or names an unknown variant / option (message names which)."""


def split_options(text: str) -> list[str]:
    """Split `a=1,b=(0,1),c=x` on the commas outside brackets."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_variant(spec: str, *, where: str = "--variant") -> Any:
    """`name:key=value,...` -> a variant instance; errors name the option and list the valid ones."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"{where}: empty variant spec; expected name[:key=value,...] with name in {sorted(VARIANTS)}")
    name, _, opts = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in VARIANTS:
        raise SpecError(f"{where}: unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    cls = VARIANTS[name]
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    kwargs: dict[str, Any] = {}
    for item in split_options(opts):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"{where}: option {item!r} must look like key=value (valid keys for {name}: {fields})")
        if key not in fields:
            raise SpecError(f"{where}: {name} has no option {key!r}; valid options: {fields}")
        if key in kwargs:
            raise SpecError(f"{where}: option {key!r} given twice")
        kwargs[key] = _value(value.strip())
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where} {spec!r}: {e}") from e


def variant_spec(variant: Any) -> str:
    """The spec string of a variant instance (options that differ from the defaults)."""
    name = getattr(variant, "name", None)
    if name not in VARIANTS or not isinstance(variant, VARIANTS[name]):
        raise SpecError(f"variant_spec: {variant!r} is not a vision_attn variant")
    opts = []
    for f in dataclasses.fields(variant):
        value = getattr(variant, f.name)
        if f.init and value != f.default:
            text = repr(value).replace(" ", "") if not isinstance(value, str) else value
            opts.append(f"{f.name}={text}")
    return name + (":" + ",".join(opts) if opts else "")

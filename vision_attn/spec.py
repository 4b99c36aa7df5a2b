"""Variant specs on the command line: `name[:key=value[,key=value...]]` -> a vision_attn variant.

The grammar and typing are `attn_spec`'s, shared with `attnplug --attn` and presets (values are
Python literals: `49`, `0.5`, `(0, 1)`, `None`, `true`; bare words are strings: `mode=original`).
This module only adds the vision registry `VARIANTS` and `variant_spec`, which writes a variant back
as a spec (config files round-trip).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attn_spec import Spec, SpecError, build, parse_spec

from .variants.agent import Agent
from .variants.coord import CoordAttention
from .variants.eca import ECA

__all__ = ["VARIANTS", "SpecError", "parse_variant", "variant_spec"]

#: name accepted in a spec -> vision_attn variant class
VARIANTS: dict[str, type] = {"agent": Agent, "coord": CoordAttention, "eca": ECA}


def parse_variant(spec: str, *, where: str = "--variant") -> Any:
    """`name:key=value,...` -> a variant instance (`SpecError` naming the option on any problem)."""
    return build(parse_spec(spec, where=where), VARIANTS, where=where)


def variant_spec(variant: Any) -> str:
    """The spec string of a variant instance (options that differ from the defaults)."""
    name = getattr(variant, "name", None)
    if name not in VARIANTS or not isinstance(variant, VARIANTS[name]):
        raise SpecError(f"variant_spec: {variant!r} is not a vision_attn variant")
    opts = {
        f.name: getattr(variant, f.name)
        for f in dataclasses.fields(variant)
        if f.init and getattr(variant, f.name) != f.default
    }
    return str(Spec(name, opts)) if opts else name

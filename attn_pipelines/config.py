"""Presets (YAML) and the diffusion variants they and `--attn` name.

A preset is a YAML mapping (fields and types: `PresetFile` and `PipelineSettings` below)::

    name: wan2.1-t2v-14b-radial               # the file stem
    description: ...
    model: Wan-AI/Wan2.1-T2V-14B-Diffusers    # Hub id or local directory
    family: wan                               # optional: adapter family; a mismatch with the model is an error
    reference: ...                            # optional: where the settings come from
    pipeline: {height: 768, width: 1280, frames: 69, steps: 50, guidance_scale: 5.0, dtype: bfloat16}
    attn:                                     # variants: {name: {option: value}} or "name:option=value,..."
      - radial: {decay_factor: 0.2, dense_steps: 12, dense_layers: 1}

Types are checked by `attn_spec` (the same layer that types `--attn` options) against the field
annotations of the dataclasses below; ranges by `_RANGES`. Every error is one line naming the key
and the file. A preset may name a planned variant (`PLANNED_VARIANTS`): it loads, `attnplug list`
marks it as not usable, and `generate --config` refuses it, naming the variant.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from attn_spec import Spec, SpecError, build, coerce, option_fields, option_types, parse_spec, parse_value

from .argtypes import MAX_SEED

__all__ = ["PLANNED_VARIANTS", "DTYPES", "ConfigError", "Preset", "PipelineSettings", "variant_registry"]
__all__ += ["build_variant", "merge_attn", "preset_names", "load_preset", "validate_preset", "iter_presets"]
__all__ += ["LAYOUT_FLAGS", "parse_box_item", "layout_specs", "fill_layout"]

#: Names a preset may carry before the variant exists (it loads, marked not usable); `attnplug list` and the
#: errors show only those missing from the registry, so with today's `diffusion_attn.VARIANTS` none is "planned".
PLANNED_VARIANTS: tuple[str, ...] = ("ultravico", "softpag", "regional")
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(SpecError):
    """A preset or an `--attn` spec is invalid; the message names the key (and the file)."""


@dataclass(frozen=True)
class PipelineSettings:
    """`pipeline:` of a preset: generation defaults that CLI flags override."""

    height: int
    width: int
    frames: int
    steps: int
    guidance_scale: float
    dtype: Literal["float32", "float16", "bfloat16"]
    negative_prompt: str | None = None
    fps: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class PresetFile:
    """Top level of a preset file."""

    name: str
    description: str
    model: str
    pipeline: dict
    attn: list
    family: str | None = None
    reference: str | None = None


_RANGES: dict[str, tuple[float, float]] = {
    "height": (1, math.inf),
    "width": (1, math.inf),
    "frames": (1, math.inf),
    "steps": (1, math.inf),
    "fps": (1, math.inf),
    "seed": (0, MAX_SEED),
    "guidance_scale": (-math.inf, math.inf),
}


@dataclass(frozen=True)
class Preset:
    """A validated preset; `missing` lists the planned variants it names that are not implemented."""

    name: str
    description: str
    model: str
    pipeline: dict[str, Any]
    attn: tuple[Spec, ...]
    family: str | None = None
    reference: str | None = None
    source: str = ""
    missing: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> bool:
        """True when every variant it names is implemented in this version."""
        return not self.missing


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
def variant_registry() -> dict[str, type]:
    """`diffusion_attn.VARIANTS`: registry name -> variant dataclass."""
    import diffusion_attn

    return dict(diffusion_attn.VARIANTS)


def build_variant(spec: Spec, *, where: str = "--attn", registry: Mapping[str, type] | None = None) -> Any:
    """The diffusion variant of `spec`, options typed and validated (ConfigError naming variant and option)."""
    registry = variant_registry() if registry is None else registry
    if spec.name in PLANNED_VARIANTS and spec.name not in registry:
        raise ConfigError(
            f"{where}: variant {spec.name!r} is planned but not implemented in this version "
            f"(implemented: {', '.join(registry) or 'none'})"
        )
    planned = [n for n in PLANNED_VARIANTS if n not in registry]
    try:
        return build(spec, registry, where=where, extra=f" (planned, not implemented yet: {', '.join(planned)})")
    except ConfigError:
        raise
    except SpecError as e:
        raise ConfigError(str(e)) from e


def merge_attn(base: tuple[Spec, ...], overrides: list[Spec]) -> tuple[Spec, ...]:
    """Preset variants updated by CLI specs: same name -> options merged (CLI wins), new -> appended.

    A CLI spec named "none" drops every preset variant first (`--attn none` = dense run).
    """
    out: dict[str, dict[str, Any]] = {s.name: dict(s.options) for s in base}
    for spec in overrides:
        if spec.name == "none":
            if spec.options:
                raise ConfigError("--attn none takes no options")
            out.clear()
            continue
        out.setdefault(spec.name, {}).update(spec.options)
    return tuple(Spec(k, v) for k, v in out.items())


# ---------------------------------------------------------------------------------------------
# layout flags: --region (regional) and --boundary (boundary), boxes in fractions of the frame
# ---------------------------------------------------------------------------------------------
#: CLI flag -> (variant it feeds, what its text is, the variant options the flag sets).
LAYOUT_FLAGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "--region": ("regional", "PROMPT", ("entities", "height", "width")),
    "--boundary": ("boundary", "PHRASE", ("phrases", "boxes", "prompt")),
}

Box = tuple[float, float, float, float]


def parse_box_item(text: str, flag: str) -> tuple[str, Box]:
    """`TEXT@x0,y0,x1,y1` -> (TEXT, box): the box in fractions of the frame, 0 <= x0 < x1 <= 1 and
    0 <= y0 < y1 <= 1 ((0, 0) is the top-left corner). The last '@' separates them, so TEXT may hold '@'."""
    what = LAYOUT_FLAGS[flag][1]
    form = f"{what}@x0,y0,x1,y1 with the box in fractions of the frame, e.g. 'a red circle@0,0,0.5,1'"
    phrase, at, coords = str(text).rpartition("@")
    if not at or not phrase.strip():
        raise ConfigError(f"{flag} {text!r}: expected {form}")
    parts = coords.split(",")
    try:
        box = tuple(float(c) for c in parts)
    except ValueError:
        box = ()
    if len(parts) != 4 or len(box) != 4:
        raise ConfigError(f"{flag} {text!r}: the box must be 4 numbers x0,y0,x1,y1; expected {form}")
    x0, y0, x1, y1 = box
    if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in box) or not (x0 < x1 and y0 < y1):
        raise ConfigError(
            f"{flag} {text!r}: box (x0, y0, x1, y1) = {box} must be fractions of the frame in [0, 1] with "
            "x0 < x1 and y0 < y1"
        )
    return phrase.strip(), box  # type: ignore[return-value]


def _flag_items(region: list[str] | None, boundary: list[str] | None) -> dict[str, list[tuple[str, Box]]]:
    given = {"--region": region or [], "--boundary": boundary or []}
    return {flag: [parse_box_item(t, flag) for t in items] for flag, items in given.items() if items}


def layout_specs(
    specs: tuple[Spec, ...], region: list[str] | None = None, boundary: list[str] | None = None
) -> tuple[Spec, ...]:
    """`specs` with the variants the layout flags feed appended when absent (`--region` alone = regional);
    every flag item parsed and range-checked (ConfigError naming the flag). A spec that already sets an option
    the flag sets is refused: the entities / phrases come from one place."""
    out = list(specs)
    for flag in _flag_items(region, boundary):
        name, _, owned = LAYOUT_FLAGS[flag]
        spec = next((s for s in out if s.name == name), None)
        if spec is None:
            out.append(Spec(name))
            continue
        clash = [k for k in owned if k in spec.options]
        if clash:
            raise ConfigError(f"{flag} sets {name}'s {', '.join(owned)}; drop {clash[0]}= from --attn {spec}")
    return tuple(out)


def fill_layout(
    variants: list[Any],
    region: list[str] | None = None,
    boundary: list[str] | None = None,
    *,
    prompt: str | None = None,
    size: tuple[int | None, int | None] | None = None,
    where: str = "--attn",
) -> list[Any]:
    """`variants` with the layout flags' entities and phrases filled in (new objects; the others unchanged).

    Regional gets one entity per `--region` with its box in pixels of `size` = (height, width); Boundary
    the `--boundary` phrases and boxes and `prompt`. Without a size or prompt yet (the first check, before
    the pipeline's defaults are known) nominal ones stand in, so every item and option is validated early.
    """
    items = _flag_items(region, boundary)
    if not items:
        return list(variants)
    out = []
    for v in variants:
        flag = next((f for f in items if LAYOUT_FLAGS[f][0] == getattr(v, "name", None)), None)
        if flag is None:
            out.append(v)
            continue
        _, _, owned = LAYOUT_FLAGS[flag]
        opts = {k: val for k, val in v.options().items() if k not in owned}
        if flag == "--region":
            height, width = size if size is not None else (None, None)
            if size is not None and (height is None or width is None):
                raise ConfigError(
                    "--region boxes are fractions of the frame: give --height and --width (the pipeline's "
                    "default size is not known before loading)"
                )
            height, width = (height or 1, width or 1)
            ents = tuple((p, (x0 * width, y0 * height, x1 * width, y1 * height)) for p, (x0, y0, x1, y1) in items[flag])
            opts.update(entities=ents, height=height, width=width)
        else:
            phrases = tuple(p for p, _ in items[flag])
            text = prompt if prompt is not None else ", ".join(phrases)
            opts.update(phrases=phrases, boxes=tuple(b for _, b in items[flag]), prompt=text)
        try:
            out.append(type(v)(**opts))
        except (TypeError, ValueError) as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"{flag} ({where} {v.name}): {msg}") from e
    return out


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
def _checked(cls: type, data: Any, source: str, prefix: str = "") -> dict[str, Any]:
    """`data` checked against the fields of dataclass `cls`: known keys, required keys, types, ranges."""
    where = prefix.rstrip(".") or "the preset"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a YAML mapping, got {type(data).__name__}")
    types_, fields_ = option_types(cls), option_fields(cls)
    for key in data:
        if key not in types_:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'; allowed keys: {', '.join(types_)}")
    for name, f in fields_.items():
        if name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    out = {}
    for key, value in data.items():
        value = coerce(value, types_[key], where=f"{source}: key '{prefix}{key}'")
        lo, hi = _RANGES.get(key, (None, None))
        if isinstance(value, (int, float)) and lo is not None and not lo <= value <= hi:
            hi_text = "inf" if hi == math.inf else str(hi)
            lo_text = "-inf" if lo == -math.inf else str(lo)
            raise ConfigError(f"{source}: key '{prefix}{key}' must be in [{lo_text}, {hi_text}], got {value!r}")
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{source}: key '{prefix}{key}' must not be empty")
        out[key] = value
    return out


def _attn_item(item: Any, where: str) -> Spec:
    if isinstance(item, str):
        return parse_spec(item, where=where)
    if not (isinstance(item, dict) and len(item) == 1):
        raise ConfigError(f"{where} must be a single-key mapping {{variant: {{option: value}}}}, got {item!r}")
    ((name, opts),) = item.items()
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise ConfigError(f"{where}: options of {name!r} must be a mapping, got {opts!r}")
    # YAML reads 1e-3 and (1, 2) as strings: parse string values the way --attn does
    return Spec(str(name).lower(), {str(k): parse_value(v) if isinstance(v, str) else v for k, v in opts.items()})


def validate_preset(data: Any, *, source: str = "<preset>", registry: Mapping[str, type] | None = None) -> Preset:
    """Validate a parsed preset mapping; ConfigError naming the bad key and `source`."""
    registry = variant_registry() if registry is None else registry
    try:
        top = _checked(PresetFile, data, source)
        pipe = _checked(PipelineSettings, top["pipeline"], source, "pipeline.")
        if top.get("family") is not None:
            import diffusion_attn

            families = list(diffusion_attn.ADAPTERS)
            if top["family"] not in families:
                raise ConfigError(f"{source}: key 'family' must be one of {', '.join(families)}, got {top['family']!r}")
        specs, missing = [], []
        for i, item in enumerate(top["attn"]):
            where = f"{source}: attn[{i}]"
            spec = _attn_item(item, where)
            if spec.name in PLANNED_VARIANTS and spec.name not in registry:
                missing.append(spec.name)  # options cannot be checked until it exists
            else:
                build_variant(spec, where=where, registry=registry)
            specs.append(spec)
    except ConfigError:
        raise
    except SpecError as e:
        raise ConfigError(str(e)) from e
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: key 'attn' lists variant(s) {dup} more than once")
    return Preset(
        name=top["name"],
        description=top["description"],
        model=top["model"],
        pipeline=pipe,
        attn=tuple(specs),
        family=top.get("family"),
        reference=top.get("reference"),
        source=source,
        missing=tuple(missing),
    )


def _configs_dir() -> Any:
    return importlib.resources.files("attn_pipelines.configs")


def preset_names() -> list[str]:
    """Names (file stems) of the presets shipped in `attn_pipelines.configs`."""
    return sorted(p.name[: -len(".yaml")] for p in _configs_dir().iterdir() if p.name.endswith(".yaml"))


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from e


def load_preset(name_or_path: str | Path) -> Preset:
    """A shipped preset by name (`attnplug list`) or a YAML file by path, validated."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--config: no such file {text!r}")
        return validate_preset(_parse_yaml(path.read_text(), str(path)), source=str(path))
    names = preset_names()
    if text not in names:
        raise ConfigError(f"--config: unknown preset {text!r}; shipped presets: {', '.join(names)}")
    res = _configs_dir() / f"{text}.yaml"
    return validate_preset(_parse_yaml(res.read_text(), f"preset {text}"), source=f"preset {text}")


def iter_presets() -> Iterator[Preset]:
    """Every shipped preset, validated (raises on the first invalid one)."""
    for name in preset_names():
        yield load_preset(name)

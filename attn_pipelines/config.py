"""Presets (YAML) and `--attn` specs: parsing, schema validation, variant construction.

A preset is a YAML mapping::

    name: wan2.1-t2v-1.3b-radial          # required, str (the file stem by convention)
    description: ...                       # required, str
    model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers  # required, Hub id (or a local directory)
    family: wan                            # optional, adapter name (informative)
    reference: ...                         # optional, where the settings come from
    pipeline:                              # required: generation defaults (CLI flags override)
      height: 480
      width: 832
      frames: 81
      steps: 50
      guidance_scale: 5.0
      dtype: bfloat16
    attn:                                  # required, list of {variant: {option: value}}
      - radial: {dense_steps: 12, dense_layers: 1, decay_factor: 0.2}

Validation is plain Python (no schema library): every error names the bad key and the file.
Variant names are checked against `KNOWN_VARIANTS` (the project's full list, some of which may
not be implemented yet) plus whatever `diffusion_attn.VARIANTS` registers; option names and
values are checked against the variant's dataclass when the variant is implemented.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "KNOWN_VARIANTS",
    "PIPELINE_KEYS",
    "DTYPES",
    "ConfigError",
    "Preset",
    "AttnSpec",
    "variant_registry",
    "variant_fields",
    "parse_attn_spec",
    "coerce_value",
    "build_variant",
    "merge_attn",
    "preset_names",
    "load_preset",
    "validate_preset",
    "iter_presets",
]

#: Every variant name the project plans for diffusion pipelines (implemented or not).
KNOWN_VARIANTS: tuple[str, ...] = ("radial", "gna", "lite", "ultravico", "softpag", "regional")

#: Pipeline keys a preset may set, with their types.
PIPELINE_KEYS: dict[str, type | tuple[type, ...]] = {
    "height": int,
    "width": int,
    "frames": int,
    "steps": int,
    "guidance_scale": (int, float),
    "dtype": str,
    "negative_prompt": str,
    "fps": int,
    "seed": int,
}
REQUIRED_PIPELINE_KEYS = ("height", "width", "frames", "steps", "guidance_scale", "dtype")
DTYPES = ("float32", "float16", "bfloat16")
_TOP_KEYS_REQUIRED = ("name", "description", "model", "pipeline", "attn")
_TOP_KEYS_OPTIONAL = ("family", "reference")


class ConfigError(ValueError):
    """A preset or an `--attn` spec is invalid; the message names the key (and the file)."""


def _spec_value(v: Any) -> str:
    """A value as `--attn` syntax: sequences as (a,b,c), the rest as str()."""
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_spec_value(x) for x in v) + ")"
    return str(v)


@dataclass(frozen=True)
class AttnSpec:
    """One variant request: registry name plus raw options (typed later against the dataclass)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={_spec_value(v)}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


@dataclass(frozen=True)
class Preset:
    """A validated preset."""

    name: str
    description: str
    model: str
    pipeline: dict[str, Any]
    attn: tuple[AttnSpec, ...]
    family: str | None = None
    reference: str | None = None
    source: str = ""


# ---------------------------------------------------------------------------------------------
# variant registry and typed options
# ---------------------------------------------------------------------------------------------
def variant_registry() -> dict[str, type]:
    """`diffusion_attn.VARIANTS` (name -> dataclass; else `diffusion_attn.variants.VARIANTS`), or {}."""
    try:
        import diffusion_attn
    except ImportError:  # pragma: no cover - the package ships with us
        return {}
    reg = getattr(diffusion_attn, "VARIANTS", None)
    if not isinstance(reg, Mapping):  # the package root may not re-export it yet
        try:
            from diffusion_attn import variants as _variants
        except ImportError:
            return {}
        reg = getattr(_variants, "VARIANTS", None)
    return dict(reg) if isinstance(reg, Mapping) else {}


def _all_variant_names(registry: Mapping[str, type]) -> list[str]:
    return list(dict.fromkeys([*KNOWN_VARIANTS, *registry]))


def variant_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The user-settable options of a variant dataclass (init fields not starting with '_')."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"variant class {cls!r} is not a dataclass")
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to YAML-typed values
        return {}


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its default_factory), or the string '<required>'."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "<required>"


def type_name(tp: Any) -> str:
    """Readable name of a type annotation (`int | None`, `tuple[int, ...]`)."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/parentheses/quotes."""
    parts, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def coerce_value(value: Any, tp: Any, *, where: str) -> Any:
    """Convert `value` (a CLI string or a YAML value) to annotation `tp`; ConfigError naming `where`.

    Supports int, float, bool, str, None, Optional/Union, Literal and tuple/list of those; an
    unknown annotation keeps the YAML-parsed value.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is None:
        if isinstance(value, str) and value.strip()[:1] == "(" and value.strip()[-1:] == ")":
            return coerce_value(value, tuple, where=where)
        return yaml.safe_load(value) if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        errors = []
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return coerce_value(value, member, where=where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value.strip()):
                return a
        raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            s = value.strip()
            if s[:1] in "([" and s[-1:] in ")]":
                s = s[1:-1]
            items = [p for p in _split_top(s) if p != ""] if s else []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        homogeneous = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        if args and not homogeneous and len(args) != len(items):
            raise ConfigError(f"{where}: expected {type_name(tp)} ({len(args)} items), got {value!r}")
        if not args:
            elem_types = [Any] * len(items)
        elif homogeneous:
            elem_types = [args[0]] * len(items)
        else:
            elem_types = list(args)
        out = [coerce_value(v, t, where=f"{where}[{i}]") for i, (v, t) in enumerate(zip(items, elem_types))]
        return tuple(out) if (origin or tp) is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise ConfigError(f"{where}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip(), 10)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value.strip()
        raise ConfigError(f"{where}: expected str, got {value!r}")
    # unknown annotation (a class, a dict type, ...): keep the YAML-typed value
    return yaml.safe_load(value) if isinstance(value, str) else value


def parse_attn_spec(text: str) -> AttnSpec:
    """Parse `name[:key=value[,key=value...]]` (values in brackets may contain commas)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--attn: empty variant spec; expected name[:key=value,...]")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    options: dict[str, Any] = {}
    if rest.strip():
        for item in _split_top(rest):
            if not item:
                continue
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ConfigError(f"--attn {text!r}: option {item!r} is not key=value")
            if key in options:
                raise ConfigError(f"--attn {text!r}: option {key!r} given twice")
            options[key] = val.strip()
    return AttnSpec(name, options)


def check_spec_names(spec: AttnSpec, *, where: str, registry: Mapping[str, type] | None = None) -> None:
    """Check the variant name (against the full list) and, if implemented, its option names."""
    registry = variant_registry() if registry is None else registry
    names = _all_variant_names(registry)
    if spec.name not in names:
        raise ConfigError(f"{where}: unknown variant {spec.name!r}; valid variants: {', '.join(names)}")
    cls = registry.get(spec.name)
    if cls is None:
        return
    valid = variant_fields(cls)
    for key in spec.options:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown option {key!r} for variant {spec.name!r}; valid options: "
                f"{', '.join(valid) or '(none)'}"
            )


def typed_options(spec: AttnSpec, cls: type, *, where: str) -> dict[str, Any]:
    """The spec's options converted to the dataclass field types of `cls`."""
    hints = _field_types(cls)
    return {k: coerce_value(v, hints.get(k, Any), where=f"{where}: {spec.name}.{k}") for k, v in spec.options.items()}


def build_variant(spec: AttnSpec, *, where: str = "--attn", registry: Mapping[str, type] | None = None) -> Any:
    """Instantiate the variant dataclass of `spec` with typed options (ConfigError on any problem)."""
    registry = variant_registry() if registry is None else registry
    check_spec_names(spec, where=where, registry=registry)
    cls = registry.get(spec.name)
    if cls is None:
        impl = ", ".join(registry) or "none"
        raise ConfigError(
            f"{where}: variant {spec.name!r} is not implemented in this version of diffusion_attn (implemented: {impl})"
        )
    kwargs = typed_options(spec, cls, where=where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid options for variant {spec.name!r}: {e}") from e


def merge_attn(base: tuple[AttnSpec, ...], overrides: list[AttnSpec]) -> tuple[AttnSpec, ...]:
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
    return tuple(AttnSpec(k, v) for k, v in out.items())


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
def _configs_dir() -> Any:
    return importlib.resources.files("attn_pipelines.configs")


def preset_names() -> list[str]:
    """Names (file stems) of the presets shipped in `attn_pipelines.configs`."""
    return sorted(p.name[: -len(".yaml")] for p in _configs_dir().iterdir() if p.name.endswith(".yaml"))


def _type_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def validate_preset(data: Any, *, source: str = "<preset>", registry: Mapping[str, type] | None = None) -> Preset:
    """Validate a parsed preset mapping; ConfigError naming the bad key and `source`."""
    registry = variant_registry() if registry is None else registry
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a preset must be a YAML mapping, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS_REQUIRED + _TOP_KEYS_OPTIONAL:
            raise ConfigError(
                f"{source}: unknown key {key!r}; allowed keys: {', '.join(_TOP_KEYS_REQUIRED + _TOP_KEYS_OPTIONAL)}"
            )
    for key in _TOP_KEYS_REQUIRED:
        if key not in data:
            raise ConfigError(f"{source}: missing required key {key!r}")
    for key in ("name", "description", "model", *_TOP_KEYS_OPTIONAL):
        if key in data and not (isinstance(data[key], str) and data[key].strip()):
            raise ConfigError(f"{source}: key {key!r} must be a non-empty string, got {data[key]!r}")
    if "family" in data:
        families = _families()
        if families and data["family"] not in families:
            raise ConfigError(f"{source}: family {data['family']!r} is not one of {', '.join(families)}")
    pipe = data["pipeline"]
    if not isinstance(pipe, dict):
        raise ConfigError(f"{source}: key 'pipeline' must be a mapping, got {type(pipe).__name__}")
    for key, value in pipe.items():
        if key not in PIPELINE_KEYS:
            raise ConfigError(f"{source}: unknown key 'pipeline.{key}'; allowed: {', '.join(PIPELINE_KEYS)}")
        if not _type_ok(value, PIPELINE_KEYS[key]):
            raise ConfigError(f"{source}: key 'pipeline.{key}' has the wrong type: {value!r}")
    for key in REQUIRED_PIPELINE_KEYS:
        if key not in pipe:
            raise ConfigError(f"{source}: missing required key 'pipeline.{key}'")
    for key in ("height", "width", "frames", "steps"):
        if pipe[key] < 1:
            raise ConfigError(f"{source}: key 'pipeline.{key}' must be >= 1, got {pipe[key]!r}")
    if pipe["dtype"] not in DTYPES:
        raise ConfigError(f"{source}: key 'pipeline.dtype' must be one of {', '.join(DTYPES)}, got {pipe['dtype']!r}")
    attn = data["attn"]
    if not isinstance(attn, list):
        raise ConfigError(f"{source}: key 'attn' must be a list of {{variant: {{option: value}}}}")
    specs = []
    for i, item in enumerate(attn):
        where = f"{source}: attn[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not (isinstance(item, dict) and len(item) == 1):
            raise ConfigError(f"{where} must be a single-key mapping {{variant: {{option: value}}}}, got {item!r}")
        ((name, opts),) = item.items()
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: options of {name!r} must be a mapping, got {opts!r}")
        spec = AttnSpec(str(name), {str(k): v for k, v in opts.items()})
        check_spec_names(spec, where=where, registry=registry)
        if spec.name in registry:
            build_variant(spec, where=where, registry=registry)  # types and ranges
        specs.append(spec)
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{source}: key 'attn' lists variant(s) {sorted(dup)} more than once")
    return Preset(
        name=data["name"],
        description=data["description"],
        model=data["model"],
        pipeline=dict(pipe),
        attn=tuple(specs),
        family=data.get("family"),
        reference=data.get("reference"),
        source=source,
    )


def _families() -> list[str]:
    try:
        import diffusion_attn
    except ImportError:  # pragma: no cover
        return []
    adapters = getattr(diffusion_attn, "ADAPTERS", None)
    return list(adapters) if isinstance(adapters, Mapping) else []


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a shipped preset by name (`attnplug list`) or a YAML file by path, validated."""
    text_path = str(name_or_path)
    path = Path(text_path).expanduser()
    if text_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--config: no such file {text_path!r}")
        return validate_preset(_parse_yaml(path.read_text(), str(path)), source=str(path))
    names = preset_names()
    if text_path not in names:
        raise ConfigError(f"--config: unknown preset {text_path!r}; shipped presets: {', '.join(names)}")
    res = _configs_dir() / f"{text_path}.yaml"
    return validate_preset(_parse_yaml(res.read_text(), f"preset {text_path}"), source=f"preset {text_path}")


def iter_presets() -> Iterator[Preset]:
    """Every shipped preset, validated (raises on the first invalid one)."""
    for name in preset_names():
        yield load_preset(name)

"""`attnplug list`: diffusion variants, model families, vision variants, registered timm models, kernel
backends, presets."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from attn_spec import describe, describe_rules

from ..config import LAYOUT_FLAGS, PLANNED_VARIANTS, ConfigError, Preset, load_preset, preset_names, variant_registry

__all__ = ["add_parser", "kernel_backend_lines", "run", "vision_variants"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="variants (diffusion and timm) with options and defaults, families, presets")
    p.set_defaults(func=run)


def vision_variants() -> dict[str, type]:
    """vision_attn's variants by name (`vision_attn.VARIANTS` when it has one)."""
    import vision_attn

    reg = getattr(vision_attn, "VARIANTS", None)
    if isinstance(reg, dict):
        return dict(reg)
    return {cls.name: cls for cls in (vision_attn.Agent, vision_attn.CoordAttention, vision_attn.ECA)}


def _print_variants(registry: dict[str, type]) -> None:
    first: dict[type, str] = {}
    for name, cls in registry.items():
        if cls in first:
            print(f"  {name:<12} alias of {first[cls]}")
            continue
        first[cls] = name
        doc = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())  # the whole first paragraph
        role = getattr(cls, "role", "")
        print(f"  {name:<12} {cls.__name__}{f' [{role}]' if role else ''} {doc}")
        rules = describe_rules(cls)  # declared ranges and choices
        for opt, tp, default in describe(cls):
            print(f"      {opt}: {tp} = {default!r}" + (f"  ({rules[opt]})" if opt in rules else ""))
        for flag, (target, what, owned) in LAYOUT_FLAGS.items():
            if target == name:
                usage = f"{flag} '{what}@x0,y0,x1,y1'"
                print(f"      attnplug generate {usage} (repeatable, box in frame fractions; sets {', '.join(owned)})")


def kernel_backend_lines() -> list[str]:
    """One line per kernel op and per registered backend, read from `attn_kernels.backends`: the
    devices, dtypes, sizes and features each backend declares."""
    from attn_kernels.backends import OPS, all_backends

    lines = []
    for op, table in all_backends().items():
        spec = OPS[op]
        lines.append(f"  {op}: {spec.doc}" if spec.doc else f"  {op}")
        for name, b in table.items():
            missing = [f for f in spec.features if f not in b.features]
            feats = "all" if not missing else f"all but {', '.join(missing)}"
            lines.append(
                f"    {name:<10} devices: {b.describe_devices()}; dtypes: {b.describe_dtypes()}; "
                f"sizes: {b.describe_sizes()}" + (f"; features: {feats}" if spec.features else "")
            )
    return lines


def family_facts(adapter: type) -> str:
    """One line of an adapter's facts: its latent rule (pixels per token, frames per latent), fps, text order."""
    rule = adapter.latent
    if rule is None:
        size = "token grid known after loading"
    else:
        size = f"{rule.multiple} px per token side"
        size += f", {rule.vae_t * rule.patch_t} frames per token frame" if rule.video else ", images"
    fps = f", {adapter.default_fps} fps" if adapter.default_fps else ""
    return f"{size}{fps}, joint text {'first' if adapter.text_first else 'last'}"


def preset_status(p: Preset) -> str:
    """'' for a usable preset, else why it cannot run."""
    if p.usable:
        return ""
    return f"NOT USABLE: needs {', '.join(repr(m) for m in p.missing)}, not implemented in this version"


def run(args: argparse.Namespace) -> int:
    """Print everything a user can name on the command line."""
    import diffusion_attn

    registry = variant_registry()
    print("Diffusion variants (attnplug generate --attn NAME:option=value,...; show-mask --variant):")
    _print_variants(registry)
    planned = [n for n in PLANNED_VARIANTS if n not in registry]
    if planned:
        print(f"  planned, not implemented yet: {', '.join(planned)}")
    print("\nModel families (diffusion_attn adapters; what attnplug knows about each lives on its adapter):")
    for name, adapter in diffusion_attn.ADAPTERS.items():
        print(f"  {name:<14} {', '.join(adapter.model_classes)}: {family_facts(adapter)}")

    import vision_attn
    from vision_attn.models import registered_names

    print("\nVision variants (vision_attn.inject; python -m vision_attn.finetune --variant NAME:option=value,...):")
    _print_variants(vision_variants())
    print("\nRegistered timm models (timm.create_model(NAME) after `import vision_attn`):")
    print("  " + ", ".join(registered_names()))
    del vision_attn

    print("\nKernel backends (backend='auto' takes the first that fits, 'triton' or 'reference' that one):")
    for line in kernel_backend_lines():
        print(line)

    print("\nPresets (attnplug generate --config NAME):")
    presets, broken = [], []
    for name in preset_names():
        try:
            presets.append(load_preset(name))
        except ConfigError as e:  # one bad preset must not hide the others
            broken.append(f"  {name}  [INVALID: {e}]")
    w = max((len(p.name) for p in presets), default=4)
    mw = max((len(p.model) for p in presets), default=5)
    for p in presets:
        variants = ", ".join(str(s) for s in p.attn) or "dense"
        status = f"  [{preset_status(p)}]" if not p.usable else ""
        print(f"  {p.name:<{w}}  {p.model:<{mw}}  {p.family or '?':<13}  {variants}{status}")
    for line in broken:
        print(line)
    return 0

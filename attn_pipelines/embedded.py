"""The CLI's image default: the pipeline `attnplug generate --out x.png` and `attnplug headhunt` use without --model.

One answer for both commands, so a heads file `attnplug headhunt` writes without --model is accepted by
`attnplug generate --attn softpag:heads_file=...` without --model: the world's trained text-to-image model
(`assets/world/t2i`, or `$ATTNPLUG_WORLD_DIR/t2i`) when it is installed, else the untrained tiny FLUX pipeline
built in code (a smoke run; point `ATTNPLUG_WORLD_DIR` at a folder without `t2i/` to choose it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .tiny import TINY_DEFAULTS, UNTRAINED_NOTICE
from .world.t2i import T2I_DEFAULTS, T2I_NOTICE, world_t2i_dir

__all__ = ["EmbeddedImage", "image_default"]


@dataclass(frozen=True)
class EmbeddedImage:
    """The CLI's image default. model: the pipeline directory to load (the world's trained text-to-image model),
    or None: the tiny pipeline `tiny` built in code (`attn_pipelines.tiny.build_tiny_pipeline`); label: how a
    summary names it; defaults: its generation defaults (height, width, frames, steps, guidance_scale, dtype);
    notice: the stderr note saying which one runs."""

    model: str | None
    tiny: str | None
    label: str
    defaults: dict[str, Any] = field(default_factory=dict)
    notice: str = ""


def image_default() -> EmbeddedImage:
    """The world's trained text-to-image model when installed, else the untrained tiny FLUX."""
    folder = world_t2i_dir()
    if folder is not None:
        label = f"<embedded world t2i, trained: {folder}>"
        return EmbeddedImage(str(folder), None, label, dict(T2I_DEFAULTS), T2I_NOTICE.format(path=folder))
    notice = UNTRAINED_NOTICE.format(kind="flux")
    return EmbeddedImage(None, "flux", "<embedded tiny flux, untrained>", dict(TINY_DEFAULTS["flux"]), notice)

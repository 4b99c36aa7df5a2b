"""Build a timm model with an attnplug variant injected, and rebuild one saved by `vision_attn.finetune`.

The model half of fine-tuning, apart from the training script so that `vision_attn.load_finetuned`
needs no part of the trainer (and `python -m vision_attn.finetune` runs a module the package has not
imported).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import models  # noqa: F401  (registers the attnplug timm model names a model name may be)
from .checkpoint import load_checkpoint
from .inject import inject
from .spec import parse_variant

__all__ = ["UsageError", "build_model", "load_finetuned", "new_parameter_names"]


class UsageError(ValueError):
    """A bad command line / data folder: reported as `error: ...` with exit status 2."""


def _create(name: str, num_classes: int, img_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    kwargs = {**kwargs, "num_classes": num_classes}
    if img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:  # CNNs take any input size and no img_size argument
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, **kwargs)


def new_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters attnplug injections created in `model` (registered names included)."""
    return [n for h in getattr(model, "_attnplug_handles", []) if not h.removed for n in h.new_parameter_names]


def build_model(
    model: str,
    num_classes: int,
    *,
    variant: str | None = None,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained_file: str | None = None,
    log=print,
) -> nn.Module:
    """timm model (`img_size` passed where the model takes one) + the variant, then the local file."""
    import timm

    if not timm.is_model(model):
        hint = timm.list_models(f"*{model.split('.')[0][:12]}*")[:8]
        raise UsageError(f"--model: unknown timm model {model!r}" + (f"; similar: {hint}" if hint else ""))
    if pretrained_file is not None and not Path(pretrained_file).is_file():
        raise UsageError(f"--pretrained-file: {pretrained_file!r} does not exist or is not a file")
    spec = parse_variant(variant) if variant else None  # a bad spec fails before building
    net = _create(model, num_classes, img_size, model_kwargs or {})
    if spec is not None:
        inject(net, spec)
    if pretrained_file:
        report = load_checkpoint(net, pretrained_file)
        log(f"--pretrained-file: {report.summary()}")
        if not report.classifier_replaced and not report.classifier_dropped:
            log(f"--pretrained-file: the checkpoint's classifier is kept ({num_classes} classes)")
    return net


def load_finetuned(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model trained by `python -m vision_attn.finetune` (or `vision_attn.calibrate`) from
    its output folder, weights loaded strictly, in eval mode. `model.pretrained_cfg` carries the
    run's data config (input size, mean, std), so `timm.data.resolve_data_config(model=model)`
    reproduces its evaluation transform."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    if not (run / "config.json").is_file() or not (run / "model.safetensors").is_file():
        raise FileNotFoundError(f"load_finetuned: {run} needs config.json and model.safetensors")
    cfg = json.loads((run / "config.json").read_text())
    model = build_model(
        cfg["model"], cfg["num_classes"], variant=cfg.get("variant"), img_size=cfg.get("img_size"),
        model_kwargs=cfg.get("model_kwargs") or {}, log=lambda *_: None,
    )  # fmt: skip
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    data = cfg.get("data_config") or {}
    model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", {}) or {}), **data}
    model.attnplug_config = cfg
    return model.to(device).eval()

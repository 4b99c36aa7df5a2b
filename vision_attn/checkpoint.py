"""Loading a local checkpoint into a (possibly injected) timm model, keeping everything that fits.

timm's own `load_pretrained` drops the classifier whenever `num_classes` differs from the *config*
(1000 for most names), even when the checkpoint's classifier has exactly the requested shape, and
says so only at INFO level. Here the classifier is kept when its shape matches the model's and
replaced (reported, and warned) only when it does not; the first conv is adapted to `in_chans`
as timm does; parameters an injection created may be absent (they keep their init) — anything
else missing, unexpected or of another shape is an error naming the keys.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["LoadReport", "load_checkpoint", "usual_permissions"]

_log = logging.getLogger("vision_attn")


@dataclass
class LoadReport:
    """What `load_checkpoint` did: keys loaded, classifier keys replaced / dropped, new keys left at init."""

    file: str
    loaded: list[str] = field(default_factory=list)
    classifier_replaced: list[str] = field(default_factory=list)  # shape differed: fresh classifier kept
    classifier_dropped: list[str] = field(default_factory=list)  # the model has no classifier (num_classes=0)
    adapted: list[str] = field(default_factory=list)  # first conv adapted to in_chans
    kept_init: list[str] = field(default_factory=list)  # injected parameters the checkpoint lacks

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.file}"]
        if self.classifier_replaced:
            parts.append(f"classifier {self.classifier_replaced} REPLACED by a freshly initialised one (shape differs)")
        if self.classifier_dropped:
            parts.append(f"classifier {self.classifier_dropped} dropped (the model has no classifier)")
        if self.adapted:
            parts.append(f"{self.adapted} adapted to the model's input channels")
        if self.kept_init:
            parts.append(f"{len(self.kept_init)} injected tensors not in the file keep their init")
        return "; ".join(parts)


def _names(value: str | tuple | list | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _few(keys: list[str]) -> str:
    return str(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")


def _read(file: str | Path) -> dict[str, torch.Tensor]:
    from timm.models import load_state_dict

    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(file)!r} does not exist")
    state = load_state_dict(str(path))
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(
    model: nn.Module,
    file: str | Path,
    *,
    classifier: str | tuple[str, ...] | None = None,
    first_conv: str | tuple[str, ...] | None = None,
    optional_keys: set[str] | None = None,
) -> LoadReport:
    """Load `file` (.pth / .pt / .safetensors, timm's `load_state_dict`) into `model`.

    classifier / first_conv: module names as in timm's pretrained cfg (default: the model's cfg);
    optional_keys: keys the file may lack (an injection's new parameters; default: every parameter
    of every attnplug injection on the model).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = _names(classifier if classifier is not None else cfg.get("classifier"))
    first_conv = _names(first_conv if first_conv is not None else cfg.get("first_conv"))
    if optional_keys is None:
        optional_keys = {k for h in getattr(model, "_attnplug_handles", []) if not h.removed for k in h.new_state_keys}
    report = LoadReport(str(file))
    state = _read(file)
    own = model.state_dict()
    is_cls = lambda k: any(k.startswith(c + ".") for c in classifier)  # noqa: E731
    for k in list(state):
        if k in own and own[k].shape != state[k].shape:
            if is_cls(k):
                report.classifier_replaced.append(k)
                state.pop(k)
            elif any(k == c + ".weight" for c in first_conv) and state[k].ndim == own[k].ndim:
                from timm.models._manipulate import adapt_input_conv

                state[k] = adapt_input_conv(own[k].shape[1], state[k])
                report.adapted.append(k)
            else:
                raise RuntimeError(
                    f"checkpoint {file} does not fit {type(model).__name__}: {k} has shape "
                    f"{tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
                )
        elif k not in own and is_cls(k):
            report.classifier_dropped.append(k)
            state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if k not in optional_keys and k not in report.classifier_replaced]
    if bad_missing or unexpected:
        raise RuntimeError(
            f"checkpoint {file} does not fit {type(model).__name__}: missing {_few(bad_missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    report.kept_init = [k for k in missing if k in optional_keys]
    report.loaded = [k for k in state if k in own]
    if report.classifier_replaced:
        msg = f"vision_attn: {report.summary()}"
        _log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return report


def usual_permissions(path: str | os.PathLike) -> Path:
    """Give a file this package wrote the permissions the umask allows (0666 & ~umask), like any file the user
    writes: safetensors >= 0.8 writes through a temporary file and leaves 0600, unreadable to a shared group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)

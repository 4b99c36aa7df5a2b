"""Injection bookkeeping shared by every vision variant: replace / insert modules, undo exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.nn as nn

__all__ = ["InjectionHandle", "VisionVariant", "inject", "get_submodule_parent"]


class VisionVariant(Protocol):
    """What `inject` needs from a variant: a name and an `inject(model, handle)` method."""

    name: str

    def inject(self, model: nn.Module, handle: InjectionHandle) -> None: ...


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """Return (parent module, attribute name) for a dotted submodule path."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, name


_MISSING = object()


@dataclass
class _Replacement:
    parent: nn.Module
    name: str
    old: nn.Module
    new: nn.Module


@dataclass
class InjectionHandle:
    """Records every module swap made by `inject` so `remove()` restores the original objects.

    The original modules are kept (not copied): after `remove()` the model holds the very same
    module objects, so its `state_dict` and outputs are bit-identical to before injection.
    """

    model: nn.Module
    variant: Any = None
    replacements: list[_Replacement] = field(default_factory=list)
    added: list[tuple[nn.Module, str, Any]] = field(default_factory=list)  # (parent, name, previous attr)
    hooks: list[Any] = field(default_factory=list)  # torch RemovableHandles
    attrs: list[tuple[Any, str, Any]] = field(default_factory=list)  # (object, attribute, previous value)
    removed: bool = False

    def replace(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        """Swap `parent.<name>` (attribute, or index of a Sequential/ModuleList) for `new`."""
        old = parent._modules.get(name) if name in parent._modules else None
        if old is None:
            raise ValueError(f"replace(): {type(parent).__name__} has no child module named {name!r}")
        parent._modules[name] = new
        self.replacements.append(_Replacement(parent, name, old, new))

    def insert_after(self, parent: nn.Module, name: str, new: nn.Module) -> nn.Sequential:
        """Replace `parent.<name>` by `Sequential(old, new)`; returns the new Sequential."""
        old = parent._modules.get(name)
        if old is None:
            raise ValueError(f"insert_after(): {type(parent).__name__} has no child module named {name!r}")
        seq = nn.Sequential(old, new)
        self.replace(parent, name, seq)
        return seq

    def set_child(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        """Put `new` at `parent.<name>` where there is no module yet (missing, None or nn.Identity).

        timm blocks keep optional attention in such a slot (`se = None` / `nn.Identity()`), so the
        new parameters get timm's own names (e.g. `layer1.0.se.conv.weight` as in ecaresnet).
        """
        if name in parent._modules and parent._modules[name] is not None:
            self.replace(parent, name, new)
            return
        previous = parent.__dict__.get(name, _MISSING)
        if previous is not _MISSING:
            del parent.__dict__[name]
        parent.add_module(name, new)
        self.added.append((parent, name, previous))

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set a plain attribute or buffer (e.g. a Swin block's window size); restored by `remove()`."""
        self.attrs.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def add_forward_hook(self, module: nn.Module, hook: Any) -> None:
        """Register `hook(module, args, output)` on `module`; removed by `remove()`."""
        self.hooks.append(module.register_forward_hook(hook))

    @property
    def new_modules(self) -> list[nn.Module]:
        return [r.new for r in self.replacements] + [p._modules[n] for p, n, _ in self.added if n in p._modules]

    def remove(self) -> nn.Module:
        """Undo every replacement, last first. Calling it twice is a no-op."""
        if self.removed:
            return self.model
        for h in reversed(self.hooks):
            h.remove()
        self.hooks.clear()
        for obj, name, previous in reversed(self.attrs):
            setattr(obj, name, previous)
        self.attrs.clear()
        for parent, name, previous in reversed(self.added):
            parent._modules.pop(name, None)
            if previous is not _MISSING:
                parent.__dict__[name] = previous
        self.added.clear()
        for r in reversed(self.replacements):
            if r.parent._modules.get(r.name) is not r.new:
                raise RuntimeError(
                    f"remove(): module {r.name!r} of {type(r.parent).__name__} was changed after injection; "
                    "cannot restore it safely"
                )
            r.parent._modules[r.name] = r.old
        self.replacements.clear()
        self.removed = True
        if getattr(self.model, "_attnplug_handles", None):
            self.model._attnplug_handles = [h for h in self.model._attnplug_handles if h is not self]
        return self.model

    def __enter__(self) -> InjectionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def inject(model: nn.Module, variant: VisionVariant) -> InjectionHandle:
    """Inject `variant` into a timm model in place; returns a handle whose `remove()` undoes it.

    On any error the model is restored before the exception propagates (never half-patched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject(model=...) expects a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(variant, "inject"):
        raise TypeError(f"inject(variant=...) expects a vision_attn variant, got {type(variant).__name__}")
    handle = InjectionHandle(model=model, variant=variant)
    try:
        variant.inject(model, handle)
    except BaseException:
        handle.remove()
        raise
    if not (handle.replacements or handle.added or handle.attrs):
        handle.removed = True
        raise ValueError(
            f"inject(): variant {getattr(variant, 'name', type(variant).__name__)!r} found no place to go "
            f"in {type(model).__name__}"
        )
    model._attnplug_handles = [*getattr(model, "_attnplug_handles", []), handle]
    return handle

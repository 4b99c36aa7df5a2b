"""Injection bookkeeping shared by every vision variant: replace / insert modules, undo exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.nn as nn

__all__ = ["InjectionHandle", "VisionVariant", "inject", "get_submodule_parent", "make_view"]


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
_DICTS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
          "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_always_called", "_state_dict_hooks", "_load_state_dict_pre_hooks")  # fmt: skip


def make_view(module: nn.Module, cls: type) -> nn.Module:
    """A new object of `cls` (a subclass of `type(module)`) sharing `module`'s parameters, buffers and
    children, with its own containers: adding a child to the view leaves `module` untouched.

    Used where timm blocks have no slot for a new module: the view's forward (a copy of timm's with
    the new module called in place) runs instead of the block's, and `remove()` puts the original
    object back. No hooks: TorchScript and FX see the new module in the forward.
    """
    if not issubclass(cls, type(module)):
        raise TypeError(f"make_view: {cls.__name__} is not a subclass of {type(module).__name__}")
    view = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in _DICTS:
        if key in state:
            state[key] = type(state[key])(state[key])
    view.__dict__.update(state)
    view._attnplug_view = True
    return view


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
    attrs: list[tuple[Any, str, Any]] = field(default_factory=list)  # (object, attribute, previous value)
    methods: list[tuple[Any, str, Any]] = field(default_factory=list)  # (object, name, previous __dict__ entry)
    new_parameter_names: list[str] = field(default_factory=list)  # parameters the injection created
    new_state_keys: list[str] = field(default_factory=list)  # state_dict keys it added (parameters + buffers)
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

    def set_method(self, obj: Any, name: str, fn: Any) -> None:
        """Shadow `obj.<name>` with `fn` in its instance dict (e.g. `set_input_size` that also re-targets the
        new modules); `remove()` deletes it, so the class's method is back."""
        self.methods.append((obj, name, obj.__dict__.get(name, _MISSING)))
        obj.__dict__[name] = fn

    @property
    def new_modules(self) -> list[nn.Module]:
        """The modules the injection put in (views of timm blocks excluded). An agent module holds timm's
        reused qkv / proj: `new_parameters()` gives exactly the parameters that are new."""
        created = [r.new for r in self.replacements if not getattr(r.new, "_attnplug_view", False)]
        return created + [p._modules[n] for p, n, _ in self.added if n in p._modules]

    def new_parameters(self) -> dict[str, nn.Parameter]:
        """name -> parameter for exactly the parameters this injection created (reused timm modules,
        e.g. agent attention's qkv and proj, are not among them)."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.new_parameter_names if n in params}

    def remove(self) -> nn.Module:
        """Undo every replacement, last first. Calling it twice is a no-op. Injections stacked on one
        model are removed last first (a later one may live inside modules this one created)."""
        if self.removed:
            return self.model
        live = [h for h in getattr(self.model, "_attnplug_handles", []) if not h.removed]
        if live and self in live and live[-1] is not self:
            later = ", ".join(type(h.variant).__name__ for h in live[live.index(self) + 1 :])
            raise RuntimeError(
                f"remove(): {type(self.variant).__name__} was injected before {later}; remove the later injection first"
            )
        for obj, name, previous in reversed(self.attrs):
            setattr(obj, name, previous)
        self.attrs.clear()
        for obj, name, previous in reversed(self.methods):
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous
        self.methods.clear()
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
            r.old.train(r.new.training)  # a view may have been switched to eval/train while injected
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
    if isinstance(variant, type):
        raise TypeError(
            f"inject(variant=...) expects a variant instance, got the class {variant.__name__}: "
            f"use {variant.__name__}() (options as keyword arguments)"
        )
    if not hasattr(variant, "inject"):
        raise TypeError(
            f"inject(variant=...) expects a vision_attn variant (Agent(), CoordAttention(), ECA()), "
            f"got {type(variant).__name__}"
        )
    for h in getattr(model, "_attnplug_handles", []):
        if not h.removed and type(h.variant) is type(variant):
            raise ValueError(
                f"inject(): {type(model).__name__} already has {type(variant).__name__} injected "
                f"({h.variant!r}); call remove() on that handle first instead of injecting it twice"
            )
    handle = InjectionHandle(model=model, variant=variant)
    before = {id(p) for p in model.parameters()}
    before_keys = set(model.state_dict())
    try:
        variant.inject(model, handle)
    except BaseException:
        handle.remove()
        raise
    handle.new_parameter_names = [n for n, p in model.named_parameters() if id(p) not in before]
    handle.new_state_keys = [k for k in model.state_dict() if k not in before_keys]
    if not (handle.replacements or handle.added or handle.attrs or handle.methods):
        handle.removed = True
        raise ValueError(
            f"inject(): variant {getattr(variant, 'name', type(variant).__name__)!r} found no place to go "
            f"in {type(model).__name__}"
        )
    model._attnplug_handles = [*getattr(model, "_attnplug_handles", []), handle]
    return handle

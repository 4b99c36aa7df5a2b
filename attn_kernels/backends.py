"""Kernel backends: declared where they are defined, picked by one chooser, in one vocabulary.

Every kernel op (``attention``, ``agent_attention``, ``eca``, ``coord``) has backends named from
one vocabulary: ``triton`` (the fused kernels) and ``reference`` (exact PyTorch), requested as
``auto``, ``triton`` or ``reference`` (``eager`` is a deprecated alias of ``reference``). A backend
registers itself next to its implementation with `register_backend`, declaring the device types,
dtypes, size rules (head dims, agents, plane width) and features it supports;
`Backend.not_supported_reasons` returns every reason it cannot take a call, not only the first.

`choose_backend` is the one chooser: ``auto`` takes the first registered backend (priority
order) that fits and that ``auto`` may pick on the call's device; an explicit name takes that
backend. When none fits it raises `NoBackendError` listing every backend with every reason.
Decisions are cached per (op, requested name, device type, dtype, sizes, feature flags,
interpreter): a steady-state call costs one dict lookup, never a re-run of the checks.

Why the registry imports kernel modules lazily: Triton is optional on CPU and importing it costs
a third of a second, so an op's modules (`_OP_MODULES`) are imported the first time the chooser or
`attnplug list` asks about that op; a module that cannot be imported is reported as a reason.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ALIASES",
    "BACKEND_NAMES",
    "Backend",
    "Inputs",
    "NoBackendError",
    "Op",
    "SizeRule",
    "all_backends",
    "backends_for",
    "choose_backend",
    "define_op",
    "feature_flags",
    "register_backend",
    "resolve_name",
]

#: The names a caller may request, everywhere (kernels, vision modules, diffusion apply()).
BACKEND_NAMES = ("auto", "triton", "reference")
#: Deprecated spellings still accepted (with a DeprecationWarning) where they were public.
ALIASES = {"eager": "reference"}

#: op -> modules that define (and so register) its backends; imported on first use of the op
_OP_MODULES: dict[str, tuple[str, ...]] = {
    "attention": ("attn_kernels.ops", "attn_kernels.triton_attention"),
    "agent_attention": ("attn_kernels.agent_attn",),
    "eca": ("attn_kernels.channel_attn",),
    "coord": ("attn_kernels.channel_attn",),
}


class NoBackendError(RuntimeError, ValueError):
    """No backend can run the call; the message lists every backend with every reason. Both a
    RuntimeError (cannot run here) and a ValueError (this input is outside what it takes)."""


@dataclass(frozen=True)
class Op:
    """A kernel op: the names of its size facts (`Inputs.dims`, in order) and of its feature flags
    (bit i of the chooser's `flags` is ``features[i]``)."""

    name: str
    dims: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class Inputs:
    """What a backend's fit depends on (hashable). device: device type ("cuda", "cpu", ...);
    dims: the op's size facts (`Op.dims`); features: what the call uses (names from `Op.features`);
    interpret: TRITON_INTERPRET=1 (Triton runs CPU tensors in its interpreter)."""

    device: str
    dtype: torch.dtype
    dims: tuple[int, ...] = ()
    features: frozenset[str] = frozenset()
    interpret: bool = False


@dataclass(frozen=True)
class SizeRule:
    """A declared constraint on one or more entries of `Inputs.dims` (several: checked together,
    e.g. the q/k and v head dims): allowed ``values``, or a ``min`` / ``max``. ``explain``
    optionally rewords the violation (format fields: name, value, min, max, values)."""

    name: str
    index: int | tuple[int, ...]
    values: tuple[int, ...] | None = None
    min: int | None = None
    max: int | None = None
    explain: str | None = None

    def _indices(self) -> tuple[int, ...]:
        return self.index if isinstance(self.index, tuple) else (self.index,)

    def reason(self, dims: tuple[int, ...]) -> str | None:
        """Why ``dims`` break this rule (None when they keep it)."""
        got = [dims[i] for i in self._indices() if i < len(dims)]
        if not got:
            return None
        value = "/".join(str(g) for g in got)
        if self.values is not None and any(g not in self.values for g in got):
            why = f"needs {self.name} in {self.values}, got {value}"
        elif self.max is not None and max(got) > self.max:
            why = f"{self.name} {value} is above the supported maximum {self.max}"
        elif self.min is not None and min(got) < self.min:
            why = f"{self.name} {value} is below the supported minimum {self.min}"
        else:
            return None
        if self.explain:
            why = self.explain.format(name=self.name, value=value, min=self.min, max=self.max, values=self.values)
        return why

    def describe(self) -> str:
        """The rule in words, for `attnplug list`."""
        if self.values is not None:
            return f"{self.name} in {{{', '.join(str(v) for v in self.values)}}}"
        lo = "" if self.min is None else f"{self.min} <= "
        hi = "" if self.max is None else f" <= {self.max}"
        return f"{lo}{self.name}{hi}" if lo or hi else f"{self.name} any"


@dataclass(frozen=True)
class Backend:
    """One registered implementation of an op and what it declares it can run.

    devices: device types it runs on (None: any). interpreter: CPU tensors too under
    TRITON_INTERPRET=1. dtypes: supported dtypes (None: any floating dtype). sizes: `SizeRule`s on
    the op's dims. features: the op features it supports. auto_devices: where ``auto`` may pick it
    (None: wherever it runs), with ``auto_note`` saying why not elsewhere. check: an extra predicate
    returning reasons. priority: ``auto`` tries lower numbers first. fn: the implementation.
    """

    op: str
    name: str
    fn: Callable | None = None
    devices: tuple[str, ...] | None = None
    interpreter: bool = False
    dtypes: tuple[torch.dtype, ...] | None = None
    sizes: tuple[SizeRule, ...] = ()
    features: frozenset[str] = frozenset()
    auto_devices: tuple[str, ...] | None = None
    auto_note: str = ""
    check: Callable[[Inputs], list[str]] | None = None
    priority: int = 0
    doc: str = ""

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Every reason this backend cannot run ``inputs`` (empty when it can)."""
        why: list[str] = []
        if self.devices is not None and inputs.device not in self.devices:
            if not (self.interpreter and inputs.interpret and inputs.device == "cpu"):
                need = " or ".join(self.devices)
                extra = ", or TRITON_INTERPRET=1 for the CPU interpreter" if self.interpreter else ""
                why.append(f"tensors are on {inputs.device} ({self.name} needs {need}{extra})")
        if self.dtypes is not None and inputs.dtype not in self.dtypes:
            why.append(f"dtype {inputs.dtype} is not one of the supported {self.dtypes}")
        elif self.dtypes is None and not inputs.dtype.is_floating_point:
            why.append(f"dtype {inputs.dtype} is not a floating dtype")
        for rule in self.sizes:
            r = rule.reason(inputs.dims)
            if r is not None:
                why.append(r)
        missing = sorted(inputs.features - self.features)
        if missing:
            why.append(f"does not support {', '.join(missing)}")
        if self.check is not None:
            why.extend(self.check(inputs))
        return why

    def auto_reason(self, device: str) -> str | None:
        """Why ``auto`` does not pick this backend on ``device`` (None when it may)."""
        if self.auto_devices is None or device in self.auto_devices:
            return None
        note = f" ({self.auto_note})" if self.auto_note else ""
        return f"'auto' picks it only on {' or '.join(self.auto_devices)}{note}; pass backend='{self.name}'"

    def describe_devices(self) -> str:
        devs = "any device" if self.devices is None else ", ".join(self.devices)
        if self.interpreter:
            devs += " (cpu with TRITON_INTERPRET=1)"
        if self.auto_devices is not None:
            devs += f"; auto on {', '.join(self.auto_devices)}"
        return devs

    def describe_dtypes(self) -> str:
        if self.dtypes is None:
            return "any float"
        return ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)

    def describe_sizes(self) -> str:
        return ", ".join(r.describe() for r in self.sizes) or "any"


#: op name -> Op
OPS: dict[str, Op] = {}
#: op name -> {backend name: Backend}, in priority order
KERNEL_BACKENDS: dict[str, dict[str, Backend]] = {}
#: op name -> import failures of its modules ("module: error")
_IMPORT_ERRORS: dict[str, list[str]] = {}
_LOADED: set[str] = set()
#: the chooser's cache: key -> Backend, or the NoBackendError message
_DECISIONS: dict[tuple, Backend | str] = {}


def define_op(name: str, dims: tuple[str, ...] = (), features: tuple[str, ...] = (), doc: str = "") -> Op:
    """Declare a kernel op's size facts and feature flags (where the op's entry point lives)."""
    op = Op(name, tuple(dims), tuple(features), doc)
    OPS[name] = op
    KERNEL_BACKENDS.setdefault(name, {})
    _DECISIONS.clear()
    return op


def register_backend(
    op: str,
    name: str,
    *,
    devices: tuple[str, ...] | None = None,
    interpreter: bool = False,
    dtypes: tuple[torch.dtype, ...] | None = None,
    sizes: tuple[SizeRule, ...] = (),
    features: tuple[str, ...] | frozenset[str] | None = None,
    auto_devices: tuple[str, ...] | None = None,
    auto_note: str = "",
    check: Callable[[Inputs], list[str]] | None = None,
    priority: int = 0,
    doc: str = "",
) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated function as backend ``name`` of ``op`` (see `Backend`).
    features None: every feature of the op. Re-registering a name replaces it (a module re-import)."""
    if name == "auto" or name in ALIASES or not name.isidentifier():
        raise ValueError(
            f"register_backend: name must be an identifier other than 'auto' and {list(ALIASES)}, got {name!r}"
        )
    if op not in OPS:
        raise ValueError(f"register_backend: op {op!r} is not defined (define_op first); defined: {sorted(OPS)}")
    spec = OPS[op]
    feats = frozenset(spec.features if features is None else features)
    unknown = feats - set(spec.features)
    if unknown:
        raise ValueError(f"register_backend: {op} has no features {sorted(unknown)}; it has {spec.features}")

    def deco(fn: Callable) -> Callable:
        b = Backend(op, name, fn, None if devices is None else tuple(devices), interpreter,
                    None if dtypes is None else tuple(dtypes), tuple(sizes), feats,
                    None if auto_devices is None else tuple(auto_devices), auto_note, check, priority,
                    doc or " ".join((fn.__doc__ or "").split("\n\n")[0].split()))  # fmt: skip
        table = dict(KERNEL_BACKENDS.get(op, {}))
        table[name] = b
        KERNEL_BACKENDS[op] = dict(sorted(table.items(), key=lambda kv: kv[1].priority))
        _DECISIONS.clear()
        return fn

    return deco


def _load(op: str) -> None:
    """Import the modules that register ``op``'s backends (once; failures become reasons)."""
    if op in _LOADED:
        return
    _LOADED.add(op)
    for mod in _OP_MODULES.get(op, ()):
        try:
            importlib.import_module(mod)
        except Exception as e:  # e.g. no triton on this platform
            _IMPORT_ERRORS.setdefault(op, []).append(f"{mod} could not be imported ({type(e).__name__}: {e})")


def backends_for(op: str) -> dict[str, Backend]:
    """The registered backends of ``op`` in priority order (imports its kernel modules first)."""
    _load(op)
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {sorted(set(OPS) | set(_OP_MODULES))}")
    return dict(KERNEL_BACKENDS[op])


def all_backends() -> dict[str, dict[str, Backend]]:
    """Every op's registered backends (for `attnplug list`)."""
    for op in _OP_MODULES:
        _load(op)
    return {op: dict(table) for op, table in KERNEL_BACKENDS.items()}


def feature_flags(op: str, *names: str) -> int:
    """The chooser's ``flags`` bitmask for feature ``names`` of ``op`` (bit i is ``Op.features[i]``)."""
    _load(op)
    feats = OPS[op].features
    bad = [n for n in names if n not in feats]
    if bad:
        raise ValueError(f"{op} has no features {bad}; it has {feats}")
    return sum(1 << feats.index(n) for n in names)


def resolve_name(owner: str, backend: str) -> str:
    """``backend`` checked against `BACKEND_NAMES`; a deprecated alias (``eager``) is mapped to its
    name with a DeprecationWarning. ``owner`` names the parameter in the error."""
    if backend in BACKEND_NAMES:
        return backend
    if isinstance(backend, str) and backend in ALIASES:
        new = ALIASES[backend]
        warnings.warn(f"{owner}: backend {backend!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=3)
        return new
    raise ValueError(
        f"{owner}: backend must be one of {BACKEND_NAMES} ('eager': deprecated alias of 'reference'), got {backend!r}"
    )


def _inputs(op: str, device: str, dtype: torch.dtype, dims: tuple, flags: int, interpret: bool) -> Inputs:
    feats = OPS[op].features
    return Inputs(device, dtype, tuple(dims), frozenset(f for i, f in enumerate(feats) if flags >> i & 1), interpret)


def _decide(op: str, requested: str, device: str, dtype: torch.dtype, dims: tuple, flags: int,
            interpret: bool) -> Backend | str:  # fmt: skip
    """The chooser proper (uncached): the picked Backend, or the error message listing every reason."""
    _load(op)
    if op not in OPS:  # its module could not be imported (e.g. no triton here), or a typo
        errs = "; ".join(_IMPORT_ERRORS.get(op, ())) or f"unknown kernel op; known: {sorted(OPS)}"
        return f"{op}(backend={requested!r}) cannot run: no backend is registered ({errs})"
    table = dict(KERNEL_BACKENDS[op])
    inputs = _inputs(op, device, dtype, dims, flags, interpret)
    reasons = {name: b.not_supported_reasons(inputs) for name, b in table.items()}
    if requested == "auto":
        for name, b in table.items():
            if not reasons[name] and b.auto_reason(device) is None:
                return b
    elif requested in table and not reasons[requested]:
        return table[requested]
    facts = [str(dtype).removeprefix("torch.")]
    facts += [f"{n} {v}" for n, v in zip(OPS[op].dims, dims)]
    if inputs.features:
        facts.append("features " + ", ".join(sorted(inputs.features)))
    lines = [f"{op}(backend={requested!r}) cannot run on {device} ({'; '.join(facts)}):"]
    if requested not in table and requested != "auto":
        lines.append(f"  {requested}: not registered for {op}")
    for name, b in table.items():
        why = list(reasons[name])
        if requested == "auto" and not why:
            why.append(b.auto_reason(device) or "")
        tag = " (requested)" if name == requested else ""
        lines.append(f"  {name}{tag}: " + ("; ".join(why) if why else f"fits: pass backend={name!r}"))
    for err in _IMPORT_ERRORS.get(op, ()):
        lines.append(f"  (not registered: {err})")
    return "\n".join(lines)


def choose_backend(
    op: str, requested: str, device: str, dtype: torch.dtype, dims: tuple[int, ...] = (), flags: int = 0
) -> Backend:
    """The backend that runs a call of ``op`` (see the module docstring); raises `NoBackendError`
    listing every backend with every reason when none fits. ``requested`` must already be a name
    from `BACKEND_NAMES` (`resolve_name`); ``flags``: `feature_flags` of what the call uses.
    Cached per (op, requested, device type, dtype, dims, flags, interpreter)."""
    key = (op, requested, device, dtype, dims, flags, os.environ.get("TRITON_INTERPRET") == "1")
    hit = _DECISIONS.get(key)
    if hit is None:
        if len(_DECISIONS) >= 1024:  # many distinct shapes (e.g. a head-dim sweep): start over
            _DECISIONS.clear()
        hit = _DECISIONS[key] = _decide(*key)
    if type(hit) is str:
        raise NoBackendError(hit)
    return hit  # type: ignore[return-value]

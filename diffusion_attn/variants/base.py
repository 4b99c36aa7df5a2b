"""What every diffusion variant shares: the token layout of one attention call, the context a
variant sees, the plan it contributes to, and the Variant base class.

Variants know nothing about model classes; adapters build a `TokenLayout` and an `AttnContext`
for each attention call and execute the `AttnPlan` the variants produce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar

import torch

from attn_spec import OneOf, check_options, check_range

from ..registry import ADAPTERS

__all__ = ["TokenLayout", "AttnContext", "AttnPlan", "Variant", "VARIANTS", "check_range", "register_variant"]
__all__ += ["BLOCK_SIZES", "BlockSize", "FamiliesWhere", "adapter_of", "check_options"]


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one (joint) attention sequence sit.

    grid: (frames, height, width) of visual tokens after patchify (images: frames = 1).
    text_len: text tokens in the joint sequence (0 for pure visual self-attention).
    text_first: True for [text, visual] (CogVideoX, FLUX), False for [visual, text]
        (HunyuanVideo, SD3).
    family: the adapter's name (a key of `ADAPTERS`; `adapter_of(family)` gives its facts).
    cross_len: keys of a cross-attention call (its text tokens; the queries are the visual tokens);
        0 for self and joint attention. Only variants with `Variant.cross_attention` see such calls.
    downsample: spatial downsampling of this call's grid relative to the model input's (UNet levels:
        1, 2, 4, ...; always 1 for transformers).
    """

    grid: tuple[int, int, int]
    text_len: int = 0
    text_first: bool = False
    family: str = ""
    cross_len: int = 0
    downsample: int = 1

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"TokenLayout.grid must be 3 positive ints (frames, height, width), got {self.grid}")
        if self.text_len < 0:
            raise ValueError(f"TokenLayout.text_len must be >= 0, got {self.text_len}")
        if self.cross_len < 0 or self.downsample < 1:
            raise ValueError(f"TokenLayout.cross_len must be >= 0 and downsample >= 1, got {self}")

    @property
    def frames(self) -> int:
        return self.grid[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def num_visual(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def seq_len(self) -> int:
        return self.num_visual + self.text_len

    @property
    def key_len(self) -> int:
        """Keys of the call: the text tokens of a cross-attention call, else the whole sequence."""
        return self.cross_len if self.cross_len else self.seq_len

    @property
    def visual_slice(self) -> slice:
        start = self.text_len if self.text_first else 0
        return slice(start, start + self.num_visual)

    @property
    def text_slice(self) -> slice:
        start = 0 if self.text_first else self.num_visual
        return slice(start, start + self.text_len)


@dataclass
class AttnContext:
    """Everything a variant may look at for one attention call.

    step: the pipeline's denoising step (one clock for every denoiser of a pipeline);
    num_steps: the generation's number of steps when known (apply(num_steps=), the pipeline);
    heads: heads of this call; under Ulysses context parallelism a rank holds heads
    [head_offset, head_offset + heads) of the model's, so per-head data is indexed by global head;
    state: per (variant, layer, cache-context branch), cleared at a new generation;
    branch: the cache-context name ("cond", "uncond", ...; None without a context);
    perturbed: True in the extra forward a guidance variant runs (SoftPAG's perturbed pass).
    """

    layer: int
    num_layers: int
    step: int
    timestep: float | None
    layout: TokenLayout
    batch: int
    heads: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype
    state: dict = field(default_factory=dict)
    num_steps: int | None = None
    head_offset: int = 0
    branch: str | None = None
    perturbed: bool = False  # this forward is a guidance variant's perturbed pass (SoftPAG)


@dataclass
class AttnPlan:
    """What the adapter's processor executes for one call; variants fill it in turn."""

    layout: Any = None  # attn_kernels.BlockLayout on the (permuted) sequence; None = dense
    perm: torch.Tensor | None = None  # int64 [N]; attention runs on x[:, :, perm], output un-permuted
    inv: torch.Tensor | None = None  # int64 [N], the inverse of perm (give it with a cached perm: no per-call work)
    modifiers: tuple = ()
    tile_stats: Any = None  # attn_kernels.TileStats
    after: list[Callable[..., None]] = field(default_factory=list)
    # further (layout, modifiers) passes over (query, key) pairs disjoint from the main pass's, merged with
    # it by log-sum-exp (UltraViCo's beta band: another logit factor on some pairs)
    extra: tuple = ()
    # replaces the kernel call: compute(q, k, v, backend) -> out on heads-first [B, H, N, D] tensors (after
    # `perm`); AgentSD's merged agent attention, Boundary's map capture. `extras`: what the adapter hands it
    # for this call (the UNet's block input, AgentSD's merge metric)
    compute: Callable[..., torch.Tensor] | None = None
    extras: dict = field(default_factory=dict)

    @property
    def is_dense(self) -> bool:
        return (
            self.layout is None
            and self.perm is None
            and len(self.modifiers) == 0
            and self.tile_stats is None
            and len(self.extra) == 0
            and self.compute is None
        )  # fmt: skip  (len(): Dynamo cannot trace `not` on a tuple of modifier objects, a graph break)


#: Block sizes of the block-sparse kernel's layouts; `BlockSize` declares a variant's `block_size` option.
BLOCK_SIZES = (16, 32, 64, 128)
BlockSize = Annotated[int, OneOf(*BLOCK_SIZES)]


def adapter_of(family: str) -> Any:
    """The adapter class of `family` (everything known about the family lives on it); ValueError listing the
    registered families for an unknown name."""
    cls = ADAPTERS.get(family)
    if cls is None:
        raise ValueError(f"unknown model family {family!r}; registered adapters: {', '.join(ADAPTERS)}")
    return cls


class FamiliesWhere:
    """`Variant.families` read from the adapters: the registered families whose adapter class passes `test`
    (a capability the variant needs, e.g. a temporal RoPE), so a new adapter file with it is supported."""

    def __init__(self, test: Callable[[Any], bool], what: str) -> None:
        self.test, self.what = test, what

    def __get__(self, obj: Any, owner: type) -> tuple[str, ...]:
        return tuple(name for name, cls in ADAPTERS.items() if self.test(cls))


class _OfficialDefaults:
    """`Variant.family_defaults` read from the adapters: {family: the adapter's `official_defaults[variant name]`},
    so each family's official values (and their sources) live in its adapter file."""

    def __get__(self, obj: Any, owner: type) -> dict[str, dict[str, Any]]:
        key = owner.name
        return {
            name: dict(cls.official_defaults[key])
            for name, cls in ADAPTERS.items()
            if key and key in getattr(cls, "official_defaults", {})
        }


class Variant:
    """Base class of diffusion variants (subclasses are dataclasses validated in __post_init__).

    role: "sparsity" (at most one per `apply`), "modifier" (fused score/output modifiers) or
    "guidance" (adds a perturbed pass). families: adapter names it supports (None = all; `FamiliesWhere`: those
    whose adapter has what the variant needs).
    aliases: further registry names (`VARIANTS`) of the class.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    role: ClassVar[str] = "modifier"
    families: ClassVar[tuple[str, ...] | None] = None
    #: official values, per adapter family, of options left None: {family: {option: value}} (Radial's decay,
    #: RIFLEx's k, ...), read from each adapter's `official_defaults[name]`; a family absent from a non-empty
    #: table is refused, never given another family's values
    family_defaults: ClassVar[dict[str, dict[str, Any]]] = _OfficialDefaults()  # type: ignore[assignment]
    #: options of `family_defaults` whose None is itself a setting ("off"): on a family without defaults they stay
    #: None instead of being refused (UltraViCo's beta band)
    family_optional: ClassVar[tuple[str, ...]] = ()
    #: also planned for cross-attention calls (`TokenLayout.cross_len` > 0; Wan's and UNets' `attn2` are hooked
    #: only when a variant of `apply` sets it); other variants never see them
    cross_attention: ClassVar[bool] = False
    #: the variant's layout only approximates dense attention to save time (Radial, GNA): where its layout
    #: keeps nearly every block, the call runs dense instead (`DENSE_ENGINE_BLOCK_DENSITY`), never slower
    #: than not applying it. Layouts that mean something (Regional's masks) keep False.
    approximates_dense: ClassVar[bool] = False

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        """Contribute to the plan of one attention call; return the (possibly new) plan."""
        raise NotImplementedError

    @classmethod
    def defaults_for(cls, family: str) -> dict[str, Any]:
        """The official defaults of `family` ({} for a variant without family defaults); ValueError naming the
        families that have them when `family` has none."""
        if not cls.family_defaults:
            return {}
        if family not in cls.family_defaults:
            opts = ", ".join(f"{k}=" for k in cls._family_options())
            raise ValueError(
                f"{cls.__name__} has no official defaults for the {family!r} model family (only for "
                f"{', '.join(cls.family_defaults)}); give {opts} explicitly"
            )
        return dict(cls.family_defaults[family])

    @classmethod
    def _family_options(cls) -> list[str]:
        return list(dict.fromkeys(k for d in cls.family_defaults.values() for k in d))

    def family_values(self, family: str) -> dict[str, Any]:
        """The options of `family_defaults` as this variant runs on `family`: its own value, or the family's
        official one where it is None. ValueError (naming the options to give) when one is None and the
        family has no official defaults."""
        own = {k: getattr(self, k) for k in self._family_options()}
        missing = [k for k, v in own.items() if v is None]
        if not missing:
            return own
        if family not in self.family_defaults:
            missing = [k for k in missing if k not in self.family_optional]
            if not missing:
                return own
            raise ValueError(
                f"{type(self).__name__} has no official {', '.join(missing)} for the {family!r} model family "
                f"(official defaults: {', '.join(self.family_defaults)}); give {', '.join(f'{k}=' for k in missing)} "
                "explicitly"
            )
        table = self.family_defaults[family]
        return {k: table[k] if v is None else v for k, v in own.items()}

    def phase_steps(self, family: str, num_steps: int | None = None) -> tuple[int, ...]:
        """One denoising step per phase of this variant (steps whose calls take different code
        paths: dense warm-up, sparse, ...). `AttnHandle.prepare` runs one forward at each, so every
        host-built layout exists before a forward is compiled or captured."""
        return (0,)

    def missing_num_steps(self, num_steps: int | None) -> str | None:
        """An error message when this variant needs the generation's number of steps and neither it nor
        `num_steps` (what the handle knows) gives it; None when it can run."""
        return None

    def inactive_reason(self, family: str, num_steps: int | None, num_layers: int) -> str | None:
        """Why this variant would change nothing in a generation of `num_steps` steps on `num_layers`
        hooked layers (e.g. every step inside a dense warm-up), or None. Logged as a warning."""
        return None

    def check_apply(self, family: str, modules: list, variants: tuple) -> None:
        """Refuse (ValueError naming the option) what cannot run on this model before anything is patched:
        `modules` are the hooked (name, attention module) pairs in layer order, `variants` all of `apply`'s.
        The base refuses a family without official defaults for the options left None (`family_values`)."""
        if self.family_defaults:
            self.family_values(family)

    def model_hook(self, runtime: Any) -> Any:
        """A diffusers `ModelHook` to register on the hooked model after attnplug's step hook (so it wraps
        it), or None. Removed by `handle.remove()`. SoftPAG's perturbed pass and RIFLEx's RoPE use it."""
        return None

    def reset(self) -> None:
        """Forget per-generation state (called by the handle at the start of a new generation)."""

    def options(self) -> dict[str, Any]:
        """The variant's options and their current values (for `attnplug list` and metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} if hasattr(self, "__dataclass_fields__") else {}


#: Every diffusion variant by registry name (`name`, then its `aliases`), filled by `@register_variant` where each
#: variant is defined: the CLI (`--attn`, `attnplug list`), presets and the docs read it.
VARIANTS: dict[str, type[Variant]] = {}


def register_variant(cls: type[Variant]) -> type[Variant]:
    """Class decorator: add a variant to `VARIANTS` under its `name` and `aliases` (a name taken by another
    class is an error, so two variants can never shadow each other)."""
    if not (isinstance(cls, type) and issubclass(cls, Variant)) or not cls.name:
        raise TypeError(f"register_variant: {cls!r} must be a Variant subclass with a non-empty `name`")
    for key in (cls.name, *cls.aliases):
        other = VARIANTS.get(key)
        if other is not None and other.__qualname__ != cls.__qualname__:  # re-import of the same module is fine
            raise ValueError(f"register_variant: {key!r} is already {other.__name__}'s name; pick another")
        VARIANTS[key] = cls
    return cls

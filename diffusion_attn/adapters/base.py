"""What every adapter shares: the `Adapter` base class, the base attention processor and the adapter
registry (`ADAPTERS`, filled by `@register_adapter`; `diffusion_attn.adapters.find_adapter` looks it up once
the package has imported every adapter). The per-transformer runtime the processors call lives in
`diffusion_attn.runtime` (`AttnRuntime` is re-exported here).

An adapter knows one model family: which attention modules to hook, which diffusers processors
it reproduces exactly (any other is refused before patching), how to read the token grid from the
transformer's forward arguments, and a processor that computes q, k, v exactly as the model's own
processor does before handing them to `AttnRuntime.run`.

Per attention call a processor first asks the variants for a plan (from shapes only). A dense
plan runs the model's own processor unchanged: the user's `set_attention_backend`, diffusers'
context parallelism, masks and extra inputs all behave exactly as without attnplug. Only sparse
plans compute q, k, v here and call `attn_kernels.attention`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..clock import STEP_SOURCES
from ..registry import ADAPTERS
from ..runtime import AttnRuntime
from ..runtime.planner import logger
from ..variants.base import AttnPlan, Variant
from .latent import LatentRule, rule_from_dir, token_grid

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AttnRuntime",
    "SparseProcessor",
    "STEP_SOURCES",
    "register_adapter",
    "logger",
]


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter to `ADAPTERS` under its `name`."""
    ADAPTERS[cls.name] = cls
    return cls


def _forwarded(name: str) -> property:
    """An attribute of the original processor seen through ours (absent when the original lacks it),
    so diffusers' `set_attention_backend` / `enable_parallelism` set it where the model's own
    processor reads it, and `remove()` leaves the user's choice in place."""

    def get(self):
        original = self.__dict__.get("original")
        if original is None or not hasattr(original, name):
            raise AttributeError(name)
        return getattr(original, name)

    def set_(self, value):
        original = self.__dict__.get("original")
        if original is None or not hasattr(original, name):
            raise AttributeError(f"{type(original).__name__} has no attribute {name!r}")
        setattr(original, name, value)

    return property(get, set_)


class SparseProcessor:
    """Base of the adapters' processors: the model's own processor for dense plans, the kernel for sparse ones.

    `_attention_backend` / `_parallel_config` are the original processor's (read and written
    through), so they exist exactly when the original has them."""

    _attention_backend = _forwarded("_attention_backend")
    _parallel_config = _forwarded("_parallel_config")

    def __init__(self, runtime: AttnRuntime, layer: int, original: Any) -> None:
        self.__dict__["original"] = original  # plain attribute, also on nn.Module subclasses
        self.runtime = runtime
        self.layer = layer

    def _context_parallel(self) -> Any:
        """diffusers' ParallelConfig when this call runs with context parallelism, else None."""
        original = self.original
        pc = getattr(original, "_parallel_config", None)
        cp = getattr(pc, "context_parallel_config", None)
        if cp is None or cp.ring_degree * cp.ulysses_degree <= 1:
            return None
        return pc

    def plan(
        self, hidden_states: torch.Tensor, *, heads: int, head_dim: int, text_len: int, text_first: bool
    ) -> AttnPlan | None:
        """The variants' plan for this call from shapes only; None = dense (run the model's processor)."""
        rt = self.runtime
        layout = rt.layout(text_len, text_first)
        pc = self._context_parallel()
        offset = 0
        if pc is not None:
            cp = pc.context_parallel_config
            if cp.ulysses_anything or getattr(cp, "ring_anything", False):
                what = "ulysses_anything=True" if cp.ulysses_anything else "ring_anything=True"
                plan = rt.plan(
                    self.layer, layout, hidden_states.shape[0], heads, head_dim, hidden_states.device,
                    hidden_states.dtype,
                )  # fmt: skip
                if plan.is_dense:
                    return None
                raise RuntimeError(
                    f"attnplug[{rt.family}]: diffusers' context parallelism with {what} is not supported by "
                    "sparse variants; use equal shards: ContextParallelConfig(ulysses_degree=N) and/or ring_degree=M"
                )
            degree = cp.ulysses_degree
            if heads % degree:
                raise RuntimeError(f"attnplug[{rt.family}]: {heads} heads cannot be split over ulysses_degree={degree}")
            heads //= degree
            offset = cp._ulysses_local_rank * heads
        plan = rt.plan(
            self.layer, layout, hidden_states.shape[0], heads, head_dim, hidden_states.device, hidden_states.dtype,
            offset,
        )  # fmt: skip
        return None if plan.is_dense else plan

    def run(
        self,
        plan: AttnPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        text_len: int,
        text_first: bool,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Execute a sparse plan on q, k, v [B, N, H, D] (this rank's shard under context parallelism)."""
        rt = self.runtime
        return rt.run(
            plan,
            q,
            k,
            v,
            layout=rt.layout(text_len, text_first),
            key_mask=key_mask,
            parallel_config=self._context_parallel(),
        )


class WrappedModuleProcessor(nn.Module):
    """Mixin base for processors that replace an `nn.Module` processor (IP-Adapter): the original's
    submodules and parameters are registered under the same names, so the model's state_dict keys
    and `.to()` / dtype moves are unchanged while attnplug is applied."""

    def __init__(self, original: nn.Module) -> None:
        nn.Module.__init__(self)
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b)


class Adapter:
    """One model family: which modules to hook, which processors it reproduces, where the tokens are."""

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: original processor class name -> our processor class (a processor not listed is refused)
    processors: ClassVar[dict[str, type]] = {}
    #: forward arguments `grid()` reads (diffusers' context-parallel hooks must not shard them first)
    grid_inputs: ClassVar[tuple[str, ...]] = ("hidden_states",)
    #: as `processors`, for the modules of `cross_attention_modules` (hooked only for `Variant.cross_attention`)
    cross_processors: ClassVar[dict[str, type]] = {}
    _params: ClassVar[dict[type, dict[str, int]]] = {}
    # -- the family's facts (the CLI, show-mask, presets and variants ask the adapter) --------------------
    #: pixels -> latents -> tokens of the family's pipelines (None: not known before loading)
    latent: ClassVar[LatentRule | None] = None
    #: a pipeline directory's `transformer/config.json` patch size is the token patch (FLUX: False, its
    #: patch_size 1 is applied after the 2x2 latent packing)
    patch_from_config: ClassVar[bool] = True
    #: `vae/config.json`'s `scale_factor_temporal` / `scale_factor_spatial` give the VAE compression (Wan)
    vae_from_config: ClassVar[bool] = False
    #: frames per second of the family's videos (None: an image family)
    default_fps: ClassVar[int | None] = None
    #: joint self-attention sequences are [text, visual] (True) or [visual, text] (False)
    text_first: ClassVar[bool] = False
    #: a UNet: attention runs at several resolutions (`TokenLayout.downsample`), self- and cross-attention in
    #: separate calls; False: one token grid per call (DiTs). AgentSD and Boundary pick levels on it.
    multilevel: ClassVar[bool] = False
    #: each variant's official defaults on this family, by variant name ({"radial": {"decay_factor": ...}}), with
    #: the source of each number next to it; `Variant.family_defaults` reads them (absent: the family has none)
    official_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # -- prompts (the layout-control variants Regional / Boundary drive the pipeline's own encoders) ---------
    #: diffusers pipeline classes whose text encoders `encode_prompt` drives (empty: prompts are not encoded)
    pipelines: ClassVar[tuple[str, ...]] = ()
    #: `phrase_tokens(pipe, prompt, phrase, where) -> positions` of a phrase in the denoiser's text tokens, as a
    #: classmethod on families whose text-token layout is known (Boundary's families); None: not known
    phrase_tokens: ClassVar[Callable[..., list[int]] | None] = None
    # -- LoRA training (diffusion_attn.lora; families with `lora_targets` can be trained) ------------------
    #: attention projections a LoRA adapts by default (empty: the family cannot be trained by `train_lora`)
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: the training objective of the family's scheduler: "flow" (flow matching, target noise - x0) or "ddpm"
    #: (noise / v prediction on the scheduler's own timesteps, CogVideoX)
    lora_objective: ClassVar[str] = "flow"
    # -- official checkpoints (`diffusion_attn.checkpoints` builds its table from these) ----------------------
    #: the family's official hub checkpoints, each the fields of a `diffusion_attn.checkpoints.Checkpoint` but
    #: `family` (name, repo, pipeline, config, sizes, ...), `config_source` / `size_source` naming where the
    #: numbers come from
    official_checkpoints: ClassVar[tuple[dict[str, Any], ...]] = ()

    @classmethod
    def config_attention(cls, config: Any) -> tuple[int, int]:
        """(heads, head dim) of one self-attention call of the model built from `config` (its config.json)."""
        return int(config["num_attention_heads"]), int(config["attention_head_dim"])

    #: the config keys that count hooked blocks, one per kind (FLUX / HunyuanVideo: dual- and single-stream)
    layer_keys: ClassVar[tuple[str, ...]] = ("num_layers",)

    @classmethod
    def config_layers(cls, config: Any) -> int:
        """Hooked self-attention layers of the model built from `config`: the blocks of every `layer_keys` kind."""
        return sum(int(config[k]) for k in cls.layer_keys)

    @classmethod
    def config_with_layers(cls, config: Any, num_layers: int) -> dict:
        """`config` with `num_layers` blocks of each kind (the real class at a small size)."""
        c = dict(config)
        c.update(dict.fromkeys(cls.layer_keys, num_layers))
        return c

    @classmethod
    def config_latent_frames(cls, config: Any, frames: int, vae_temporal: int) -> int:
        """Latent frames of `frames` video frames as the family's pipeline makes them."""
        return (frames - 1) // vae_temporal + 1

    @classmethod
    def config_grid(
        cls, config: Any, latent_frames: int, height: int, width: int, vae_spatial: int
    ) -> tuple[int, int, int]:
        """(frames, height, width) of visual tokens of `latent_frames` latent frames of `height` x `width` pixels:
        the transformer's patchify (`patch_size`, `patch_size_t`: 1 when absent) of the VAE's latent."""
        p, pt, s = config["patch_size"], config.get("patch_size_t") or 1, vae_spatial
        return (latent_frames // pt, height // s // p, width // s // p)

    @classmethod
    def attention_levels(cls, config: Any) -> list[int]:
        """Downsampling factors of the input token grid at which attention runs, highest resolution first (one
        grid per call: [1]; `multilevel` families read their levels from `config`)."""
        return [1]

    @classmethod
    def tiny_inputs(
        cls,
        checkpoint: Any,
        model: nn.Module,
        grid: tuple[int, int, int],
        *,
        batch: int,
        text_len: int,
        rnd: Callable[..., torch.Tensor],
    ) -> dict[str, Any]:
        """Forward arguments of `model` (built from `checkpoint`'s config) for a `grid` of visual tokens, shaped
        as the family's pipeline passes them; `rnd(*shape)` draws the random tensors."""
        raise ValueError(f"no forward inputs written for family {cls.name!r}")

    @classmethod
    def latent_rule(cls, model_dir: Any = None) -> LatentRule | None:
        """The family's `latent` rule, with what a local pipeline directory's configs say (None: unknown)."""
        if cls.latent is None or model_dir is None:
            return cls.latent
        return rule_from_dir(
            cls.latent, model_dir, patch_from_config=cls.patch_from_config, vae_from_config=cls.vae_from_config
        )

    @classmethod
    def token_grid(cls, height: int, width: int, frames: int, model_dir: Any = None) -> tuple[int, int, int] | None:
        """(frames, height, width) of visual tokens of a `frames` x `height` x `width` generation (None: unknown)."""
        rule = cls.latent_rule(model_dir)
        return None if rule is None else token_grid(rule, height, width, frames)

    @classmethod
    def variant_defaults(cls, variant: Variant | type[Variant]) -> dict[str, Any]:
        """`variant`'s official defaults for this family (`Variant.family_defaults`); ValueError when the
        variant has a table and this family is not in it (never another family's values)."""
        return variant.defaults_for(cls.name)

    @classmethod
    def encode_prompt(cls, pipe: Any, prompt: str, device: torch.device, max_sequence_length: int | None) -> Any:
        """The conditional prompt embeddings [1, L, D] of `prompt` as the family's pipeline encodes them (the text
        tokens the denoiser sees); ValueError on a family whose encoder call is not written."""
        raise ValueError(f"no prompt encoder for family {cls.name!r}")

    @classmethod
    def reencode_length(cls, pipe: Any, embeds_len: int) -> int | None:
        """The `max_sequence_length` that makes `encode_prompt` give `embeds_len` tokens again (None: the
        encoder's default does)."""
        return None

    @classmethod
    def pixels_per_token(cls, pipe: Any, model: nn.Module) -> int:
        """Image pixels per token side of the loaded pipeline: VAE downsampling x patch size."""
        raise ValueError(f"no pixels-per-token rule for family {cls.name!r}")

    @classmethod
    def extra_text_refused(cls, pipe: Any, model: nn.Module) -> str | None:
        """Why the denoiser cannot take text tokens added to its `encoder_hidden_states` (Regional's entity
        prompts) in this pipeline, or None when it can."""
        return None

    @classmethod
    def prepend_text(cls, model: nn.Module, args: tuple, kwargs: dict, n: int) -> tuple:
        """After `n` text tokens were put before `encoder_hidden_states`: extend the forward's other per-text-token
        inputs to match (FLUX's `txt_ids`); returns the new args (kwargs is updated in place)."""
        return args

    @classmethod
    def set_denoiser_input(
        cls, pipe: Any, model: nn.Module, args: tuple, kwargs: dict, z: torch.Tensor, t: Any, batch: int
    ) -> tuple:
        """Put latents `z` at timestep `t` into a recorded forward call of the denoiser as its pipeline does
        (DiTs: `hidden_states`, the timestep per sample); returns the new args (kwargs is updated in place)."""
        args = cls.set_forward_arg(model, args, kwargs, "hidden_states", z)
        return cls.set_forward_arg(model, args, kwargs, "timestep", t.expand(batch).to(z.device))

    @classmethod
    def lora_inputs(cls, pipe: Any, x: torch.Tensor, caption: str, text_len: int, device: Any) -> dict:
        """One training clip's cached inputs: normalised latents of video `x` [1, C, F, H, W] and the caption's
        conditioning, as the family's pipeline builds them (LoRA training)."""
        raise ValueError(f"train_lora: no LoRA training inputs for family {cls.name!r}")

    @classmethod
    def lora_forward(cls, pipe: Any, transformer: nn.Module, config: Any, x: torch.Tensor, t: Any, batch: dict) -> Any:
        """The transformer's prediction on noisy latents `x` at timesteps `t` with a batch of cached inputs, in the
        latents' layout (LoRA training)."""
        raise ValueError(f"train_lora: no LoRA forward for family {cls.name!r}")

    @staticmethod
    def set_forward_arg(model: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple:
        """Replace forward argument `name` (keyword, or positional per the signature); returns the new args
        (kwargs is updated in place)."""
        if name in kwargs:
            kwargs[name] = value
            return args
        Adapter.forward_arg(model, args, kwargs, name)  # fills the signature index
        index = Adapter._params[type(model)].get(name)
        if index is not None and index < len(args):
            args = args[:index] + (value,) + args[index + 1 :]
        else:
            kwargs[name] = value
        return args

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, attention module) of every hooked layer, in execution order."""
        raise NotImplementedError

    def grid(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(frames, height, width) of visual tokens from the transformer's forward arguments."""
        raise NotImplementedError

    def cross_attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of the text cross-attention layers, in execution order (Wan's and UNets' `attn2`);
        they are layers `len(attention_modules) + i`, the i-th sitting in the block of self layer i."""
        return []

    def install(self, model: nn.Module, runtime: AttnRuntime) -> list[Callable[[], None]]:
        """Extra hooks this family needs on `model` (after patching); returns the callables that undo them."""
        return []

    @staticmethod
    def forward_arg(model: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
        """Argument `name` of the model's forward, given by keyword or by position (its signature)."""
        if name in kwargs:
            return kwargs[name]
        cls = type(model)
        index = Adapter._params.get(cls)
        if index is None:
            params = list(inspect.signature(cls.forward).parameters)[1:]  # without self
            index = Adapter._params[cls] = {p: i for i, p in enumerate(params)}
        i = index.get(name)
        return args[i] if i is not None and i < len(args) else None

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The forward's timestep argument (keyword or positional, per the family's signature)."""
        return self.forward_arg(model, args, kwargs, "timestep")

    def check_processor(self, name: str, module: nn.Module, model: nn.Module, cross: bool = False) -> None:
        """Refuse (before patching) a processor this adapter does not reproduce exactly."""
        proc = module.processor
        cls = type(proc)
        known = self.cross_processors if cross else self.processors
        if cls.__name__ not in known or not cls.__module__.startswith("diffusers."):
            raise ValueError(
                f"apply(): {name} of {type(model).__name__} uses {type(proc).__name__}, which attnplug does not "
                f"reproduce exactly (supported: {', '.join(known)}); nothing was patched. Restore the "
                "model's default processor (e.g. unfuse_qkv_projections(), or set_attn_processor with one of these) "
                "or remove the feature that installed it"
            )

    def make_processor(
        self, runtime: AttnRuntime, layer: int, module: nn.Module, cross: bool = False
    ) -> SparseProcessor:
        cls = (self.cross_processors if cross else self.processors)[type(module.processor).__name__]
        return cls(runtime, layer, module.processor)


def hidden_states_arg(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    hs = Adapter.forward_arg(model, args, kwargs, "hidden_states")
    if not isinstance(hs, torch.Tensor):
        raise RuntimeError("attnplug: the transformer was called without a hidden_states tensor")
    return hs


ProcessorFactory = Callable[[AttnRuntime, int, Any], SparseProcessor]

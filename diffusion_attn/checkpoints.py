"""The official checkpoints users load, as facts: transformer / UNet configs, sizes, token grids.

One `Checkpoint` per hub checkpoint (no weights). The entries live with their family, on its adapter
(`Adapter.official_checkpoints` in `diffusion_attn/adapters/<family>.py`), each naming where its values come from
next to the numbers:

* transformer / UNet configs: the hub repo's `transformer/config.json` (or `unet/config.json`), as written by
  diffusers' conversion scripts where one holds the numbers, else the published `config.json` of the hub repo;
* sizes: the pipeline's `__call__` defaults or, where the checkpoint was trained at another size, the size its
  docs / model card give;
* token grids: what the pipeline's latents (VAE factors `vae_spatial` / `vae_temporal`) and the transformer's
  patchify give, by the adapter's rules (`Adapter.config_latent_frames`, `config_grid`, `attention_levels`).
  `Checkpoint.grid` / `tokens` compute them; `layout` gives attnplug's `TokenLayout`.

`CHECKPOINTS` lists the default family's (`DEFAULT_FAMILY`) entries first, then the other families' in the
registry's order. `Checkpoint.build(num_layers=1)` builds the REAL diffusers class with the real config except
the layer count (seeded random weights: the real per-layer shapes, widths and heads), and `tiny_inputs` the
forward arguments of that class at a small token grid, for tests on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import ADAPTERS, DEFAULT_FAMILY, Adapter
from .variants.base import TokenLayout

__all__ = ["Checkpoint", "CHECKPOINTS", "get_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint: where it is, its transformer / UNet config and the size users generate at.

    text_len: text tokens inside the joint self-attention (the pipeline's max_sequence_length; 0 where
    text enters through cross-attention); cross_len: keys of the text cross-attention (0 for joint-attention
    models). sizes: name -> (height, width, frames) in pixels ("default" first); extra_tokens: visual tokens
    appended to the sequence besides the generated image's (a reference image's). Facts that depend on the
    family are its adapter's (`adapter`).
    """

    name: str
    repo: str
    family: str
    pipeline: str
    config: dict
    config_source: str
    sizes: dict
    size_source: str
    text_len: int = 0
    cross_len: int = 0
    vae_spatial: int = 8
    vae_temporal: int = 4
    experts: int = 1
    pipeline_kwargs: dict = field(default_factory=dict)
    extra_tokens: int = 0
    notes: str = ""

    # -- facts derived from the config ------------------------------------------------------------------
    @property
    def adapter(self) -> type[Adapter]:
        """The family's adapter class (the rules below are its)."""
        return ADAPTERS[self.family]

    @property
    def model_class(self) -> str:
        return self.adapter.model_classes[0]

    @property
    def video(self) -> bool:
        latent = self.adapter.latent
        return latent is not None and latent.video

    @property
    def heads(self) -> int:
        """Attention heads of a self-attention call (multilevel models: at the highest-resolution attention level)."""
        return self.adapter.config_attention(self.config)[0]

    @property
    def head_dim(self) -> int:
        return self.adapter.config_attention(self.config)[1]

    @property
    def width(self) -> int:
        """Attention width, heads x head dim (multilevel models: the highest-resolution attention level)."""
        return self.heads * self.head_dim

    @property
    def num_layers(self) -> int:
        """Hooked self-attention layers of the full model."""
        return self.adapter.config_layers(self.config)

    # -- sizes and tokens -------------------------------------------------------------------------------
    def size(self, name: str = "default") -> tuple[int, int, int]:
        if name not in self.sizes:
            raise ValueError(f"{self.name}: size {name!r} is not one of {', '.join(self.sizes)}")
        return tuple(self.sizes[name])  # type: ignore[return-value]

    def latent_frames(self, frames: int) -> int:
        """Latent frames of `frames` video frames (1 for images)."""
        if not self.video:
            return 1
        return self.adapter.config_latent_frames(self.config, frames, self.vae_temporal)

    def grid(self, name: str = "default", *, height: int | None = None, width: int | None = None,
             frames: int | None = None) -> tuple[int, int, int]:  # fmt: skip
        """(frames, height, width) of visual tokens after the VAE and the patchify (multilevel models: the input
        latent)."""
        h0, w0, f0 = self.size(name)
        h, w, f = height or h0, width or w0, frames or f0
        return self.adapter.config_grid(self.config, self.latent_frames(f), h, w, self.vae_spatial)

    def attention_levels(self) -> list[int]:
        """Downsampling factors of `grid` at which attention runs, highest resolution first ([1]: one grid)."""
        return self.adapter.attention_levels(self.config)

    def _attention_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """`grid` at the highest-resolution attention level."""
        f, h, w = grid
        ds = self.attention_levels()[0]
        return (f, -(-h // ds), -(-w // ds))

    def tokens(self, name: str = "default") -> int:
        """Visual tokens of one self-attention call (multilevel models: the highest-resolution attention level)."""
        return math.prod(self._attention_grid(self.grid(name)))

    def seq_len(self, name: str = "default") -> int:
        """Tokens of the joint sequence (visual + text + extra reference tokens)."""
        return self.tokens(name) + self.text_len + self.extra_tokens

    def layout(self, name: str = "default", *, frames: int | None = None) -> TokenLayout:
        """attnplug's TokenLayout of one self / joint attention call at size `name`."""
        return TokenLayout(
            grid=self._attention_grid(self.grid(name, frames=frames)),
            text_len=self.text_len,
            text_first=self.adapter.text_first,
            family=self.family,
        )

    # -- real classes at small sizes --------------------------------------------------------------------
    def model_config(self, num_layers: int = 1) -> dict:
        """The real config with `num_layers` blocks of each kind (the adapter's `config_with_layers`)."""
        return self.adapter.config_with_layers(self.config, num_layers)

    def build(self, num_layers: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
        """The real diffusers class with this config and `num_layers` layers (seeded random weights, eval)."""
        import diffusers

        torch.manual_seed(seed)
        cls = getattr(diffusers, self.model_class)
        model = cls(**self.model_config(num_layers)).eval()
        return model if dtype == torch.float32 else model.to(dtype)

    def tiny_inputs(
        self,
        model: torch.nn.Module,
        grid: tuple[int, int, int] = (2, 2, 3),
        *,
        batch: int = 1,
        text_len: int = 7,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Forward arguments of `model` (this checkpoint's class) for a `grid` of visual tokens.

        Shapes follow the pipeline (latent channels, text / pooled / image-embedding widths from the
        config; the adapter's `tiny_inputs`), random tensors drawn from a generator seeded with `seed`."""
        g = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(dtype)

        return self.adapter.tiny_inputs(self, model, grid, batch=batch, text_len=text_len, rnd=rnd)

    def summary(self, name: str = "default") -> dict[str, Any]:
        """The table row: config highlights, size, grid and token counts (JSON-ready)."""
        h, w, f = self.size(name)
        return {
            "name": self.name,
            "repo": self.repo,
            "family": self.family,
            "class": self.model_class,
            "pipeline": self.pipeline,
            "layers": self.num_layers,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "width": self.width,
            "size": name,
            "height": h,
            "width_px": w,
            "frames": f,
            "grid": list(self.grid(name)),
            "visual_tokens": self.tokens(name),
            "text_tokens": self.text_len,
            "extra_tokens": self.extra_tokens,
            "seq_len": self.seq_len(name),
            "config_source": self.config_source,
            "size_source": self.size_source,
        }


def _table() -> dict[str, Checkpoint]:
    """Every adapter's `official_checkpoints`, the default family's first."""
    families = [DEFAULT_FAMILY, *(f for f in ADAPTERS if f != DEFAULT_FAMILY)]
    return {e["name"]: Checkpoint(family=f, **e) for f in families for e in ADAPTERS[f].official_checkpoints}


CHECKPOINTS: dict[str, Checkpoint] = _table()


def get_checkpoint(name: str) -> Checkpoint:
    """The table entry `name`, or a ValueError listing the known names."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[name]


def _check_table() -> None:
    """Guard against typos in the table: every entry's size gives a whole token grid."""
    for c in CHECKPOINTS.values():
        for s in c.sizes:
            assert all(g >= 1 for g in c.grid(s)), (c.name, s)
            assert math.prod(c.grid(s)) >= 1


_check_table()

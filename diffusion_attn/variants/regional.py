"""Regional attention (EliGen, DiffSynth-Studio): entity prompts, each with a spatial mask, and the
pipeline's own (global) prompt, on attnplug's block-sparse kernel.

    handle = da.apply(pipe, da.Regional(entities=[("a red apple", mask_a), ("a blue cup", (64, 96, 200, 240))]))
    image = pipe("a still life on a wooden table", height=512, width=512).images[0]

What runs (EliGen's semantics, our code):

* Our code encodes every entity prompt with the pipeline's text encoders (`encode_prompt`, once per
  device and dtype) and concatenates the embeddings before the global prompt's in the denoiser's
  `encoder_hidden_states` (a diffusers hook; FLUX's `txt_ids` grow by zero rows, as EliGen's): the
  joint sequence is [entity_1 ... entity_n, global, image] for FLUX, [image, entity_1 ... entity_n,
  global] for SD3. The pooled prompt embedding stays the global prompt's.
* Joint attention (FLUX, SD3): entity i's text and the image tokens inside mask i attend to each
  other (both ways); entity texts never see each other; image <-> image is unrestricted; the global
  prompt sees everything and everything sees it (`entity_global=True`, the issue's statement;
  DiffSynth's `construct_mask` also blocks global <-> entity text: `entity_global=False` reproduces
  it). Image tokens outside every mask see the image and the global prompt.
* Cross-attention (Wan text-to-video): image tokens inside mask i attend to the global prompt and
  entity i's tokens; outside every mask, to the global prompt only. The mask applies to every frame.
* The mask is a `BlockLayout` with element masks where a block straddles a boundary, built once per
  (token layout, entity lengths, batch pattern, device) and cached: no dense N x N bias.
* Mask -> tokens: a token belongs to entity i if ANY pixel of its patch is covered (the paper's
  rule), computed at pixel resolution: a token covers `pixels_per_token`^2 pixels (VAE factor x patch
  size; 16 for FLUX, SD3 and Wan). DiffSynth first resizes the mask to the latent with nearest
  interpolation, which can drop strokes thinner than 8 px; we do not. Covered pixel: True (bool),
  >= 0.5 (float arrays), >= 128 (8-bit arrays and PIL images, grey level = mean of RGB: DiffSynth's
  threshold). Boxes (x0, y0, x1, y1) are pixel coordinates, x1 / y1 exclusive.
* Classifier-free guidance: the negative branch runs without entities (DiffSynth's default,
  `on_negative=False`): FLUX / Wan's "uncond" calls are left untouched (bit-identical); SD3's batched
  CFG call carries the entity tokens for the whole batch and its negative half sees none of them.
  A batched call is taken for CFG when the pipeline's `do_classifier_free_guidance` is on and the call
  has the generation's first batch size (SD3's skip-layer-guidance call, half that size, is conditional).
* No entities: nothing is added and every call runs the model's own processor (bit-identical).

Checked before anything runs: entity prompts non-empty strings, names (default: the prompt) unique,
masks non-empty and all of one size, boxes inside the image; with the pipeline (when `apply` runs,
model left untouched on error): a supported pipeline class, mask size a multiple of the pixels per
token, Wan image-to-video refused (its processor hard-codes 512 text tokens). At the first call: the
masks' token grid equals the generated one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from attn_kernels import BlockLayout
from attn_spec import Length, Range

from ._pipes import check_pipeline
from .base import (
    AttnContext,
    AttnPlan,
    BlockSize,
    FamiliesWhere,
    TokenLayout,
    Variant,
    adapter_of,
    check_options,
    register_variant,
)

__all__ = ["Entity", "Regional", "mask_to_pixels", "token_membership"]

_MAX_ENTITIES = 62  # membership is a bit mask in an int64


@dataclass(frozen=True)
class Entity:
    """One entity: its prompt and where it goes.

    mask: a PIL image, a 2-D array / tensor (height x width pixels of the generated image), or a box
    (x0, y0, x1, y1) in pixels (x1, y1 exclusive). name: a unique label (default: the prompt)."""

    prompt: str
    mask: Any
    name: str | None = None

    @property
    def label(self) -> str:
        return self.prompt if self.name is None else self.name


def _is_box(mask: Any) -> bool:
    return isinstance(mask, (tuple, list)) and len(mask) == 4 and all(isinstance(c, (int, float)) for c in mask)


def mask_to_pixels(mask: Any, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """bool [height, width] of covered pixels (see the module docstring for the thresholds); a box needs
    `size` = (height, width). ValueError naming `where` for anything else."""
    if _is_box(mask):
        if size is None:
            raise ValueError(f"{where} is a box; give Regional(height=..., width=...) or a mask image to size it")
        H, W = size
        x0, y0, x1, y1 = (float(c) for c in mask)
        if not all(np.isfinite([x0, y0, x1, y1])):
            raise ValueError(f"{where} box must have finite coordinates, got {tuple(mask)}")
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise ValueError(
                f"{where} box (x0, y0, x1, y1) = {tuple(mask)} must satisfy 0 <= x0 < x1 <= {W} and "
                f"0 <= y0 < y1 <= {H} (pixels of the {W} x {H} image)"
            )
        out = np.zeros((H, W), dtype=bool)
        out[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
        return out
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("RGB"), dtype=np.float64).mean(-1)
        return arr >= 128
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(
            f"{where} must be a PIL image, a 2-D array or tensor, or a box (x0, y0, x1, y1); got {type(mask).__name__}"
        )
    if mask.ndim != 2:
        raise ValueError(f"{where} must be 2-D (height x width), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.copy()
    if np.issubdtype(mask.dtype, np.integer):
        return mask >= 128
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all():
            raise ValueError(f"{where} has non-finite values")
        return mask >= 0.5
    raise TypeError(f"{where} has dtype {mask.dtype}; use bool, integers (0-255) or floats (0-1)")


def token_membership(pixels: np.ndarray, ppt: int) -> torch.Tensor:
    """bool [h, w] of tokens with any covered pixel in their ppt x ppt patch (pixels [h*ppt, w*ppt])."""
    H, W = pixels.shape
    t = torch.from_numpy(pixels).view(H // ppt, ppt, W // ppt, ppt)
    return t.any(dim=3).any(dim=1)


@register_variant
@dataclass
class Regional(Variant):
    """EliGen regional attention: entity prompts with masks + the global prompt (see the module docstring).

    entities: Entity objects or (prompt, mask) / (prompt, mask, name) tuples. height / width: the image
    size in pixels (needed when every mask is a box; else taken from the masks and checked against
    them). entity_global: global prompt <-> entity text visible (False: DiffSynth's code). on_negative:
    entities in the negative CFG branch too. max_sequence_length: tokens per entity prompt (None: the
    pipeline's encoder default: FLUX 512, SD3 256 T5 + 77 CLIP, Wan 226). block_size: layout blocks.
    """

    name: ClassVar[str] = "regional"
    role: ClassVar[str] = "sparsity"
    # families whose adapter encodes prompts (`Adapter.pipelines`) on one token grid per call (not a UNet)
    families: ClassVar[tuple[str, ...] | None] = FamiliesWhere(
        lambda a: bool(a.pipelines) and not a.multilevel, "prompt encoding, one grid"
    )
    cross_attention: ClassVar[bool] = True

    entities: Annotated[
        tuple, Length(hi=_MAX_ENTITIES, noun="entities", note="(membership is a bit mask in an int64)")
    ] = ()
    height: Annotated[int | None, Range(1, None, words=True, note="or None")] = None
    width: Annotated[int | None, Range(1, None, words=True, note="or None")] = None
    entity_global: bool = True
    on_negative: bool = False
    max_sequence_length: Annotated[int | None, Range(1, None, words=True, note="or None")] = None
    block_size: BlockSize = 128

    def __post_init__(self) -> None:
        check_options(self)  # the ranges declared on the fields above
        for f in ("entity_global", "on_negative"):
            if not isinstance(getattr(self, f), bool):
                raise TypeError(f"Regional.{f} must be bool, got {getattr(self, f)!r}")
        if not isinstance(self.entities, (tuple, list)):
            raise TypeError(
                f"Regional.entities must be a list of Entity or (prompt, mask) pairs, got {self.entities!r}"
            )
        ents = []
        for i, e in enumerate(self.entities):
            if isinstance(e, (tuple, list)) and len(e) in (2, 3):
                e = Entity(*e)
            if not isinstance(e, Entity):
                raise TypeError(
                    f"Regional.entities[{i}] must be an Entity or a (prompt, mask[, name]) tuple, got {e!r}"
                )
            if not isinstance(e.prompt, str) or not e.prompt.strip():
                raise ValueError(f"Regional.entities[{i}].prompt must be a non-empty string, got {e.prompt!r}")
            if e.name is not None and (not isinstance(e.name, str) or not e.name.strip()):
                raise ValueError(f"Regional.entities[{i}].name must be a non-empty string or None, got {e.name!r}")
            ents.append(e)
        seen: dict[str, int] = {}
        for i, e in enumerate(ents):
            key = e.label.strip().casefold()
            if key in seen:
                raise ValueError(
                    f"Regional.entities[{i}].name {e.label!r} is also the name of entities[{seen[key]}]: entity names "
                    "(default: the prompt) must be unique; give Entity(..., name=...)"
                )
            seen[key] = i
        self.entities = tuple(ents)
        size = (self.height, self.width) if self.height is not None and self.width is not None else None
        if (self.height is None) != (self.width is None):
            raise ValueError("Regional.height and Regional.width must be given together")
        for i, e in enumerate(ents):  # the size from the first mask image when not given
            if size is None and not _is_box(e.mask):
                size = mask_to_pixels(e.mask, f"Regional.entities[{i}].mask").shape
        pixels = []
        for i, e in enumerate(ents):
            where = f"Regional.entities[{i}].mask"
            px = mask_to_pixels(e.mask, where, size)
            if px.shape != tuple(size):
                raise ValueError(
                    f"{where} is {px.shape[1]} x {px.shape[0]} pixels (width x height) but the image is "
                    f"{size[1]} x {size[0]}: every mask must have the generated image's size"
                )
            if not px.any():
                raise ValueError(f"{where} ({e.label!r}) covers no pixel: an entity needs a non-empty mask")
            pixels.append(px)
        self._pixels = pixels
        self._size = None if size is None else (int(size[0]), int(size[1]))
        self._embeds: dict = {}  # (runtime id, device, dtype) -> list of [1, L_e, D]
        self._layouts: dict = {}
        self._members: dict = {}
        self._current: dict | None = None  # what the running forward carries (set by the model hook)
        self._ppt: dict[int, int] = {}  # runtime id -> pixels per token
        self._first_batch: int | None = None  # batch of the generation's first call (batched CFG detection)

    def reset(self) -> None:
        """New generation: its first call sets the CFG batch again."""
        self._first_batch = None

    # -- apply ------------------------------------------------------------------------------
    def inactive_reason(self, family: str, num_steps: int | None, num_layers: int) -> str | None:
        if not self.entities:
            return "Regional has no entities: every call runs the model's own attention"
        return None

    def model_hook(self, runtime: Any) -> Any:
        """Validate against the pipeline (the model is restored if this raises) and return the hook that
        adds the entity embeddings to every denoiser forward."""
        if not self.entities:
            return None
        pipe = runtime.clock.pipe
        family = runtime.family
        check_pipeline(pipe, family, "Regional")
        model = getattr(pipe, runtime.model_name, None) if isinstance(runtime.model_name, str) else None
        if model is None:
            model = pipe.transformer
        adapter = adapter_of(family)
        refused = adapter.extra_text_refused(pipe, model)
        if refused is not None:
            raise ValueError(f"Regional does not support {refused}")
        ppt = adapter.pixels_per_token(pipe, model)
        H, W = self._size
        if H % ppt or W % ppt:
            raise ValueError(
                f"Regional: the masks are {W} x {H} pixels, not a multiple of the {ppt} pixels per token of this "
                f"{type(pipe).__name__} (the pipeline generates multiples of {ppt})"
            )
        self._ppt[id(runtime)] = ppt
        return RegionalHook(self, runtime, pipe, family)

    # -- per forward ------------------------------------------------------------------------
    def embeddings(self, pipe: Any, family: str, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """The entity prompts' embeddings [1, L_e, D], encoded once per (device, dtype) by the pipeline."""
        key = (id(pipe), str(device), dtype)
        hit = self._embeds.get(key)
        if hit is None:
            hit = [
                adapter_of(family).encode_prompt(pipe, e.prompt, device, self.max_sequence_length).to(device, dtype)
                for e in self.entities
            ]
            self._embeds[key] = hit
        return hit

    def members(self, grid: tuple[int, int, int], ppt: int) -> torch.Tensor:
        """int64 [frames * h * w]: bit e set where entity e covers the token (cached per grid)."""
        key = (grid, ppt)
        hit = self._members.get(key)
        if hit is None:
            f, h, w = grid
            H, W = self._size
            if (h * ppt, w * ppt) != (H, W):
                raise ValueError(
                    f"Regional: the entity masks are {W} x {H} pixels ({W // ppt} x {H // ppt} tokens of {ppt} px) "
                    f"but the pipeline generates {w} x {h} tokens ({w * ppt} x {h * ppt} px): give masks of the "
                    "generated size"
                )
            bits = torch.zeros(h * w, dtype=torch.int64)
            for e, px in enumerate(self._pixels):
                bits |= token_membership(px, ppt).reshape(-1).long() << e
            hit = self._members[key] = bits.repeat(f)
        return hit

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        cur = self._current
        if cur is None:
            return plan
        lay = ctx.layout
        n_text = lay.cross_len if lay.cross_len else lay.text_len
        if n_text == 0:
            return plan  # image-only self-attention (Wan attn1, SD3.5 attn2): unrestricted
        if self._first_batch is None:  # the first call of a generation: its batch is the CFG batch
            self._first_batch = ctx.batch
        B = ctx.batch
        neg: tuple = ()
        if (
            cur["cfg"]
            and not self.on_negative
            and B % 2 == 0
            and B == self._first_batch
            and ctx.branch in (None, "cond_uncond")
        ):
            neg = (True,) * (B // 2) + (False,) * (B // 2)  # diffusers' batched CFG: [negative, positive]
        key = (lay, cur["lens"], neg, str(ctx.device))
        hit = self._layouts.get(key)
        if hit is None:
            hit = self._layouts[key] = self._build(lay, cur, neg, ctx.device)
        plan.layout = hit
        return plan

    def _build(self, lay: TokenLayout, cur: dict, neg: tuple, device: torch.device) -> Any:
        """The BlockLayout of one call kind (host work, once per key)."""
        lens = cur["lens"]
        n_ent, ent_total = len(lens), sum(lens)
        n_text = lay.cross_len if lay.cross_len else lay.text_len
        glob = n_text - ent_total
        if glob < 0:
            raise RuntimeError(f"Regional: {n_text} text tokens in the call, fewer than the {ent_total} entity tokens")
        bits_img = self.members(lay.grid, cur["ppt"])
        text_seg = torch.cat(
            [torch.full((L,), e, dtype=torch.int64) for e, L in enumerate(lens)] + [torch.full((glob,), n_ent)]
        )
        G = n_ent
        negt = torch.tensor(neg if neg else (False,), dtype=torch.bool)
        B = len(neg) if neg else 1
        bq = bk = self.block_size
        if lay.cross_len:  # queries: image tokens; keys: [entities, global]

            def mask_mod(b, h, q, k):
                ks = text_seg[k]
                k_ent = ks < G
                inside = ((bits_img[q] >> ks.clamp(max=62)) & 1).bool()
                allowed = (ks == G) | (k_ent & inside)
                return torch.where(negt[b], ks == G, allowed)

            return BlockLayout.from_mask_mod(mask_mod, lay.num_visual, n_text, B=B, block_q=bq, block_k=bk).to(device)
        nv = lay.num_visual
        if lay.text_first:
            seg = torch.cat([text_seg, torch.full((nv,), -1)])
            bits = torch.cat([torch.zeros(n_text, dtype=torch.int64), bits_img])
        else:
            seg = torch.cat([torch.full((nv,), -1), text_seg])
            bits = torch.cat([bits_img, torch.zeros(n_text, dtype=torch.int64)])
        entity_global = self.entity_global

        def mask_mod(b, h, q, k):
            qs, ks = seg[q], seg[k]
            q_img, k_img = qs < 0, ks < 0
            q_ent, k_ent = (qs >= 0) & (qs < G), (ks >= 0) & (ks < G)
            q_glob, k_glob = qs == G, ks == G
            q_in = ((bits[q] >> ks.clamp(0, 62)) & 1).bool()  # image query inside the key entity's mask
            k_in = ((bits[k] >> qs.clamp(0, 62)) & 1).bool()  # image key inside the query entity's mask
            plain = (q_img | q_glob) & (k_img | k_glob)  # image and global prompt: unrestricted
            own = q_ent & k_ent & (qs == ks)  # an entity's own tokens
            allowed = plain | own | (q_img & k_ent & q_in) | (q_ent & k_img & k_in)
            if entity_global:
                allowed = allowed | (q_glob & k_ent) | (q_ent & k_glob)
            return torch.where(negt[b], plain | own, allowed)  # negative CFG half: entities unseen

        n = lay.seq_len
        return BlockLayout.from_mask_mod(mask_mod, n, n, B=B, block_q=bq, block_k=bk).to(device)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class RegionalHook(ModelHook):
    """Adds the entity embeddings to the denoiser's text inputs (a stateful hook: diffusers hands it the
    cache-context branch, so "uncond" calls are left alone)."""

    _is_stateful = True

    def __init__(self, variant: Regional, runtime: Any, pipe: Any, family: str) -> None:
        super().__init__()
        self.variant, self.runtime, self.pipe, self.family = variant, runtime, pipe, family
        self.adapter = adapter_of(family)
        self.branches = StateManager(_NoState)

    def pre_forward(self, module, *args, **kwargs):
        v = self.variant
        v._current = None
        context = self.branches._context
        branch = None if context is None else context.name
        if branch == "uncond" and not v.on_negative:
            return args, kwargs
        ehs = self.adapter.forward_arg(module, args, kwargs, "encoder_hidden_states")
        if not isinstance(ehs, torch.Tensor):
            return args, kwargs
        embeds = v.embeddings(self.pipe, self.family, ehs.device, ehs.dtype)
        B = ehs.shape[0]
        ent = torch.cat(embeds, dim=1).expand(B, -1, -1)
        kwargs = dict(kwargs)
        args = self.adapter.set_forward_arg(module, args, kwargs, "encoder_hidden_states", torch.cat([ent, ehs], dim=1))
        args = self.adapter.prepend_text(module, args, kwargs, ent.shape[1])  # e.g. FLUX's txt_ids
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        v._current = {"lens": tuple(e.shape[1] for e in embeds), "cfg": cfg, "ppt": v._ppt[id(self.runtime)]}
        return args, kwargs

    def post_forward(self, module, output):
        self.variant._current = None
        return output

    def reset_state(self, module):
        return module

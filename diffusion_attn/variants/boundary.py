"""Boundary attention (BACON, "Boundary Attention Constrained Zero-Shot Layout-To-Image Generation";
renamed MAC in its second arXiv version): training-free layout control from phrases with boxes.

No official code exists; this is our implementation from the paper's description, with every choice
and default below. The paper: cross-attention maps of the phrases, aligned with the self-attention
pixel correlations, drive losses that pull each phrase inside its box and keep it to the box's
boundary; the latents take gradient steps during the early denoising steps. The step schedule and
the inside loss follow the layout-guidance baseline (Chen et al.), the outside and edge terms
BoxDiff's inner/outer/corner constraints, as the paper builds on them.

    boundary = da.Boundary(prompt="a cat and a dog on the grass", phrases=("a cat", "a dog"),
                           boxes=((0.05, 0.3, 0.45, 0.9), (0.55, 0.3, 0.95, 0.9)))
    handle = da.apply(pipe, boundary)
    image = pipe("a cat and a dog on the grass", callback_on_step_end=boundary.callback).images[0]

Choices (defaults in brackets):

* **Phrase tokens**: each phrase's tokens are found in `prompt` with the pipeline's tokenizer (first
  occurrence; CLIP positions after BOS; SD3 also its T5 positions after the 77 CLIP tokens). At the
  first guidance of a generation the prompt encoded by our code must equal the conditional
  embeddings the pipeline passed (one host comparison), else a clear error.
* **Cross-attention maps A_p** (per head): the softmax over the text tokens of an image query,
  averaged over the phrase's tokens. UNet: `attn2` at the level downsampled `downsample` [4] times
  (16 x 16 at 512 px for SD 1.5, 32 x 32 at 1024 px for SDXL; every block of that level, down and up).
  SD3 (joint attention): the image queries' attention over the text keys, renormalised over the text
  (the joint normaliser would need the image x image log-sum-exp with a gradient), in every joint
  layer or `layers`.
* **Self-attention alignment** [on]: Â_p = S · A_p per head, S the same block's image self-attention
  (UNet: `attn1` of the block; SD3: the image x image part of the joint attention, renormalised over
  the image keys), computed with attnplug's attention kernel with A_p as the values: O(N · phrases),
  never an N x N map. Heads and layers are averaged.
* **Losses** per phrase on Â (boxes (x0, y0, x1, y1) in [0, 1] image fractions; a token cell is in
  the box when it overlaps it): inside L_in = (1 - Σ_box Â / Σ Â)² [weight 1]; outside L_out = mean
  of the top `topk_ratio` [0.2] of Â / max Â outside the box [0.5]; boundary L_bd = mean over the
  box's four edges of (1 - the edge's profile value), the profile along x being max over the box's
  rows of Â / max Â (and along y likewise): the phrase reaches its box's edges [0.5]. The loss is the
  phrases' mean of the weighted sum.
* **Updates**: z <- z - loss_scale [30] · σ_t² · ∇_z L on the conditional input, up to
  `max_iterations` [5] per step while L > `loss_threshold` [0.2], before the denoising forward of
  steps 1 ... `guidance_steps` [10] (layout guidance: 5, 0.2, 10 steps, scale 30, σ² from the LMS
  scheduler). σ_t²: the scheduler's `sigmas` at the step when it has them (Euler, LMS, flow matching),
  else (1 - ᾱ_t) / ᾱ_t. The update runs in diffusers' `callback_on_step_end` (the pipeline's own way
  to change latents between steps): pass `callback_on_step_end=boundary.callback` (chain others with
  `attn_pipelines.callbacks.CallbackList`); a generation that reaches step 1 without it raises. The
  initial noise (step 0) is not updated: diffusers has no hook before the first step.
* During a guidance forward the handle's clock shows the step being prepared; every other forward
  runs the model's own processors (bit-identical when `loss_scale` is 0: nothing runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

import attn_kernels
from attn_spec import Length, Ordered, Range

from ._pipes import check_pipeline
from .base import (
    AttnContext,
    AttnPlan,
    FamiliesWhere,
    Variant,
    adapter_of,
    check_options,
    register_variant,
)

__all__ = ["Boundary", "box_cells", "boundary_losses"]


def box_cells(box: tuple[float, float, float, float], h: int, w: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of the h x w cells overlapping a box in [0, 1] fractions (r1, c1 exclusive)."""
    x0, y0, x1, y1 = box
    r0, r1 = int(math.floor(y0 * h)), int(math.ceil(y1 * h))
    c0, c1 = int(math.floor(x0 * w)), int(math.ceil(x1 * w))
    return min(r0, h - 1), max(r1, min(r0, h - 1) + 1), min(c0, w - 1), max(c1, min(c0, w - 1) + 1)


def boundary_losses(
    maps: torch.Tensor, boxes: tuple, topk_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_in, L_out, L_bd, inside mass) per phrase, each [P], from maps [B, P, h, w] (>= 0), batch-averaged."""
    B, P, h, w = maps.shape
    flat = maps.reshape(B, P, -1)
    total = flat.sum(-1).clamp_min(1e-12)
    peak = flat.amax(-1).clamp_min(1e-12)
    l_in, l_out, l_bd, mass = [], [], [], []
    for p, box in enumerate(boxes):
        r0, r1, c0, c1 = box_cells(box, h, w)
        m = maps[:, p]
        inside = torch.zeros(h, w, dtype=torch.bool, device=maps.device)
        inside[r0:r1, c0:c1] = True
        frac = (m * inside).reshape(B, -1).sum(-1) / total[:, p]
        mass.append(frac.mean())
        l_in.append(((1 - frac) ** 2).mean())
        norm = m / peak[:, p, None, None]
        outside = norm.reshape(B, -1)[:, ~inside.reshape(-1)]
        if outside.shape[1]:
            k = max(1, int(round(topk_ratio * outside.shape[1])))
            l_out.append(outside.topk(k, dim=-1).values.mean())
        else:
            l_out.append(maps.new_zeros(()))
        px = norm[:, r0:r1, :].amax(1)  # [B, w]: profile along x over the box's rows
        py = norm[:, :, c0:c1].amax(2)  # [B, h]
        edges = torch.stack([px[:, c0], px[:, c1 - 1], py[:, r0], py[:, r1 - 1]], -1)
        l_bd.append((1 - edges).mean())
    return torch.stack(l_in), torch.stack(l_out), torch.stack(l_bd), torch.stack(mass)


@register_variant
@dataclass
class Boundary(Variant):
    """BACON boundary attention: phrases with boxes steer the early latents (see the module docstring).

    prompt: the prompt the pipeline will be called with; phrases: substrings of it; boxes: one
    (x0, y0, x1, y1) per phrase in [0, 1] image fractions. Pass `callback_on_step_end=boundary.callback`.
    """

    name: ClassVar[str] = "boundary"
    role: ClassVar[str] = "guidance"
    # families whose adapter knows where a phrase's tokens sit in the denoiser's text (`Adapter.phrase_tokens`)
    families: ClassVar[tuple[str, ...] | None] = FamiliesWhere(lambda a: a.phrase_tokens is not None, "phrase tokens")
    cross_attention: ClassVar[bool] = True

    prompt: str = ""
    phrases: tuple = ()
    boxes: Annotated[
        tuple[tuple[float, float, float, float], ...],
        Range(0.0, 1.0, message="{name}[{index}] coordinate must be {requirement}, got {bad!r}"),
        Ordered((0, 2), (1, 3), size=4, text="(x0, y0, x1, y1) with x0 < x1 and y0 < y1"),
    ] = ()
    loss_scale: Annotated[float, Range(0.0, 1e6)] = 30.0
    guidance_steps: Annotated[int, Range(0, None)] = 10
    max_iterations: Annotated[int, Range(1, None)] = 5
    loss_threshold: Annotated[float, Range(0.0, 1e6)] = 0.2
    inside_weight: Annotated[float, Range(0.0, 1e6)] = 1.0
    outside_weight: Annotated[float, Range(0.0, 1e6)] = 0.5
    boundary_weight: Annotated[float, Range(0.0, 1e6)] = 0.5
    topk_ratio: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.2
    downsample: Annotated[int, Range(1, None, pow2=True, note="(a UNet level)")] = 4
    self_alignment: bool = True
    layers: Annotated[
        tuple[int, ...] | None,
        Range(0, None),
        Length(
            1, None, noun="layer", message="{name} must be a non-empty tuple of layer indices or None, got {value!r}"
        ),
    ] = None

    def __post_init__(self) -> None:
        if not isinstance(self.boxes, (tuple, list)):
            raise TypeError(f"Boundary.boxes must be a tuple of (x0, y0, x1, y1) boxes, got {self.boxes!r}")
        check_options(self)  # the ranges, lengths and box order declared on the fields above
        if not isinstance(self.self_alignment, bool):
            raise TypeError(f"Boundary.self_alignment must be bool, got {self.self_alignment!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (tuple, list)):
                raise ValueError(f"Boundary.layers must be a tuple of layer indices or None, got {self.layers!r}")
            self.layers = tuple(self.layers)
        if not isinstance(self.prompt, str):
            raise TypeError(f"Boundary.prompt must be a string, got {self.prompt!r}")
        if isinstance(self.phrases, str) or not isinstance(self.phrases, (tuple, list)):
            raise TypeError(f"Boundary.phrases must be a tuple of strings, got {self.phrases!r}")
        if len(self.phrases) != len(self.boxes):
            raise ValueError(
                f"Boundary: {len(self.phrases)} phrases but {len(self.boxes)} boxes; give one box per phrase"
            )
        if self.phrases and not self.prompt.strip():
            raise ValueError(
                "Boundary.prompt must be the prompt the pipeline is called with (the phrases are found in it)"
            )
        seen: dict[str, int] = {}
        for i, ph in enumerate(self.phrases):
            if not isinstance(ph, str) or not ph.strip():
                raise ValueError(f"Boundary.phrases[{i}] must be a non-empty string, got {ph!r}")
            key = ph.strip().casefold()
            if key in seen:
                raise ValueError(f"Boundary.phrases[{i}] {ph!r} repeats phrases[{seen[key]}]: phrases must be unique")
            seen[key] = i
            if key not in self.prompt.casefold():
                raise ValueError(f"Boundary.phrases[{i}] {ph!r} is not part of the prompt {self.prompt!r}")
        boxes = tuple(tuple(float(c) for c in box) for box in self.boxes)  # checked above: 4 numbers each
        self.phrases, self.boxes = tuple(self.phrases), boxes
        self.history: list[dict] = []  # per guidance iteration: step, iteration, loss, inside mass per phrase
        self._capturing = False
        self._maps: list[torch.Tensor] = []
        self._grids: set = set()
        self._qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bound: dict | None = None
        self._guided: tuple | None = None  # (generation, step) of the last guidance
        self._checked_prompt: tuple | None = None

    # -- apply ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.phrases) and self.loss_scale > 0 and self.guidance_steps > 0

    def inactive_reason(self, family: str, num_steps: int | None, num_layers: int) -> str | None:
        if not self.phrases:
            return "Boundary has no phrases: nothing is guided"
        if self.loss_scale == 0 or self.guidance_steps == 0:
            return "Boundary: loss_scale or guidance_steps is 0: nothing is guided"
        return None

    def check_apply(self, family: str, modules: list, variants: tuple) -> None:
        if any(type(v).__name__ == "Regional" for v in variants):
            raise ValueError("Boundary cannot be combined with Regional (entity tokens would shift the phrase tokens)")
        if self.layers is not None and max(self.layers) >= len(modules):
            raise ValueError(
                f"Boundary.layers must index the {len(modules)} hooked attention layers [0, {len(modules)}), "
                f"got {self.layers}"
            )

    def model_hook(self, runtime: Any) -> Any:
        """Validate against the pipeline (the model is restored if this raises): phrase tokens found and
        disjoint; returns the hook recording the denoiser's inputs for the guidance forwards."""
        if not self.phrases:
            return None
        pipe = runtime.clock.pipe
        family = runtime.family
        check_pipeline(pipe, family, "Boundary")
        model = getattr(pipe, runtime.model_name)
        adapter = adapter_of(family)
        token_sets = [
            adapter.phrase_tokens(pipe, self.prompt, ph, f"Boundary.phrases[{i}]") for i, ph in enumerate(self.phrases)
        ]
        for i in range(len(token_sets)):
            for j in range(i):
                common = set(token_sets[i]) & set(token_sets[j])
                if common:
                    raise ValueError(
                        f"Boundary.phrases[{i}] {self.phrases[i]!r} and phrases[{j}] {self.phrases[j]!r} overlap in "
                        f"the prompt's tokens (positions {sorted(common)}): each token belongs to one phrase"
                    )
        self._bound = {"pipe": pipe, "model": model, "runtime": runtime, "adapter": adapter, "tokens": token_sets}
        return BoundaryHook(self, runtime)

    def reset(self) -> None:
        """New generation: the history and captures are cleared."""
        self.history = []
        self._maps, self._qk, self._grids = [], {}, set()

    # -- capture (guidance forwards only) ---------------------------------------------------
    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        if not self._capturing:
            return plan
        lay = ctx.layout
        tokens = self._bound["tokens"]
        if adapter_of(lay.family).multilevel:  # a UNet: the cross-attention maps of one level
            if lay.downsample != self.downsample:
                return plan
            if lay.cross_len == 0:
                if self.self_alignment:
                    plan.compute = self._self_capture(ctx.layer, plan.compute)
                return plan
            plan.compute = self._cross_capture(ctx.layer - ctx.num_layers, lay.grid, tokens)
            return plan
        if lay.text_len == 0 or (self.layers is not None and ctx.layer not in self.layers):
            return plan
        plan.compute = self._joint_capture(lay, tokens, plan.compute)
        return plan

    def _self_capture(self, layer: int, inner: Any) -> Any:
        def compute(q, k, v, backend):
            self._qk[layer] = (q, k)
            return (
                inner(q, k, v, backend) if inner is not None else attn_kernels.attention(q, k, v, None, backend=backend)
            )

        return compute

    def _phrase_maps(self, q: torch.Tensor, k_txt: torch.Tensor, tokens: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [B, H, N, T] over the text keys, phrase maps [B, H, N, P])."""
        p = torch.softmax((q @ k_txt.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        maps = torch.stack([p[..., [t for t in idx if t < p.shape[-1]]].mean(-1) for idx in tokens], dim=-1)
        return p, maps

    def _aligned(
        self, maps: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        """Heads-averaged maps [B, N, P], aligned with the self-attention S·A when q, k are given."""
        if q is not None and self.self_alignment:
            maps = attn_kernels.attention(q, k, maps.to(q.dtype).contiguous(), None, backend=backend)
        return maps.float().mean(1)

    def _cross_capture(self, pair: int, grid: tuple, tokens: list) -> Any:
        def compute(q, k, v, backend):
            p, maps = self._phrase_maps(q, k, tokens)
            qs, ks = self._qk.pop(pair, (None, None))
            self._maps.append(self._aligned(maps, qs, ks, backend))
            self._grids.add(grid[1:])
            return p.to(v.dtype) @ v

        return compute

    def _joint_capture(self, lay: Any, tokens: list, inner: Any) -> Any:
        def compute(q, k, v, backend):
            vis, txt = lay.visual_slice, lay.text_slice
            _, maps = self._phrase_maps(q[:, :, vis], k[:, :, txt], tokens)
            self._maps.append(self._aligned(maps, q[:, :, vis], k[:, :, vis], backend))
            self._grids.add(lay.grid[1:])
            return (
                inner(q, k, v, backend) if inner is not None else attn_kernels.attention(q, k, v, None, backend=backend)
            )

        return compute

    # -- guidance ---------------------------------------------------------------------------
    def _sigma2(self, sched: Any, step: int, t: Any) -> float:
        sigmas = getattr(sched, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() > step:
            return float(sigmas[step]) ** 2
        ac = getattr(sched, "alphas_cumprod", None)
        if isinstance(ac, torch.Tensor):
            a = float(ac[int(t)])
            return (1 - a) / a
        raise ValueError(f"Boundary: cannot find the noise level of scheduler {type(sched).__name__}")

    def _check_prompt(self, cond: torch.Tensor, gen: int) -> None:
        """The pipeline encoded our `prompt` (once per generation; one host comparison)."""
        if self._checked_prompt == gen:
            return
        b = self._bound
        adapter, pipe = b["adapter"], b["pipe"]
        n_text = adapter.reencode_length(pipe, cond.shape[1])
        ours = adapter.encode_prompt(pipe, self.prompt, cond.device, n_text).to(cond.dtype)
        if ours.shape[1:] != cond.shape[1:] or not torch.allclose(ours[0], cond[0], rtol=1e-3, atol=1e-4):
            raise ValueError(
                f"Boundary(prompt={self.prompt!r}) is not the prompt the pipeline encodes (its conditional embeddings "
                "differ): call the pipeline with the same prompt, or Boundary(prompt=...) with the pipeline's"
            )
        self._checked_prompt = gen

    def callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """diffusers `callback_on_step_end`: after step `step`, optimise the latents entering step + 1."""
        nxt = step + 1
        b = self._bound
        if not self.active or b is None or nxt > self.guidance_steps:
            return callback_kwargs
        sched = pipe.scheduler
        timesteps = sched.timesteps
        if nxt >= len(timesteps):
            return callback_kwargs
        rec = b.get("inputs")
        if rec is None:
            raise RuntimeError(
                "Boundary.callback ran before the denoiser: apply(pipe, boundary) to this pipeline first"
            )
        latents = callback_kwargs["latents"]
        t = timesteps[nxt]
        sigma2 = self._sigma2(sched, nxt, t)
        clock = b["runtime"].clock
        source, old_step = clock.source, clock.step
        z = latents.detach()
        try:
            clock.source, clock.step = "callback", nxt
            with torch.enable_grad():
                for it in range(self.max_iterations):
                    z = z.requires_grad_(True)
                    loss, mass = self._loss(z, t, rec, latents.shape[0], clock.generation)
                    grad = torch.autograd.grad(loss, z)[0] if loss.requires_grad else torch.zeros_like(z)
                    value = float(loss.detach())
                    self.history.append({"step": nxt, "iteration": it, "loss": value, "inside": mass.tolist()})
                    z = (z - self.loss_scale * sigma2 * grad).detach()
                    if value <= self.loss_threshold:
                        break
        finally:
            clock.source, clock.step = source, old_step
            self._capturing = False
            self._maps, self._qk = [], {}
        self._guided = (clock.generation, nxt)
        return {**callback_kwargs, "latents": z.to(latents.dtype)}

    def _loss(self, z: torch.Tensor, t: Any, rec: tuple, batch: int, gen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One guidance forward on z (conditional inputs) and the weighted loss, with the inside mass per phrase."""
        b = self._bound
        model, adapter, pipe = b["model"], b["adapter"], b["pipe"]
        args, kwargs, in_batch = rec
        half = in_batch == 2 * batch
        cond = lambda x: _cond_half(x, in_batch) if half else x  # noqa: E731
        args = tuple(cond(a) for a in args)
        kwargs = {k: cond(v) for k, v in kwargs.items()}
        ehs = adapter.forward_arg(model, args, kwargs, "encoder_hidden_states")
        self._check_prompt(ehs, gen)
        args = adapter.set_denoiser_input(pipe, model, args, kwargs, z, t, batch)
        kwargs["return_dict"] = False
        self._maps, self._qk, self._grids = [], {}, set()
        self._capturing = True
        try:
            model(*args, **kwargs)
        finally:
            self._capturing = False
        if not self._maps:
            raise RuntimeError(
                f"Boundary captured no attention map: no cross-attention layer at downsample={self.downsample} "
                "(UNet levels with attention: see the model's blocks) or no layer selected by Boundary.layers"
            )
        if len(self._grids) != 1:
            raise RuntimeError(f"Boundary: captured maps of several grids {sorted(self._grids)}")
        h, w = next(iter(self._grids))
        maps = torch.stack(self._maps).mean(0)  # [B, N, P]
        maps = maps.transpose(1, 2).reshape(maps.shape[0], -1, h, w)
        l_in, l_out, l_bd, mass = boundary_losses(maps, self.boxes, self.topk_ratio)
        loss = (self.inside_weight * l_in + self.outside_weight * l_out + self.boundary_weight * l_bd).mean()
        self._maps, self._qk = [], {}
        return loss, mass.detach()


def _cond_half(x: Any, in_batch: int) -> Any:
    """The conditional (second) half of a batched-CFG input: tensors with the batch as first dimension,
    and dict values likewise (SDXL's added_cond_kwargs)."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == in_batch:
        return x[in_batch // 2 :]
    if isinstance(x, dict):
        return {k: _cond_half(v, in_batch) for k, v in x.items()}
    return x


class BoundaryHook(ModelHook):
    """Records the denoiser's inputs (references) for the guidance forwards; checks that the callback
    guided every step it should have."""

    def __init__(self, variant: Boundary, runtime: Any) -> None:
        super().__init__()
        self.variant, self.runtime = variant, runtime

    def pre_forward(self, module, *args, **kwargs):
        v = self.variant
        if not v._capturing:
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            batch = sample.shape[0] if isinstance(sample, torch.Tensor) else 0
            v._bound["inputs"] = (args, dict(kwargs), batch)
        return args, kwargs

    def post_forward(self, module, output):
        v = self.variant
        clock = self.runtime.clock
        if v.active and not v._capturing and 1 <= clock.step <= v.guidance_steps:
            if v._guided != (clock.generation, clock.step):
                raise RuntimeError(
                    f"Boundary guides the latents of steps 1-{v.guidance_steps} in diffusers' callback_on_step_end "
                    f"but step {clock.step} ran without it: call the pipeline with "
                    "callback_on_step_end=boundary.callback (several: attn_pipelines.callbacks.CallbackList)"
                )
        return output

"""SoftPAG as a diffusers guider (`diffusers.guiders`, the `BaseGuidance` interface) for modular pipelines.

A modular pipeline's denoise step asks its guider for the batches of a step (`prepare_inputs...`), runs the
denoiser once per batch between `prepare_models` / `cleanup_models`, and combines the predictions with
`guider(state)`. `SoftPAGGuidance` asks for up to three batches, pred_cond, pred_uncond (when CFG applies)
and pred_cond_perturbed (the conditional inputs again, when the perturbation applies), and returns

    pred = pred_uncond + guidance_scale (pred_cond - pred_uncond)
                       + perturbed_guidance_scale (pred_cond - pred_cond_perturbed)

(without CFG: pred_cond + perturbed_guidance_scale (pred_cond - pred_cond_perturbed)), computed in this order.

The perturbation is attnplug's SoftPAG in `mode="guider"`: `prepare_models` turns it on for the perturbed
batch only, so the selected heads run attnplug's kernel with `OutputMix` on any attention backend (diffusers'
own `PerturbedAttentionGuidance` is layer-level and intercepts `F.scaled_dot_product_attention`, which other
backends never call). On first use the guider applies SoftPAG to the denoiser; a denoiser that already has an
attnplug handle must include `SoftPAG(mode="guider", ...)` (e.g. next to a sparsity variant), which the guider
then drives. `guider.remove()` removes the handles it applied.

Schedules: `start` / `stop` (CFG, as diffusers' guiders) and `perturbed_guidance_start` / `_stop` (fractions of
the steps: int(start * n) <= step < int(stop * n)).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from .hooks import apply
from .variants.softpag import SoftPAG

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["SoftPAGGuidance"]


class SoftPAGGuidance(BaseGuidance):
    """CFG plus SoftPAG head-level perturbed guidance for diffusers' modular pipelines.

    guidance_scale: w_cfg (1.0 = no CFG); perturbed_guidance_scale: w_p (0 = no perturbation); u, heads,
    layers, heads_file: SoftPAG's (validated the same way); perturbed_guidance_start / _stop: fractions of
    the steps with the perturbation; start / stop / enabled: diffusers' guider schedule for CFG.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_perturbed"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 5.0,
        perturbed_guidance_scale: float = 3.0,
        u: float = 0.5,
        heads: list[list[int]] | None = None,
        layers: list[int] | None = None,
        heads_file: str | None = None,
        perturbed_guidance_start: float = 0.0,
        perturbed_guidance_stop: float = 1.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ) -> None:
        super().__init__(start, stop, enabled)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"SoftPAGGuidance.guidance_scale must be a number, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"SoftPAGGuidance.guidance_scale must be finite, got {guidance_scale!r}")
        self.guidance_scale = float(guidance_scale)
        # SoftPAG validates u, the heads and the perturbation schedule (errors name SoftPAG's option)
        self._variant = SoftPAG(
            scale=perturbed_guidance_scale,
            u=u,
            heads=None if heads is None else tuple(tuple(h) for h in heads),
            layers=None if layers is None else tuple(layers),
            heads_file=heads_file,
            start=perturbed_guidance_start,
            stop=perturbed_guidance_stop,
            mode="guider",
        )
        self.perturbed_guidance_scale = self._variant.scale
        self._handles: dict[int, Any] = {}  # id(denoiser) -> handle this guider applied
        self._flagged: list[Any] = []  # runtimes switched to the perturbed pass by prepare_models

    # -- models ----------------------------------------------------------------------------------------------
    def _runtime(self, denoiser: torch.nn.Module) -> Any:
        """The attnplug runtime of `denoiser` that carries a guider-driven SoftPAG (applying one if needed)."""
        handle = getattr(denoiser, "_attnplug_handle", None)
        if handle is None:
            handle = apply(denoiser, self._variant, step_source="callback")
            self._handles[id(denoiser)] = handle
        ours = [v for v in handle.variants if isinstance(v, SoftPAG)]
        if not ours or ours[0].mode != "guider":
            what = "SoftPAG(mode='hook')" if ours else f"{[v.name for v in handle.variants]}"
            raise ValueError(
                f"SoftPAGGuidance: {type(denoiser).__name__} already has attnplug variants applied ({what}); apply "
                "them together with diffusion_attn.SoftPAG(mode='guider', ...) for this guider to drive, or remove "
                "that handle"
            )
        return handle.runtimes[handle._hooked.index(denoiser)]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._is_pag_enabled() and self._count_prepared == self.num_conditions:
            rt = self._runtime(denoiser)
            rt.perturbed = True
            self._flagged.append(rt)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        while self._flagged:
            self._flagged.pop().perturbed = False

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        for handle in self._handles.values():
            handle.set_step(int(step), num_steps=num_inference_steps)

    def remove(self) -> None:
        """Remove the attnplug handles this guider applied (the denoisers get their processors back)."""
        self.cleanup_models(None)
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    # -- batches -----------------------------------------------------------------------------------------------
    def _batches(self) -> tuple[list[int], list[str]]:
        if self.num_conditions == 1:
            return [0], ["pred_cond"]
        if self.num_conditions == 2:
            second = "pred_uncond" if self._is_cfg_enabled() else "pred_cond_perturbed"
            return [0, 1 if self._is_cfg_enabled() else 0], ["pred_cond", second]
        return [0, 1, 0], ["pred_cond", "pred_uncond", "pred_cond_perturbed"]

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockState]:
        idx, names = self._batches()
        return [self._prepare_batch(data, i, name) for i, name in zip(idx, names)]

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        idx, names = self._batches()
        return [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in zip(idx, names)]

    # -- combination ---------------------------------------------------------------------------------------------
    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_cond_perturbed: torch.Tensor | None = None,
    ) -> GuiderOutput:
        pred = pred_cond
        if self._is_cfg_enabled():
            pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        if self._is_pag_enabled():
            pred = pred + self.perturbed_guidance_scale * (pred_cond - pred_cond_perturbed)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1 or (self._is_pag_enabled() and self._count_prepared == self.num_conditions)

    @property
    def num_conditions(self) -> int:
        return 1 + int(self._is_cfg_enabled()) + int(self._is_pag_enabled())

    def _in_range(self, start: float, stop: float) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(start * self._num_inference_steps) <= self._step < int(stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        return self._enabled and self._in_range(self._start, self._stop) and not math.isclose(self.guidance_scale, 1.0)

    def _is_pag_enabled(self) -> bool:
        v = self._variant
        return self._enabled and self._in_range(v.start, v.stop) and v.scale != 0 and v.u != 0

"""Pipeline helpers of the layout-control variants (Regional, Boundary): encode prompts with a
pipeline's own text encoders, pixels per token, finding a phrase's tokens, and the diffusers
`ModelHook` base they use. Standard diffusers pipeline methods only; nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILY_PIPELINES", "encode_prompt", "pixels_per_token", "phrase_token_indices"]

#: pipeline classes each family's encoder call is written for (others are refused with this list)
FAMILY_PIPELINES: dict[str, tuple[str, ...]] = {
    "flux": ("FluxPipeline",),
    "sd3": ("StableDiffusion3Pipeline",),
    "wan": ("WanPipeline",),
    "unet": ("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
}


def check_pipeline(pipe: Any, family: str, who: str) -> None:
    """ValueError unless `pipe` is a pipeline of `family` whose encoders `encode_prompt` below drives."""
    if pipe is None:
        raise ValueError(
            f"{who} needs the diffusers pipeline, not a bare model: apply(pipe, {who}(...)) (it encodes prompts "
            "with the pipeline's text encoders and reads its scheduler and VAE scale)"
        )
    names = FAMILY_PIPELINES.get(family, ())
    if type(pipe).__name__ not in names:
        raise ValueError(
            f"{who} supports the {family} pipelines {', '.join(names) or '(none)'}; got {type(pipe).__name__}"
        )


@torch.no_grad()
def encode_prompt(pipe: Any, family: str, prompt: str, device: torch.device, max_sequence_length: int | None) -> Any:
    """The conditional prompt embeddings [1, L, D] of `prompt` as the pipeline encodes it (plus, for UNet
    pipelines, nothing else: the caller only needs the token embeddings)."""
    if family == "flux":
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1, **kw)
        return embeds
    if family == "sd3":
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, **kw,
        )[0]  # fmt: skip
        return embeds
    if family == "wan":
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _ = pipe.encode_prompt(
            prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1, device=device, **kw
        )
        return embeds
    if family == "unet":
        if type(pipe).__name__ == "StableDiffusionXLPipeline":
            return pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]  # fmt: skip
        return pipe.encode_prompt(prompt, device, 1, False)[0]
    raise ValueError(f"no prompt encoder for family {family!r}")


def pixels_per_token(pipe: Any, family: str, model: Any) -> int:
    """Image pixels per token side: VAE downsampling x patch size (FLUX packs 2x2 latents)."""
    if family == "flux":
        return 2 * int(pipe.vae_scale_factor)
    if family == "sd3":
        return int(pipe.vae_scale_factor) * int(model.config.patch_size)
    if family == "wan":
        return int(pipe.vae_scale_factor_spatial) * int(model.config.patch_size[1])
    if family == "unet":
        return int(pipe.vae_scale_factor)
    raise ValueError(f"unknown family {family!r}")


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def phrase_token_indices(tokenizer: Any, prompt: str, phrase: str, offset: int, where: str) -> list[int]:
    """Positions of `phrase`'s tokens in the tokenized `prompt` (first occurrence; `offset` = tokens the
    tokenizer puts before the prompt, e.g. CLIP's BOS). ValueError naming `where` when it is absent."""
    p_ids, ph_ids = _tokens(tokenizer, prompt), _tokens(tokenizer, phrase)
    if not ph_ids:
        raise ValueError(f"{where} {phrase!r} has no tokens")
    limit = getattr(tokenizer, "model_max_length", None)
    for i in range(len(p_ids) - len(ph_ids) + 1):
        if p_ids[i : i + len(ph_ids)] == ph_ids:
            idx = list(range(offset + i, offset + i + len(ph_ids)))
            if limit is not None and limit < 10**6 and idx[-1] >= limit:
                raise ValueError(f"{where} {phrase!r} lies beyond the tokenizer's {limit} tokens (truncated)")
            return idx
    raise ValueError(f"{where} {phrase!r} is not in the prompt {prompt!r} (as tokens of the pipeline's tokenizer)")

"""CogVideoX (`CogVideoXTransformer3DModel`): joint attention `attn1` of every block.

Sequence [text, video] (text first); RoPE on the video part; patchify (patch_size_t, p, p)
on a [B, F, C, H, W] latent. Forward signature: (hidden_states, encoder_hidden_states, timestep, ...).
Dense plans run `CogVideoXAttnProcessor2_0` itself (it calls `F.scaled_dot_product_attention`
directly, so diffusers' attention backend does not apply to it, with or without attnplug).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter, SparseProcessor, hidden_states_arg, register_adapter
from .latent import LatentRule


class CogVideoXSparseProcessor(SparseProcessor):
    """`CogVideoXAttnProcessor2_0` with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:  # the model never passes one; keep exact semantics if a user does
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_txt = encoder_hidden_states.size(1)
        plan = self.plan(
            hidden_states, heads=attn.heads, head_dim=attn.inner_dim // attn.heads, text_len=n_txt, text_first=True
        )
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = key.shape[-1] // attn.heads
        query, key, value = (t.view(B, -1, attn.heads, hd).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, n_txt:] = apply_rotary_emb(query[:, :, n_txt:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, n_txt:] = apply_rotary_emb(key[:, :, n_txt:], image_rotary_emb)
        out = self.run(plan, *(t.transpose(1, 2) for t in (query, key, value)), text_len=n_txt, text_first=True)
        hidden_states = out.reshape(B, -1, attn.heads * hd)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split([n_txt, hidden_states.size(1) - n_txt], dim=1)
        return hidden_states, encoder_hidden_states


@register_adapter
class CogVideoXAdapter(Adapter):
    name = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)
    latent = LatentRule(video=True, vae_t=4, vae_s=8, patch_t=1, patch=2)
    default_fps = 8
    official_defaults = {
        # UltraViCo: CogVideoX-2b/5b's 49 frames -> 13 latent frames, no beta band
        "ultravico": {"train_frames": 13, "beta": None, "harmonic_period": None},
        # RIFLEx: intrinsic temporal frequency k (1-based), official value
        "riflex": {"k": 2},
    }
    text_first = True
    processors = {"CogVideoXAttnProcessor2_0": CogVideoXSparseProcessor}
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_objective = "ddpm"

    @classmethod
    def lora_inputs(cls, pipe, x, caption, text_len, device):
        """Latents [F, C, H, W] as the pipeline's (x the VAE's scaling_factor); the T5 embeddings; the pixel
        size (the RoPE is built from it)."""
        vae = pipe.vae
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        emb, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=text_len, device=device
        )
        return {
            "latents": z.float()[0].permute(1, 0, 2, 3), "encoder_hidden_states": emb[0],
            "pixel_size": torch.tensor(x.shape[-2:]),
        }  # fmt: skip

    @classmethod
    def lora_forward(cls, pipe, transformer, config, x, t, batch):
        """With the pipeline's rotary embeddings on checkpoints that use them (CogVideoX-5b)."""
        kw = {}
        if config.use_rotary_positional_embeddings:
            h, w = (int(v) for v in batch["pixel_size"][0])
            kw["image_rotary_emb"] = pipe._prepare_rotary_positional_embeddings(h, w, x.shape[1], x.device)
        return transformer(
            hidden_states=x, encoder_hidden_states=batch["encoder_hidden_states"], timestep=t, return_dict=False,
            **kw,
        )[0]  # fmt: skip

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]

    def grid(self, model, args, kwargs):
        _, f, _, h, w = hidden_states_arg(model, args, kwargs).shape
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        return (-(-f // pt), h // p, w // p)

    # -- the temporal RoPE (RIFLEx rewrites one of its frequencies) ---------------------------------
    #: "image_rotary_emb": the pipeline passes the RoPE to the transformer as this forward argument
    rope_site = "image_rotary_emb"

    @staticmethod
    def temporal_rope(model: nn.Module) -> tuple[int, float, torch.dtype]:
        """(temporal rotary dim, base theta, dtype diffusers computes the frequencies in); ValueError on a
        model without rotary embeddings."""
        if not model.config.use_rotary_positional_embeddings:
            raise ValueError(
                "RIFLEx needs a temporal rotary position embedding; this CogVideoXTransformer3DModel has none "
                "(use_rotary_positional_embeddings=False, e.g. CogVideoX-2b, which adds sincos position embeddings "
                "instead); nothing was patched"
            )
        return int(model.config.attention_head_dim) // 4, 10000.0, torch.float32

    @staticmethod
    def rope_frames(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, torch.Tensor | None]:
        """(token frames, tokens per frame, temporal positions) of the transformer's hidden_states: diffusers'
        own temporal grid (linspace for CogVideoX 1.0, arange for 1.5, which patchifies time)."""
        _, f, _, h, w = shape
        p, pt = model.config.patch_size, model.config.patch_size_t
        frames = f if pt is None else -(-f // pt)
        if pt is None:  # CogVideoX 1.0: diffusers' linspace grid
            grid = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
        else:
            grid = torch.arange(frames, dtype=torch.float32)
        return frames, (h // p) * (w // p), grid

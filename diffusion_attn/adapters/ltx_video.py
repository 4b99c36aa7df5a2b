"""LTX-Video (`LTXVideoTransformer3DModel`): self-attention `attn1` of every block.

Packed latents [B, N, C] with N = num_frames x height x width (the forward's arguments);
text enters through the cross-attention `attn2`, left untouched. RoPE on q and k. Forward
signature: (hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, num_frames,
height, width, ...); image-to-video passes per-token timesteps [B, N] (0 on the conditioning frame).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter, SparseProcessor, hidden_states_arg, register_adapter
from .latent import LatentRule


class LTXVideoSparseProcessor(SparseProcessor):
    """`LTXVideoAttnProcessor` (self-attention) with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        plan = self.plan(
            hidden_states, heads=attn.heads, head_dim=attn.inner_dim // attn.heads, text_len=0, text_first=False
        )
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        out = self.run(plan, query, key, value, text_len=0, text_first=False)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


# -- official checkpoints (diffusion_attn.checkpoints) ------------------------------------------------------
# configs: diffusers scripts/convert_ltx_to_diffusers.py get_transformer_config (the 2B transformer of 0.9.0 /
# 0.9.1 / 0.9.5, the 13B of 0.9.7); sizes: LTXPipeline / LTXConditionPipeline __call__ defaults 512 x 704 x 161;
# VAE 32x spatial / 8x temporal, patch 1; text enters through the cross-attention
_LTX = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
    activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6,
    caption_channels=4096, attention_bias=True, attention_out_bias=True,
)  # fmt: skip
_LTX_CHECKPOINTS = (
    dict(
        name="ltx-video-0.9.x-2b",
        repo="Lightricks/LTX-Video",
        pipeline="LTXPipeline",
        config=dict(_LTX, attention_head_dim=64, cross_attention_dim=2048, num_layers=28),
        config_source="diffusers scripts/convert_ltx_to_diffusers.py get_transformer_config (0.9.0 / 0.9.1 / "
        "0.9.5: the 2B transformer)",
        sizes={"default": (512, 704, 161), "768x512x121": (512, 768, 121)},
        size_source="LTXPipeline.__call__ defaults 512 x 704 x 161",
        cross_len=128,
        vae_spatial=32,
        vae_temporal=8,
        notes="0.9.1 / 0.9.5 differ in the VAE (timestep-aware decoder), not the transformer",
    ),
    dict(
        name="ltx-video-0.9.7-13b",
        repo="Lightricks/LTX-Video-0.9.7-dev",
        pipeline="LTXConditionPipeline",
        config=dict(_LTX, attention_head_dim=128, cross_attention_dim=4096, num_layers=48),
        config_source="diffusers scripts/convert_ltx_to_diffusers.py get_transformer_config('0.9.7')",
        sizes={"default": (512, 704, 161)},
        size_source="LTXConditionPipeline.__call__ defaults 512 x 704 x 161",
        cross_len=256,
        vae_spatial=32,
        vae_temporal=8,
    ),
)


@register_adapter
class LTXVideoAdapter(Adapter):
    name = "ltx_video"
    model_classes = ("LTXVideoTransformer3DModel",)
    latent = LatentRule(video=True, vae_t=8, vae_s=32, patch_t=1, patch=1)
    default_fps = 24
    official_defaults = {
        # UltraViCo: the LTX-Video pipeline's default 161 frames -> 21 latent frames, no beta band
        "ultravico": {"train_frames": 21, "beta": None, "harmonic_period": None},
    }
    processors = {"LTXVideoAttnProcessor": LTXVideoSparseProcessor}
    grid_inputs = ("hidden_states", "num_frames", "height", "width")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    official_checkpoints = _LTX_CHECKPOINTS

    @classmethod
    def tiny_inputs(cls, checkpoint, model, grid, *, batch, text_len, rnd):
        """Packed tokens [B, F x H x W, C] with their grid, the T5 text and its attention mask."""
        c = model.config
        f, h, w = grid
        return dict(
            hidden_states=rnd(batch, f * h * w, c.in_channels),
            encoder_hidden_states=rnd(batch, text_len, c.caption_channels),
            timestep=torch.full((batch,), 900.0),
            encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.long),
            num_frames=f,
            height=h,
            width=w,
        )

    @classmethod
    def lora_inputs(cls, pipe, x, caption, text_len, device):
        """Latents normalised as the pipeline's `_normalize_latents`; the T5 embeddings and attention mask."""
        vae = pipe.vae
        z = vae.encode(x).latent_dist.mode()
        z = pipe._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        emb, mask, _, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=text_len, device=device
        )
        return {"latents": z.float()[0], "encoder_hidden_states": emb[0], "encoder_attention_mask": mask[0]}

    @classmethod
    def lora_forward(cls, pipe, transformer, config, x, t, batch):
        """On packed tokens with the pipeline's RoPE interpolation scale, unpacked back to latents."""
        _, _, f, h, w = x.shape
        p, pt = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        packed = pipe._pack_latents(x, p, pt)
        rope = (
            pipe.vae_temporal_compression_ratio / 25.0,
            pipe.vae_spatial_compression_ratio,
            pipe.vae_spatial_compression_ratio,
        )
        out = transformer(
            hidden_states=packed, encoder_hidden_states=batch["encoder_hidden_states"], timestep=t,
            encoder_attention_mask=batch["encoder_attention_mask"], num_frames=f // pt, height=h // p, width=w // p,
            rope_interpolation_scale=rope, return_dict=False,
        )[0]  # fmt: skip
        return pipe._unpack_latents(out, f // pt, h // p, w // p, p, pt)

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]

    def grid(self, model, args, kwargs):
        n = hidden_states_arg(model, args, kwargs).shape[1]
        f, h, w = (self.forward_arg(model, args, kwargs, k) for k in ("num_frames", "height", "width"))
        if None in (f, h, w) or f * h * w != n:
            raise ValueError(
                f"attnplug[ltx_video]: cannot read the token grid: num_frames x height x width = {f} x {h} x {w} "
                f"must equal the {n} packed tokens (pass num_frames, height and width to the transformer; "
                "conditioning latents appended to the sequence are not supported)"
            )
        return (int(f), int(h), int(w))

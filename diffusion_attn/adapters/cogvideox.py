"""CogVideoX (`CogVideoXTransformer3DModel`): joint attention `attn1` of every block.

Sequence [text, video] (text first); RoPE on the video part; patchify (patch_size_t, p, p)
on a [B, F, C, H, W] latent. Forward signature: (hidden_states, encoder_hidden_states, timestep, ...).
Dense plans run `CogVideoXAttnProcessor2_0` itself (it calls `F.scaled_dot_product_attention`
directly, so diffusers' attention backend does not apply to it, with or without attnplug).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

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


# -- official checkpoints (diffusion_attn.checkpoints) ------------------------------------------------------
# configs: diffusers scripts/convert_cogvideox_to_diffusers.py get_transformer_init_kwargs and its --num_layers /
# --num_attention_heads help (1.0: 2B 30 layers, 30 heads, no RoPE; 5B 42 layers, 48 heads, RoPE; 1.5:
# patch_size_t 2); sizes: CogVideoXPipeline's defaults from the transformer's sample_* (x VAE 8 = 480 x 720 x 49),
# CogVideoX1.5 the diffusers docs' 768 x 1360 x 81; VAE 8x spatial / 4x temporal
_COG = dict(
    attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
    max_text_seq_length=226, temporal_compression_ratio=4, patch_size=2, use_learned_positional_embeddings=False,
)  # fmt: skip
_COG_10 = dict(_COG, patch_size_t=None, patch_bias=True, sample_height=60, sample_width=90, sample_frames=49)
_COG_CHECKPOINTS = (
    dict(
        name="cogvideox-2b",
        repo="THUDM/CogVideoX-2b",
        pipeline="CogVideoXPipeline",
        config=dict(_COG_10, num_layers=30, num_attention_heads=30, use_rotary_positional_embeddings=False),
        config_source="diffusers scripts/convert_cogvideox_to_diffusers.py --version 1.0 (2B: 30 layers, "
        "30 heads, no RoPE)",
        sizes={"default": (480, 720, 49), "81f": (480, 720, 81)},
        size_source="CogVideoXPipeline: sample_height/width x 8 = 480 x 720, sample_frames 49",
        text_len=226,
        notes="sincos position table for exactly 226 text tokens",
    ),
    dict(
        name="cogvideox-5b",
        repo="THUDM/CogVideoX-5b",
        pipeline="CogVideoXPipeline",
        config=dict(_COG_10, num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True),
        config_source="diffusers scripts/convert_cogvideox_to_diffusers.py --version 1.0 (5B: 42 layers, "
        "48 heads, RoPE)",
        sizes={"default": (480, 720, 49), "81f": (480, 720, 81)},
        size_source="CogVideoXPipeline: sample_height/width x 8 = 480 x 720, sample_frames 49",
        text_len=226,
    ),
    dict(
        name="cogvideox1.5-5b",
        repo="THUDM/CogVideoX1.5-5B",
        pipeline="CogVideoXPipeline",
        config=dict(
            _COG,
            num_layers=42,
            num_attention_heads=48,
            use_rotary_positional_embeddings=True,
            patch_size_t=2,
            patch_bias=False,
            sample_height=300,
            sample_width=300,
            sample_frames=81,
        ),
        config_source="diffusers scripts/convert_cogvideox_to_diffusers.py --version 1.5 (patch_size_t 2)",
        sizes={"default": (768, 1360, 81), "161f": (768, 1360, 161)},
        size_source="diffusers cogvideox docs: T2V best at 1360 x 768, 81 or 161 frames (the pipeline's own "
        "default, sample 300 x 8, is 2400 x 2400)",
        text_len=226,
        notes="latent frames padded to a multiple of patch_size_t=2 by the pipeline",
    ),
)


def _pipeline_rope(config: Any, height: int, width: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding `CogVideoXPipeline._prepare_rotary_positional_embeddings` passes (pixels in,
    `frames` latent frames before the temporal patchify)."""
    from diffusers import CogVideoXPipeline

    fake = SimpleNamespace(transformer=SimpleNamespace(config=config), vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, height, width, frames, torch.device("cpu"))


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
    official_checkpoints = _COG_CHECKPOINTS

    @classmethod
    def config_latent_frames(cls, config, frames, vae_temporal):
        """CogVideoX1.5's pipeline pads the latent frames to a multiple of patch_size_t."""
        lf = (frames - 1) // vae_temporal + 1
        pt = config.get("patch_size_t")
        if pt:
            lf = -(-lf // pt) * pt
        return lf

    @classmethod
    def tiny_inputs(cls, checkpoint, model, grid, *, batch, text_len, rnd):
        """Latents [B, F, C, H, W] and the T5 text (CogVideoX-2b's sincos position table covers exactly
        `max_text_seq_length` text tokens: it always gets 226), the pipeline's RoPE where the model uses one."""
        c = model.config
        f, h, w = grid
        pt = c.patch_size_t or 1
        n_txt = c.max_text_seq_length if not c.use_rotary_positional_embeddings else text_len
        kw = dict(
            hidden_states=rnd(batch, f * pt, c.in_channels, h * c.patch_size, w * c.patch_size),
            encoder_hidden_states=rnd(batch, n_txt, c.text_embed_dim),
            timestep=torch.full((batch,), 900, dtype=torch.long),
        )
        if c.use_rotary_positional_embeddings:
            kw["image_rotary_emb"] = _pipeline_rope(c, h * c.patch_size * 8, w * c.patch_size * 8, f * pt)
        if c.ofs_embed_dim is not None:
            kw["ofs"] = torch.full((batch,), 2.0)
        return kw

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

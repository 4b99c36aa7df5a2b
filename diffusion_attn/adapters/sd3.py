"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): joint attention of every block and, for
SD3.5's dual-attention blocks, the extra image self-attention `attn2`.

Sequence [image, text] (image first), no RoPE; patchify p x p on a [B, C, H, W] latent. Forward
signature: (hidden_states, encoder_hidden_states, pooled_projections, timestep, ...). Dense plans
run `JointAttnProcessor2_0` itself (it calls `F.scaled_dot_product_attention` directly and ignores
`attention_mask`; so does the sparse path).

IP-Adapter (`SD3IPAdapterJointAttnProcessor2_0`): the joint attention is attnplug's; the
image-prompt term (image queries against image + IP keys, dense, with the processor's own norms)
is computed exactly as diffusers does and added with the processor's scale.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..variants._pipes import phrase_token_indices
from .base import Adapter, SparseProcessor, WrappedModuleProcessor, hidden_states_arg, register_adapter
from .latent import LatentRule


class SD3SparseProcessor(SparseProcessor):
    """`JointAttnProcessor2_0` with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self._joint(attn, hidden_states, encoder_hidden_states)
        if out is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        hidden_states, encoder_hidden_states = out[0], out[1]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _joint(self, attn, hidden_states, encoder_hidden_states):
        """(image attention before to_out, text out, raw image q, k, v) or None when the plan is dense."""
        n_img = hidden_states.shape[1]
        B = hidden_states.shape[0]
        n_txt = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        hd = attn.to_k.out_features // attn.heads
        plan = self.plan(hidden_states, heads=attn.heads, head_dim=hd, text_len=n_txt, text_first=False)
        if plan is None:
            return None
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.view(B, -1, attn.heads, hd).transpose(1, 2) for t in (query, key, value))
        raw = (query, key, value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq, ek, ev = (
                proj(encoder_hidden_states).view(B, -1, attn.heads, hd).transpose(1, 2)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        out = self.run(plan, *(t.transpose(1, 2) for t in (query, key, value)), text_len=n_txt, text_first=False)
        hidden_states = out.reshape(B, -1, attn.heads * hd).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states, raw


class SD3IPSparseProcessor(WrappedModuleProcessor, SD3SparseProcessor):
    """`SD3IPAdapterJointAttnProcessor2_0`: attnplug's joint attention plus diffusers' IP-Adapter term."""

    def __init__(self, runtime, layer, original) -> None:
        WrappedModuleProcessor.__init__(self, original)
        SD3SparseProcessor.__init__(self, runtime, layer, original)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None, temb=None
    ):
        out = self._joint(attn, hidden_states, encoder_hidden_states)
        if out is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, ip_hidden_states, temb)
        hidden_states, encoder_hidden_states, (img_query, img_key, img_value) = out
        scale = self.original.scale
        if scale != 0 and ip_hidden_states is not None:  # as SD3IPAdapterJointAttnProcessor2_0
            batch_size, head_dim = img_query.shape[0], img_query.shape[-1]
            norm_ip = self.norm_ip(ip_hidden_states, temb=temb)
            ip_key = self.to_k_ip(norm_ip).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = self.to_v_ip(norm_ip).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            query = self.norm_q(img_query)
            img_key = self.norm_k(img_key)
            ip_key = self.norm_ip_k(ip_key)
            key = torch.cat([img_key, ip_key], dim=2)
            value = torch.cat([img_value, ip_value], dim=2)
            ip_out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            ip_out = ip_out.transpose(1, 2).view(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            hidden_states = hidden_states + ip_out * scale
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


# -- official checkpoints (diffusion_attn.checkpoints) ------------------------------------------------------
# configs: the hub repo's transformer/config.json (diffusers scripts/convert_sd3_to_diffusers.py: heads = layers,
# head dim 64, the position-embedding size and SD3.5's dual-attention layers read from the checkpoint); sizes:
# StableDiffusion3Pipeline's default_sample_size 128 x VAE 8 = 1024; text (77 CLIP + 256 T5 tokens) after the image
_SD3 = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, joint_attention_dim=4096,
    pooled_projection_dim=2048,
)  # fmt: skip
_SD3_CHECKPOINTS = (
    dict(
        name="sd3-medium",
        repo="stabilityai/stable-diffusion-3-medium-diffusers",
        pipeline="StableDiffusion3Pipeline",
        config=dict(
            _SD3,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=192,
            qk_norm=None,
            dual_attention_layers=(),
        ),
        config_source="hub transformer/config.json (scripts/convert_sd3_to_diffusers.py: heads = layers)",
        sizes={"default": (1024, 1024, 1)},
        size_source="StableDiffusion3Pipeline default_sample_size 128 x 8",
        text_len=333,
        notes="text = 77 CLIP + 256 T5 tokens, after the image",
    ),
    dict(
        name="sd3.5-medium",
        repo="stabilityai/stable-diffusion-3.5-medium",
        pipeline="StableDiffusion3Pipeline",
        config=dict(
            _SD3,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        config_source="hub transformer/config.json (MMDiT-X: dual attention in blocks 0-12, qk rms_norm)",
        sizes={"default": (1024, 1024, 1), "1440": (1440, 1440, 1)},
        size_source="StableDiffusion3Pipeline default 1024 (pos_embed_max_size 384 allows up to 1536)",
        text_len=333,
        notes="blocks 0-12 add an image-only self-attention attn2 (dual attention)",
    ),
    dict(
        name="sd3.5-large",
        repo="stabilityai/stable-diffusion-3.5-large",
        pipeline="StableDiffusion3Pipeline",
        config=dict(
            _SD3,
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
            dual_attention_layers=(),
        ),
        config_source="hub transformer/config.json",
        sizes={"default": (1024, 1024, 1)},
        size_source="StableDiffusion3Pipeline default 1024",
        text_len=333,
    ),
)


@register_adapter
class SD3Adapter(Adapter):
    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    latent = LatentRule(video=False, vae_t=1, vae_s=8, patch_t=1, patch=2)
    pipelines = ("StableDiffusion3Pipeline",)
    processors = {
        "JointAttnProcessor2_0": SD3SparseProcessor,
        "SD3IPAdapterJointAttnProcessor2_0": SD3IPSparseProcessor,
    }
    official_checkpoints = _SD3_CHECKPOINTS

    @classmethod
    def config_layers(cls, config):
        """The joint blocks and the dual-attention blocks' image-only attn2 (SD3.5 medium)."""
        return int(config["num_layers"]) + len(config.get("dual_attention_layers", ()))

    @classmethod
    def config_with_layers(cls, config, num_layers):
        """`num_layers` blocks (at least 2 when the config has dual-attention layers), keeping the dual-attention
        layers below the last block."""
        c = dict(config)
        c["num_layers"] = max(num_layers, 2) if c.get("dual_attention_layers") else num_layers
        c["dual_attention_layers"] = tuple(i for i in c.get("dual_attention_layers", ()) if i < c["num_layers"] - 1)
        return c

    @classmethod
    def tiny_inputs(cls, checkpoint, model, grid, *, batch, text_len, rnd):
        """Latents [B, C, H, W], the joint text, pooled CLIP."""
        c = model.config
        _, h, w = grid
        return dict(
            hidden_states=rnd(batch, c.in_channels, h * c.patch_size, w * c.patch_size),
            encoder_hidden_states=rnd(batch, text_len, c.joint_attention_dim),
            pooled_projections=rnd(batch, c.pooled_projection_dim),
            timestep=torch.full((batch,), 900.0),
        )

    @classmethod
    def encode_prompt(cls, pipe, prompt, device, max_sequence_length):
        """StableDiffusion3Pipeline's joint text tokens: the two CLIPs' (padded to the T5 width), then T5's."""
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, **kw,
        )[0]  # fmt: skip
        return embeds

    @classmethod
    def reencode_length(cls, pipe, embeds_len):
        """The T5 tokens: what follows the CLIP tokens."""
        return embeds_len - pipe.tokenizer_max_length

    @classmethod
    def pixels_per_token(cls, pipe, model):
        return int(pipe.vae_scale_factor) * int(model.config.patch_size)

    @classmethod
    def phrase_tokens(cls, pipe, prompt, phrase, where):
        """The phrase in the CLIP tokens (after BOS), and in the T5 tokens that follow them when T5 is loaded."""
        idx = phrase_token_indices(pipe.tokenizer, prompt, phrase, 1, where)
        if getattr(pipe, "tokenizer_3", None) is not None:
            idx += phrase_token_indices(pipe.tokenizer_3, prompt, phrase, pipe.tokenizer_max_length, where)
        return idx

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        mods = []
        for i, b in enumerate(model.transformer_blocks):
            mods.append((f"transformer_blocks.{i}.attn", b.attn))
            if getattr(b, "attn2", None) is not None:
                mods.append((f"transformer_blocks.{i}.attn2", b.attn2))
        return mods

    def grid(self, model, args, kwargs):
        _, _, h, w = hidden_states_arg(model, args, kwargs).shape
        p = model.config.patch_size
        return (1, h // p, w // p)

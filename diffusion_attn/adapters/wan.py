"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): self-attention `attn1` of every block.

Tokens: frames x height x width after the (t, h, w) patchify, no text in self-attention
(text enters through the cross-attention `attn2`, hooked only for cross-attention variants such as
Regional). RoPE on q and k as in `WanAttnProcessor`. Forward signature: (hidden_states, timestep,
encoder_hidden_states, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..runtime.ring import shard_rows_attention
from ..variants.base import TokenLayout
from .base import Adapter, SparseProcessor, hidden_states_arg, register_adapter
from .latent import LatentRule


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding, as in diffusers' WanAttnProcessor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseProcessor(SparseProcessor):
    """`WanAttnProcessor` for self-attention with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        plan = self.plan(
            hidden_states, heads=attn.heads, head_dim=attn.inner_dim // attn.heads, text_len=0, text_first=False
        )
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rope(query, *rotary_emb)
            key = _wan_rope(key, *rotary_emb)
        hidden_states = self.run(plan, query, key, value, text_len=0, text_first=False)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class WanCrossProcessor(SparseProcessor):
    """`WanAttnProcessor` for the text cross-attention `attn2` (text-to-video: no image context), the
    attention call replaced by attnplug's; planned only by cross-attention variants (Regional)."""

    def __init__(self, runtime, layer, original) -> None:
        super().__init__(runtime, layer, original)
        self._layouts: dict = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        out = None
        if encoder_hidden_states is not None and attn.add_k_proj is None and attention_mask is None:
            out = self._cross(attn, hidden_states, encoder_hidden_states)
        if out is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        return out

    def _cross(self, attn, hidden_states, encoder_hidden_states):
        rt = self.runtime
        key = (rt.grid, encoder_hidden_states.shape[1])
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = TokenLayout(grid=rt.grid, family="wan", cross_len=key[1])
        start = None  # context parallelism: this rank's first visual query (diffusers shards the queries only)
        if layout.num_visual != hidden_states.shape[1]:
            pc = self._context_parallel()
            cp = None if pc is None else pc.context_parallel_config
            if cp is None or hidden_states.shape[1] * cp.ring_degree * cp.ulysses_degree != layout.num_visual:
                return None
            shard = cp._ring_local_rank * cp.ulysses_degree + cp._ulysses_local_rank  # rank in the flattened mesh
            start = shard * hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        plan = rt.plan(
            self.layer, layout, hidden_states.shape[0], attn.heads, head_dim, hidden_states.device, hidden_states.dtype
        )
        if plan.is_dense:
            return None
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key_, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key_ = attn.norm_q(query), attn.norm_k(key_)
        query, key_, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key_, value))
        if start is None:
            out = rt.run(plan, query, key_, value, layout=layout)
        else:
            out = shard_rows_attention(rt, plan, query, key_, value, start)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


@register_adapter
class WanAdapter(Adapter):
    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    latent = LatentRule(video=True, vae_t=4, vae_s=8, patch_t=1, patch=2)
    vae_from_config = True  # AutoencoderKLWan's config has scale_factor_temporal / _spatial (WanPipeline reads them)
    pipelines = ("WanPipeline",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    processors = {"WanAttnProcessor": WanSparseProcessor}
    cross_processors = {"WanAttnProcessor": WanCrossProcessor}
    default_fps = 16
    official_defaults = {
        # Radial attention: Wan2.1-14B 768x1280x69f, scripts/wan_t2v_inference.sh
        "radial": {"dense_layers": 1, "dense_steps": 12, "decay_factor": 0.2, "attention_sink": True},
        # UltraViCo: Wan2.1's 81 frames -> 21 latent frames (official: 1560 tokens/frame x 21 / 2), no beta band
        "ultravico": {"train_frames": 21, "beta": None, "harmonic_period": None},
        # RIFLEx: intrinsic temporal frequency k (1-based), official value
        "riflex": {"k": 6},
    }

    @classmethod
    def lora_inputs(cls, pipe, x, caption, text_len, device):
        """Latents normalised by the VAE config's latents_mean / latents_std; the UMT5 embeddings."""
        vae = pipe.vae
        z = vae.encode(x).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
        emb, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=text_len, device=device
        )
        return {"latents": ((z.float() - mean) / std)[0], "encoder_hidden_states": emb[0]}

    @classmethod
    def lora_forward(cls, pipe, transformer, config, x, t, batch):
        return transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=batch["encoder_hidden_states"], return_dict=False
        )[0]

    @classmethod
    def encode_prompt(cls, pipe, prompt, device, max_sequence_length):
        """WanPipeline's UMT5 embeddings (the cross-attention's text tokens)."""
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _ = pipe.encode_prompt(
            prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1, device=device, **kw
        )
        return embeds

    @classmethod
    def pixels_per_token(cls, pipe, model):
        return int(pipe.vae_scale_factor_spatial) * int(model.config.patch_size[1])

    @classmethod
    def extra_text_refused(cls, pipe, model):
        """Image-to-video: the cross-attention splits its text at a fixed 512 tokens."""
        if model.config.image_dim is not None or "ImageToVideo" in type(pipe).__name__:
            return "Wan image-to-video (its cross-attention hard-codes 512 text tokens)"
        return None

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.blocks)]

    def cross_attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}.attn2", b.attn2) for i, b in enumerate(model.blocks)]

    def grid(self, model, args, kwargs):
        _, _, f, h, w = hidden_states_arg(model, args, kwargs).shape
        pt, ph, pw = model.config.patch_size
        return (f // pt, h // ph, w // pw)

    # -- the temporal RoPE (RIFLEx rewrites one of its frequencies) ---------------------------------
    #: "module": the RoPE is the output of the transformer's `rope` module (`WanRotaryPosEmbed`)
    rope_site = "module"

    @staticmethod
    def temporal_rope(model: nn.Module) -> tuple[int, float, torch.dtype]:
        """(temporal rotary dim, base theta, dtype diffusers computes the frequencies in)."""
        return int(model.rope.t_dim), 10000.0, torch.float64  # WanRotaryPosEmbed's default theta

    @staticmethod
    def rope_frames(rope: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, torch.Tensor | None]:
        """(token frames, tokens per frame, temporal positions or None: 0, 1, ...) of the rope module's input."""
        _, _, f, h, w = shape
        pt, ph, pw = rope.patch_size
        return f // pt, (h // ph) * (w // pw), None

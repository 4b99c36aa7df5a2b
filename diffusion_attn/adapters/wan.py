"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): self-attention `attn1` of every block.

Tokens: frames x height x width after the (t, h, w) patchify, no text in self-attention
(text enters through the cross-attention `attn2`, left untouched). RoPE on q and k as in
`WanAttnProcessor`. Forward signature: (hidden_states, timestep, encoder_hidden_states, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter, SparseProcessor, hidden_states_arg, register_adapter


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


@register_adapter
class WanAdapter(Adapter):
    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    processors = {"WanAttnProcessor": WanSparseProcessor}

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.blocks)]

    def grid(self, model, args, kwargs):
        _, _, f, h, w = hidden_states_arg(model, args, kwargs).shape
        pt, ph, pw = model.config.patch_size
        return (f // pt, h // ph, w // pw)

"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): joint attention of every block and, for
SD3.5's dual-attention blocks, the extra image self-attention `attn2`.

Sequence [image, text] (image first), no RoPE; patchify p x p on a [B, C, H, W] latent.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter, SparseProcessor, hidden_states_arg, register_adapter


class SD3SparseProcessor(SparseProcessor):
    """`JointAttnProcessor2_0` with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        n_img = hidden_states.shape[1]
        B = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = key.shape[-1] // attn.heads
        query, key, value = (t.view(B, -1, attn.heads, hd).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n_txt = 0
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            eq, ek, ev = (
                proj(encoder_hidden_states).view(B, -1, attn.heads, hd).transpose(1, 2)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        out = self.attend(*(t.transpose(1, 2) for t in (query, key, value)), text_len=n_txt, text_first=False)
        hidden_states = out.reshape(B, -1, attn.heads * hd).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


@register_adapter
class SD3Adapter(Adapter):
    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    processor_cls = SD3SparseProcessor

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        mods = []
        for i, b in enumerate(model.transformer_blocks):
            mods.append((f"transformer_blocks.{i}.attn", b.attn))
            if getattr(b, "attn2", None) is not None:
                mods.append((f"transformer_blocks.{i}.attn2", b.attn2))
        return mods

    def grid(self, model, args, kwargs):
        _, _, h, w = hidden_states_arg(args, kwargs).shape
        p = model.config.patch_size
        return (1, h // p, w // p)

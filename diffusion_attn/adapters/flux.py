"""FLUX.1 (`FluxTransformer2DModel`): joint attention of the dual-stream and single-stream blocks.

Sequence [text, image] (text first) with packed 2x2 latents; the image grid comes from
`img_ids` (rows, cols): read on the host once per `img_ids` tensor (FluxPipeline passes the same
one at every step), so steady-state forwards read no tensor value. RoPE on the whole joint
sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter, SparseProcessor, register_adapter


class FluxSparseProcessor(SparseProcessor):
    """`FluxAttnProcessor` with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq = attn.norm_added_q(eq)
            ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        grid_tokens = self.runtime.grid[1] * self.runtime.grid[2]
        n_txt = query.shape[1] - grid_tokens
        out = self.attend(query, key, value, text_len=n_txt, text_first=True)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            n_e = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_e, hidden_states.shape[1] - n_e], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


@register_adapter
class FluxAdapter(Adapter):
    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    processor_cls = FluxSparseProcessor

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        mods = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.transformer_blocks)]
        mods += [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.single_transformer_blocks)]
        return mods

    def grid(self, model, args, kwargs):
        ids = kwargs.get("img_ids")
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if ids is None or hs is None:
            raise ValueError("attnplug[flux]: the transformer must be called with hidden_states and img_ids")
        last = getattr(self, "_ids_grid", None)
        if last is not None and last[0] is ids:  # pipelines pass the same img_ids at every step
            h, w = last[1]
        else:
            grid_ids = ids[0] if ids.dim() == 3 else ids
            h, w = int(grid_ids[:, 1].max()) + 1, int(grid_ids[:, 2].max()) + 1  # host read: once per tensor
            self._ids_grid = (ids, (h, w))
        if h * w != hs.shape[1]:
            raise ValueError(
                f"attnplug[flux]: img_ids describe a {h} x {w} grid but there are {hs.shape[1]} image tokens "
                "(conditioning images appended to the sequence are not supported yet)"
            )
        return (1, h, w)

"""FLUX.1 (`FluxTransformer2DModel`): joint attention of the dual-stream and single-stream blocks.

Sequence [text, image] (text first) with packed 2x2 latents; the image grid comes from
`img_ids` (rows, cols): read on the host once per `img_ids` tensor (FluxPipeline passes the same
one at every step), so steady-state forwards read no tensor value. RoPE on the whole joint
sequence. Forward signature: (hidden_states, encoder_hidden_states, pooled_projections,
timestep, img_ids, txt_ids, guidance, ...).

IP-Adapter (`FluxIPAdapterAttnProcessor`): the joint attention is attnplug's, the image-prompt
term (image queries against the IP tokens, dense) is computed exactly as diffusers does and
returned as the third output, so the block adds it as usual. The IP projection weights stay
registered under the attention module's `processor` with their usual names.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter, SparseProcessor, WrappedModuleProcessor, register_adapter
from .latent import LatentRule


class FluxSparseProcessor(SparseProcessor):
    """`FluxAttnProcessor` with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        out = self._joint(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if out is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return out[:2] if encoder_hidden_states is not None else out[0]

    def _text_len(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> int:
        """Text tokens of the (whole) joint sequence: the single-stream blocks get [text, image] concatenated."""
        rt = self.runtime
        n_img = rt.grid[1] * rt.grid[2]
        pc = self._context_parallel()
        cp = None if pc is None else pc.context_parallel_config
        degree = 1 if cp is None else cp.ulysses_degree * cp.ring_degree  # every rank holds 1/degree
        n = hidden_states.shape[1] * degree
        if encoder_hidden_states is not None:
            return encoder_hidden_states.shape[1] * degree
        if n < n_img:
            raise RuntimeError(
                f"attnplug[flux]: the single-stream attention got {n} tokens, fewer than the {n_img} image tokens"
            )
        return n - n_img

    def _joint(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """(image out, text out, image query) of attnplug's joint attention, or None when the plan is dense."""
        plan = self.plan(
            hidden_states,
            heads=attn.heads,
            head_dim=attn.head_dim,
            text_len=self._text_len(hidden_states, encoder_hidden_states),
            text_first=True,
        )
        if plan is None:
            return None
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        ip_query = query
        if encoder_hidden_states is not None:
            eq, ek, ev = (t.unflatten(-1, (attn.heads, -1)) for t in (eq, ek, ev))
            eq = attn.norm_added_q(eq)
            ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        n_txt = self._text_len(hidden_states, encoder_hidden_states)
        out = self.run(plan, query, key, value, text_len=n_txt, text_first=True)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            n_e = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_e, hidden_states.shape[1] - n_e], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states, ip_query


class FluxIPSparseProcessor(WrappedModuleProcessor, FluxSparseProcessor):
    """`FluxIPAdapterAttnProcessor`: attnplug's joint attention plus diffusers' IP-Adapter term."""

    def __init__(self, runtime, layer, original) -> None:
        WrappedModuleProcessor.__init__(self, original)
        FluxSparseProcessor.__init__(self, runtime, layer, original)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        ip_hidden_states=None,
        ip_adapter_masks=None,
    ):
        original = self.original
        if attention_mask is not None:
            return original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, ip_hidden_states,
                ip_adapter_masks,
            )  # fmt: skip
        out = self._joint(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if out is None:
            return original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, ip_hidden_states,
                ip_adapter_masks,
            )  # fmt: skip
        hidden_states, encoder_hidden_states, ip_query = out
        if encoder_hidden_states is None:
            return hidden_states
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        batch_size = ip_query.shape[0]
        ip_attn_output = torch.zeros_like(hidden_states)  # as FluxIPAdapterAttnProcessor (ip_adapter_masks unused)
        for current, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, original.scale, self.to_k_ip, self.to_v_ip):
            ip_key = to_k_ip(current).view(batch_size, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(current).view(batch_size, -1, attn.heads, attn.head_dim)
            current = dispatch_attention_fn(
                ip_query,
                ip_key,
                ip_value,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=original._attention_backend,
                parallel_config=original._parallel_config,
            )
            current = current.reshape(batch_size, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
            ip_attn_output += scale * current
        return hidden_states, encoder_hidden_states, ip_attn_output


# -- official checkpoints (diffusion_attn.checkpoints) ------------------------------------------------------
# configs: the hub repo's transformer/config.json (no conversion script holds the numbers); sizes: FluxPipeline's
# default_sample_size 128 x VAE 8 = 1024 (2048 / 4096 for high resolution: the GNA paper's 256 x 256 tokens);
# VAE 8x, latents packed 2 x 2; text (T5, max_sequence_length) first in the joint attention
_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
_FLUX_CHECKPOINTS = (
    dict(
        name="flux.1-dev",
        repo="black-forest-labs/FLUX.1-dev",
        pipeline="FluxPipeline",
        config=_FLUX,
        config_source="hub transformer/config.json (= FluxTransformer2DModel defaults, guidance_embeds true)",
        sizes={"default": (1024, 1024, 1), "2048": (2048, 2048, 1), "4096": (4096, 4096, 1)},
        size_source="FluxPipeline default_sample_size 128 x 8 = 1024; 2048 / 4096 for high resolution (GNA "
        "paper: 256 x 256 tokens)",
        text_len=512,
        notes="guidance-distilled: no CFG, guidance as an embedding",
    ),
    dict(
        name="flux.1-schnell",
        repo="black-forest-labs/FLUX.1-schnell",
        pipeline="FluxPipeline",
        config=dict(_FLUX, guidance_embeds=False),
        config_source="hub transformer/config.json (guidance_embeds false: timestep-distilled)",
        sizes={"default": (1024, 1024, 1)},
        size_source="FluxPipeline default 1024; max_sequence_length 256",
        text_len=256,
    ),
    dict(
        name="flux.1-fill-dev",
        repo="black-forest-labs/FLUX.1-Fill-dev",
        pipeline="FluxFillPipeline",
        config=dict(_FLUX, in_channels=384, out_channels=64),
        config_source="hub transformer/config.json (in_channels 384 = 64 latent + 64 masked image + 256 mask)",
        sizes={"default": (1024, 1024, 1)},
        size_source="FluxFillPipeline default 1024 (guidance 30)",
        text_len=512,
    ),
    dict(
        name="flux.1-kontext-dev",
        repo="black-forest-labs/FLUX.1-Kontext-dev",
        pipeline="FluxKontextPipeline",
        config=_FLUX,
        config_source="hub transformer/config.json (same transformer config as FLUX.1-dev)",
        sizes={"default": (1024, 1024, 1)},
        size_source="FluxKontextPipeline max_area 1024 ** 2",
        text_len=512,
        extra_tokens=4096,
        notes="the reference image's 4096 tokens are appended after the generated image's (img_ids[..., 0] = 1): "
        "attnplug refuses them at the first forward",
    ),
)


@register_adapter
class FluxAdapter(Adapter):
    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    latent = LatentRule(video=False, vae_t=1, vae_s=8, patch_t=1, patch=2)  # 2x2 latent packing
    patch_from_config = False  # the transformer's patch_size 1 applies after the 2x2 packing
    text_first = True
    processors = {"FluxAttnProcessor": FluxSparseProcessor, "FluxIPAdapterAttnProcessor": FluxIPSparseProcessor}
    grid_inputs = ("hidden_states", "img_ids")
    pipelines = ("FluxPipeline",)
    official_checkpoints = _FLUX_CHECKPOINTS
    layer_keys = ("num_layers", "num_single_layers")  # dual- and single-stream blocks

    @classmethod
    def config_grid(cls, config, latent_frames, height, width, vae_spatial):
        """Latents rounded down to a multiple of 2, then packed 2 x 2 (the config's patch_size 1 applies after)."""
        return (1, (height // vae_spatial) // 2, (width // vae_spatial) // 2)

    @classmethod
    def tiny_inputs(cls, checkpoint, model, grid, *, batch, text_len, rnd):
        """Packed latents [B, H x W, C] with their position ids, T5 text, pooled CLIP, guidance 3.5 when embedded."""
        c = model.config
        _, h, w = grid
        img_ids = torch.zeros(h * w, 3)
        img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
        img_ids[:, 2] = torch.arange(w).repeat(h)
        kw = dict(
            hidden_states=rnd(batch, h * w, c.in_channels),
            encoder_hidden_states=rnd(batch, text_len, c.joint_attention_dim),
            pooled_projections=rnd(batch, c.pooled_projection_dim),
            timestep=torch.full((batch,), 0.9),
            img_ids=img_ids,
            txt_ids=torch.zeros(text_len, 3),
        )
        if c.guidance_embeds:
            kw["guidance"] = torch.full((batch,), 3.5)
        return kw

    @classmethod
    def encode_prompt(cls, pipe, prompt, device, max_sequence_length):
        """FluxPipeline's T5 embeddings (the joint text tokens; CLIP only pools)."""
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1, **kw)
        return embeds

    @classmethod
    def pixels_per_token(cls, pipe, model):
        """VAE factor x the 2 x 2 latent packing."""
        return 2 * int(pipe.vae_scale_factor)

    @classmethod
    def prepend_text(cls, model, args, kwargs, n):
        """`txt_ids` gets `n` zero rows in front (FLUX's text positions are all zero)."""
        ids = cls.forward_arg(model, args, kwargs, "txt_ids")
        if isinstance(ids, torch.Tensor):
            zeros = ids.new_zeros(*ids.shape[:-2], n, ids.shape[-1])
            args = cls.set_forward_arg(model, args, kwargs, "txt_ids", torch.cat([zeros, ids], dim=-2))
        return args

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        mods = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.transformer_blocks)]
        mods += [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.single_transformer_blocks)]
        return mods

    def grid(self, model, args, kwargs):
        ids = self.forward_arg(model, args, kwargs, "img_ids")
        hs = self.forward_arg(model, args, kwargs, "hidden_states")
        if not isinstance(ids, torch.Tensor) or not isinstance(hs, torch.Tensor):
            raise ValueError("attnplug[flux]: the transformer must be called with hidden_states and img_ids tensors")
        if ids.dim() not in (2, 3) or ids.shape[-1] != 3:
            raise ValueError(
                f"attnplug[flux]: img_ids must be [N, 3] (or [B, N, 3]) position ids, got {tuple(ids.shape)}"
            )
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
                "(conditioning images appended to the sequence, e.g. FLUX Kontext, are not supported)"
            )
        return (1, h, w)

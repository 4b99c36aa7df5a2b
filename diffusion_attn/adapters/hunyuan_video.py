"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): joint attention of the dual-stream and
single-stream blocks.

Sequence [video, text] (text appended after the video tokens); RoPE on the video part only;
padded text tokens are masked as keys (the model's [B, 1, 1, N] mask), which attnplug turns
into a key mask on the block layout. Forward signature: (hidden_states, timestep,
encoder_hidden_states, encoder_attention_mask, ...). The model builds that mask once per forward and passes the
same tensor to every block: its key mask and the key-masked layouts are resolved at the first
sparse layer of a forward (one host sync: a comparison with the previous forward's mask, and
`BlockLayout.with_key_mask` on the host only when the contents changed) and reused by the others.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter, SparseProcessor, hidden_states_arg, register_adapter
from .latent import LatentRule


def _key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask[:, 0, 0]


class HunyuanVideoSparseProcessor(SparseProcessor):
    """`HunyuanVideoAttnProcessor2_0` with the attention call replaced by attnplug's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_txt = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attention_mask is not None and (
            attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[2] != 1
        ):
            raise ValueError(
                "attnplug[hunyuan_video]: expected the model's boolean key-padding mask [B, 1, 1, N], got "
                f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
            )
        plan = self.plan(
            hidden_states, heads=attn.heads, head_dim=attn.inner_dim // attn.heads, text_len=n_txt, text_first=False
        )
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        single = attn.add_q_proj is None
        if single and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single and n_txt:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-n_txt], image_rotary_emb, sequence_dim=1), query[:, -n_txt:]], dim=1
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-n_txt], image_rotary_emb, sequence_dim=1), key[:, -n_txt:]], 1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if not single and encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((query, eq), (key, ek), (value, ev)))
        key_mask = None
        if attention_mask is not None:
            key_mask = self.runtime.key_mask_of(attention_mask, _key_mask)  # one tensor for all layers
        out = self.run(plan, query, key, value, text_len=n_txt, text_first=False, key_mask=key_mask)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :-n_txt], hidden_states[:, -n_txt:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# -- official checkpoints (diffusion_attn.checkpoints) ------------------------------------------------------
# config: diffusers scripts/convert_hunyuan_video_to_diffusers.py TRANSFORMER_CONFIGS; size: HunyuanVideoPipeline's
# __call__ defaults 720 x 1280 x 129, VAE 8x spatial / 4x temporal; the GNA paper's / NATTEN docs' 30 x 48 x 80 grid
_HUNYUAN = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), image_condition_type=None,
)  # fmt: skip
_HUNYUAN_CHECKPOINTS = (
    dict(
        name="hunyuanvideo",
        repo="hunyuanvideo-community/HunyuanVideo",
        pipeline="HunyuanVideoPipeline",
        config=_HUNYUAN,
        config_source="diffusers scripts/convert_hunyuan_video_to_diffusers.py TRANSFORMER_CONFIGS"
        "['HYVideo-T/2-cfgdistill']",
        sizes={"default": (720, 1280, 129), "gna-paper": (768, 1280, 117), "2x": (720, 1280, 257)},
        size_source="HunyuanVideoPipeline.__call__ defaults 720 x 1280 x 129; GNA paper / NATTEN docs grid "
        "30 x 48 x 80 (768 x 1280 x 117)",
        text_len=256,
        notes="text (max_sequence_length 256) after the video, padded keys masked; "
        "guidance-distilled (guidance embedding)",
    ),
)


@register_adapter
class HunyuanVideoAdapter(Adapter):
    name = "hunyuan_video"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    latent = LatentRule(video=True, vae_t=4, vae_s=8, patch_t=1, patch=2)
    default_fps = 24
    official_defaults = {
        # Radial attention: HunyuanVideo 117f, scripts/hunyuan_t2v_inference.sh
        "radial": {"dense_layers": 0, "dense_steps": 12, "decay_factor": 0.95, "attention_sink": False},
        # UltraViCo: 129 frames -> 33 latent frames; official beta 0.6 on frame distances 50k +- 4
        "ultravico": {"train_frames": 33, "beta": 0.6, "harmonic_period": 50},
        # RIFLEx: intrinsic temporal frequency k (1-based), official value
        "riflex": {"k": 4},
    }
    processors = {"HunyuanVideoAttnProcessor2_0": HunyuanVideoSparseProcessor}
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    official_checkpoints = _HUNYUAN_CHECKPOINTS
    layer_keys = ("num_layers", "num_single_layers")  # dual- and single-stream blocks

    @classmethod
    def config_with_layers(cls, config, num_layers):
        """`num_layers` dual- and single-stream blocks, one token-refiner block."""
        return {**super().config_with_layers(config, num_layers), "num_refiner_layers": 1}

    @classmethod
    def tiny_inputs(cls, checkpoint, model, grid, *, batch, text_len, rnd):
        """Latents [B, C, F, H, W], the text with its attention mask, the pooled projection, guidance 6.0 (x 1000)."""
        c = model.config
        f, h, w = grid
        return dict(
            hidden_states=rnd(batch, c.in_channels, f, h * c.patch_size, w * c.patch_size),
            timestep=torch.full((batch,), 900.0),
            encoder_hidden_states=rnd(batch, text_len, c.text_embed_dim),
            encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.long),
            pooled_projections=rnd(batch, c.pooled_projection_dim),
            guidance=torch.full((batch,), 6000.0),
        )

    @classmethod
    def lora_inputs(cls, pipe, x, caption, text_len, device):
        """Latents x the VAE's scaling_factor; the text embeddings, pooled projection and attention mask."""
        vae = pipe.vae
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        emb, pooled, mask = pipe.encode_prompt(caption, device=device, max_sequence_length=text_len)
        return {
            "latents": z.float()[0], "encoder_hidden_states": emb[0], "pooled_projections": pooled[0],
            "encoder_attention_mask": mask[0],
        }  # fmt: skip

    @classmethod
    def lora_forward(cls, pipe, transformer, config, x, t, batch):
        """Guidance-distilled checkpoints get the pipeline's default guidance 6.0 (x 1000)."""
        guidance = torch.full((x.shape[0],), 6000.0, device=x.device) if config.guidance_embeds else None
        return transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=batch["encoder_hidden_states"],
            encoder_attention_mask=batch["encoder_attention_mask"], pooled_projections=batch["pooled_projections"],
            guidance=guidance, return_dict=False,
        )[0]  # fmt: skip

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        mods = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.transformer_blocks)]
        mods += [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.single_transformer_blocks)]
        return mods

    def grid(self, model, args, kwargs):
        _, _, f, h, w = hidden_states_arg(model, args, kwargs).shape
        p, pt = model.config.patch_size, model.config.patch_size_t
        return (f // pt, h // p, w // p)

    # -- the temporal RoPE (RIFLEx rewrites one of its frequencies) ---------------------------------
    #: "module": the RoPE is the output of the transformer's `rope` module (`HunyuanVideoRotaryPosEmbed`)
    rope_site = "module"

    @staticmethod
    def temporal_rope(model: nn.Module) -> tuple[int, float, torch.dtype]:
        """(temporal rotary dim, base theta, dtype diffusers computes the frequencies in)."""
        return int(model.rope.rope_dim[0]), float(model.rope.theta), torch.float32

    @staticmethod
    def rope_frames(rope: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, torch.Tensor | None]:
        """(token frames, tokens per frame, temporal positions or None: 0, 1, ...) of the rope module's input."""
        _, _, f, h, w = shape
        pt, p = rope.patch_size_t, rope.patch_size
        return f // pt, (h // p) * (w // p), None

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


# -- official checkpoints (diffusion_attn.checkpoints) ------------------------------------------------------
# configs: diffusers scripts/convert_wan_to_diffusers.py get_transformer_config(key) (every Wan2.1 / 2.2 model,
# Wan2.2's boundary_ratio and TI2V's expand_timesteps); sizes: WanPipeline.__call__ defaults 480 x 832 x 81, or
# the size the checkpoint was trained at (14B / 720P: 720 x 1280; TI2V-5B: 704 x 1280 x 121, its model card);
# VAE 8x spatial / 4x temporal (Wan2.2 TI2V-5B: 16x / 4x); text enters through the cross-attention (512 tokens)
_WAN_SRC = "diffusers scripts/convert_wan_to_diffusers.py get_transformer_config({!r})"
_WAN = dict(
    attention_head_dim=128, cross_attn_norm=True, eps=1e-6, freq_dim=256, out_channels=16, patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads", text_dim=4096, rope_max_seq_len=1024,
)  # fmt: skip
_WAN_13B = dict(_WAN, num_attention_heads=12, ffn_dim=8960, in_channels=16, num_layers=30, added_kv_proj_dim=None)
_WAN_14B = dict(_WAN, num_attention_heads=40, ffn_dim=13824, in_channels=16, num_layers=40, added_kv_proj_dim=None)
_WAN_I2V = dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
_P480 = {"default": (480, 832, 81), "720p": (720, 1280, 81)}
_P720 = {"default": (720, 1280, 81), "480p": (480, 832, 81)}
_WAN_PIPE = "WanPipeline.__call__ defaults 480 x 832 x 81"
_WAN_720 = "Wan2.1 14B / 720P checkpoints: 720 x 1280 x 81 (diffusers wan docs, max_area 720 * 1280)"


def _wan(name, repo, key, config, sizes, size_source, **kw) -> dict:
    """One Wan checkpoint's `Checkpoint` fields (image-to-video names load WanImageToVideoPipeline)."""
    pipe = "WanImageToVideoPipeline" if "i2v" in name else "WanPipeline"
    return dict(
        name=name, repo=repo, pipeline=pipe, config=config, config_source=_WAN_SRC.format(key), sizes=sizes,
        size_source=size_source, cross_len=512, **kw,
    )  # fmt: skip


_WAN_CHECKPOINTS = (
    _wan("wan2.1-t2v-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-T2V-1.3B", _WAN_13B, _P480, _WAN_PIPE),
    _wan("wan2.1-t2v-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-T2V-14B", _WAN_14B, _P720, _WAN_720),
    _wan(
        "wan2.1-i2v-14b-480p",
        "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        "Wan-I2V-14B-480p",
        _WAN_I2V,
        _P480,
        _WAN_PIPE,
        notes="image conditioning: 36 input channels and 257 CLIP image tokens in every attn2",
    ),
    _wan(
        "wan2.1-i2v-14b-720p",
        "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        "Wan-I2V-14B-720p",
        _WAN_I2V,
        _P720,
        _WAN_720,
        notes="image conditioning: 36 input channels and 257 CLIP image tokens in every attn2",
    ),
    _wan(
        "wan2.2-t2v-a14b",
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        "Wan2.2-T2V-A14B",
        _WAN_14B,
        _P720,
        _WAN_720,
        experts=2,
        pipeline_kwargs={"boundary_ratio": 0.875},
        notes="two experts (transformer, transformer_2), switched at boundary_ratio 0.875 of the timesteps",
    ),
    _wan(
        "wan2.2-i2v-a14b",
        "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        "Wan2.2-I2V-14B-720p",
        dict(_WAN_14B, in_channels=36),
        _P720,
        _WAN_720,
        experts=2,
        pipeline_kwargs={"boundary_ratio": 0.9},
        notes="two experts switched at boundary_ratio 0.9; image latents as 20 extra channels, no CLIP tokens",
    ),
    _wan(
        "wan2.2-ti2v-5b",
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "Wan2.2-TI2V-5B",
        dict(
            _WAN,
            num_attention_heads=24,
            ffn_dim=14336,
            in_channels=48,
            out_channels=48,
            num_layers=30,
            added_kv_proj_dim=None,
        ),
        {"default": (704, 1280, 121), "pipeline": (480, 832, 81)},
        "model card: 720P 1280 x 704 at 24 fps, 121 frames; WanPipeline defaults 480 x 832 x 81",
        vae_spatial=16,
        pipeline_kwargs={"expand_timesteps": True},
        notes="Wan2.2 VAE (z_dim 48, 16x spatial); per-token timesteps (expand_timesteps=True)",
    ),
)


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
    official_checkpoints = _WAN_CHECKPOINTS

    @classmethod
    def config_grid(cls, config, latent_frames, height, width, vae_spatial):
        """The (t, h, w) patch of `patch_size`."""
        pt, ph, pw = config["patch_size"]
        return (latent_frames // pt, height // vae_spatial // ph, width // vae_spatial // pw)

    @classmethod
    def tiny_inputs(cls, checkpoint, model, grid, *, batch, text_len, rnd):
        """Latents [B, C, F, H, W], UMT5 embeddings; Wan2.1 I2V's CLIP image tokens, Wan2.2 TI2V's per-token
        timesteps."""
        c = model.config
        f, h, w = grid
        pt, ph, pw = c.patch_size
        kw = dict(
            hidden_states=rnd(batch, c.in_channels, f * pt, h * ph, w * pw),
            encoder_hidden_states=rnd(batch, text_len, c.text_dim),
            timestep=torch.full((batch,), 900.0),
        )
        if c.image_dim is not None:  # Wan2.1 I2V: CLIP ViT-H/14 image tokens (257)
            kw["encoder_hidden_states_image"] = rnd(batch, 257, c.image_dim)
        if checkpoint.pipeline_kwargs.get("expand_timesteps"):  # Wan2.2 TI2V: per-token timesteps
            kw["timestep"] = torch.full((batch, f * h * w), 900.0)
        return kw

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

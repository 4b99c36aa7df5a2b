"""Tiny instances of every adapter's REAL diffusers class, with matching forward inputs.

Each builder returns (model, inputs) where `model(**inputs)` runs one transformer forward on a
small token grid (seeded weights, eval mode, fp32). `save_load` round-trips a model through
`save_pretrained` / `from_pretrained` (offline, temp dir).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def _seed(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tiny_wan(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1):
    from diffusers import WanTransformer3DModel

    _seed()
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        encoder_hidden_states=torch.randn(batch, 7, 24),
        timestep=torch.full((batch,), 900.0),
    )
    return model, inputs


def tiny_hunyuan_video(frames: int = 3, height: int = 8, width: int = 8, batch: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel

    _seed()
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ).eval()  # fmt: skip
    mask = torch.ones(batch, 9, dtype=torch.long)
    mask[:, 6:] = 0  # padded text tokens
    inputs = dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.full((batch,), 900.0),
        encoder_hidden_states=torch.randn(batch, 9, 24),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8),
        guidance=torch.full((batch,), 6000.0),
    )
    return model, inputs


def tiny_cogvideox(frames: int = 3, height: int = 8, width: int = 8, batch: int = 1):
    from diffusers import CogVideoXTransformer3DModel

    _seed()
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=24, num_layers=2, sample_width=width, sample_height=height, sample_frames=(frames - 1) * 4 + 1,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=True,
    ).eval()  # fmt: skip
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (height // 2, width // 2)), (height // 2, width // 2), frames)
    inputs = dict(
        hidden_states=torch.randn(batch, frames, 4, height, width),
        encoder_hidden_states=torch.randn(batch, 6, 24),
        timestep=torch.full((batch,), 900, dtype=torch.long),
        image_rotary_emb=(cos, sin),
    )
    return model, inputs


def tiny_ltx_video(frames: int = 3, height: int = 4, width: int = 6, batch: int = 1):
    from diffusers import LTXVideoTransformer3DModel

    _seed()
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=24,
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(batch, frames * height * width, 8),
        encoder_hidden_states=torch.randn(batch, 5, 24),
        timestep=torch.full((batch,), 900.0),
        encoder_attention_mask=torch.ones(batch, 5, dtype=torch.long),
        num_frames=frames,
        height=height,
        width=width,
    )
    return model, inputs


def tiny_flux(height: int = 6, width: int = 8, batch: int = 1):
    from diffusers import FluxTransformer2DModel

    _seed()
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    img_ids = torch.zeros(height * width, 3)
    img_ids[:, 1] = torch.arange(height).repeat_interleave(width)
    img_ids[:, 2] = torch.arange(width).repeat(height)
    inputs = dict(
        hidden_states=torch.randn(batch, height * width, 8),
        encoder_hidden_states=torch.randn(batch, 5, 24),
        pooled_projections=torch.randn(batch, 8),
        timestep=torch.full((batch,), 0.9),
        img_ids=img_ids,
        txt_ids=torch.zeros(5, 3),
    )
    return model, inputs


def tiny_sd3(height: int = 8, width: int = 12, batch: int = 1, dual: bool = True):
    from diffusers import SD3Transformer2DModel

    _seed()
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,) if dual else (), qk_norm="rms_norm",
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(batch, 4, height, width),
        encoder_hidden_states=torch.randn(batch, 5, 24),
        pooled_projections=torch.randn(batch, 8),
        timestep=torch.full((batch,), 900.0),
    )
    return model, inputs


BUILDERS: dict[str, Callable] = {
    "wan": tiny_wan,
    "hunyuan_video": tiny_hunyuan_video,
    "cogvideox": tiny_cogvideox,
    "ltx_video": tiny_ltx_video,
    "flux": tiny_flux,
    "sd3": tiny_sd3,
}
VIDEO_FAMILIES = ("wan", "hunyuan_video", "cogvideox", "ltx_video")


@torch.no_grad()
def run(model, inputs: dict) -> torch.Tensor:
    """One forward; returns the sample tensor."""
    out = model(**inputs, return_dict=False)
    return out[0]


def save_load(model, path: Path):
    """save_pretrained + from_pretrained (offline) of a tiny model."""
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


# -- tiny real pipelines (components from attn_pipelines.tiny: tokenizer, UMT5, Wan VAE) ----------------
def tiny_wan_pipeline(
    kind: str = "t2v",
    *,
    two_experts: bool = False,
    boundary_ratio: float | None = None,
    expand_timesteps: bool = False,
    scheduler=None,
):
    """A tiny `WanPipeline` ("t2v") or `WanImageToVideoPipeline` ("i2v"), optionally Wan2.2-style with
    `transformer_2` (a perturbed copy of `transformer`) switched in below `boundary_ratio`."""
    import copy

    from diffusers import WanImageToVideoPipeline, WanPipeline

    from attn_pipelines.tiny import build_tiny_pipeline

    c = build_tiny_pipeline("wan").components
    t2 = None
    if two_experts:
        t2 = copy.deepcopy(c["transformer"])
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in t2.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    kw = dict(
        tokenizer=c["tokenizer"],
        text_encoder=c["text_encoder"],
        vae=c["vae"],
        scheduler=scheduler if scheduler is not None else c["scheduler"],
        transformer=c["transformer"],
        transformer_2=t2,
        boundary_ratio=boundary_ratio,
        expand_timesteps=expand_timesteps,
    )
    pipe = (WanPipeline if kind == "t2v" else WanImageToVideoPipeline)(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipeline_inputs(pipe, steps: int = 4, **extra) -> dict:
    """Call arguments of a tiny Wan pipeline: 5 frames of 48 x 64 pixels (token grid 2 x 3 x 4), prompt
    embeddings given (the prompt cleaner needs ftfy), CFG on (two transformer calls per step), latents out."""
    g = torch.Generator().manual_seed(0)
    dim = pipe.text_encoder.config.d_model
    pe = torch.randn(1, 7, dim, generator=g)
    kw = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=-pe,
        num_inference_steps=steps,
        height=48,
        width=64,
        num_frames=5,
        guidance_scale=4.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    if type(pipe).__name__ == "WanImageToVideoPipeline":
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        kw["image"] = Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8"))
    kw.update(extra)
    return kw

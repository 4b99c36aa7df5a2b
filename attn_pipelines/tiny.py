"""Tiny pipelines built in code: the embedded default of `attnplug generate` and the test fixtures.

They are real diffusers/transformers classes (`WanPipeline`, `FluxPipeline`) with a few
thousand random parameters drawn from a fixed seed and tokenizers built with the `tokenizers`
library, so nothing is downloaded. They are UNTRAINED: their output is noise. They exist so the
whole path (tokenize, encode, denoise with hooked attention, decode, write a file) runs anywhere
in a few seconds, and so tests can `save_tiny_pipeline` to a directory and load it back with
`DiffusionPipeline.from_pretrained` exactly like a real checkpoint.

kinds: "wan" (text-to-video, `WanPipeline`) and "flux" (text-to-image, `FluxPipeline`).

The embedded default of `attnplug generate` for video is NOT the tiny Wan pipeline when the world's
trained text-to-video model is present (`world_t2v_dir()`: the repository's `assets/world/t2v`, installed
as package data `attn_pipelines.assets`, or `$ATTNPLUG_WORLD_DIR/t2v`): a `WanPipeline` trained on
procedural videos of coloured shapes (`attn_pipelines/world/`), whose output is recognisable. Images
(`--frames 1`, `--out x.png`) use the world's trained text-to-image model (`world.t2i.world_t2i_dir()`: a
`StableDiffusion3Pipeline` drawing shapes in named quadrants) when present, else the untrained tiny FLUX
pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .unigram import unigram_tokenizer
from .world.models import T2V_DIR, WorldAssetsMissing, world_dir

__all__ = ["TINY_KINDS", "TINY_DEFAULTS", "UNTRAINED_NOTICE", "build_tiny_pipeline", "save_tiny_pipeline"]
__all__ += ["WORLD_DEFAULTS", "WORLD_PROMPT", "WORLD_NOTICE", "NO_TRAINED_IMAGE_MODEL", "world_t2v_dir"]
__all__ += ["unigram_tokenizer"]  # re-exported from attn_pipelines.unigram

TINY_KINDS = ("wan", "flux")

#: generation defaults that fit the tiny pipelines (multiples of 16 px; Wan frames = 4k + 1).
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "wan": {"height": 64, "width": 64, "frames": 9, "steps": 4, "guidance_scale": 5.0, "dtype": "float32"},
    "flux": {"height": 64, "width": 64, "frames": 1, "steps": 4, "guidance_scale": 3.5, "dtype": "float32"},
}

UNTRAINED_NOTICE = (
    "note: no --model given, using the EMBEDDED DEFAULT: a tiny {kind} pipeline built in code with "
    "random (untrained) weights, so the output is noise. Pass --model <hub id or directory> for a real "
    "checkpoint (see `attnplug list` for presets)."
)

#: generation defaults of the world's trained text-to-video model (its training clip: 9 frames of 32 x 32 px)
WORLD_DEFAULTS: dict[str, Any] = {
    "height": 32, "width": 32, "frames": 9, "steps": 20, "guidance_scale": 5.0, "dtype": "float32", "fps": 8,
}  # fmt: skip
WORLD_PROMPT = "a red circle moving right"
WORLD_NOTICE = (
    "note: no --model given, using the EMBEDDED DEFAULT: attnplug's world text-to-video model ({path}), a "
    "WanPipeline trained here on procedural videos of coloured shapes. It draws one or two circles, squares or "
    "triangles (red, green, blue, yellow, purple, white) moving left, right, up or down on a dark background, "
    'e.g. --prompt "a blue square moving down"; trained for about 1.5 hours on 2 CPU cores, it gets colour and '
    "shape both right in 93% of the one-object prompts and the direction in 76% (downward motion rarely); "
    "two-object prompts seldom (docs/world.md). Pass --model <hub id or "
    "directory> for a real checkpoint (see `attnplug list` for presets)."
)
NO_TRAINED_IMAGE_MODEL = (
    "note: the world's trained text-to-image model (t2i/ beside the world's t2v/) is not installed, so image "
    "outputs use the untrained tiny FLUX pipeline; for a recognisable result ask for a video (--out x.gif or .mp4)"
)


def world_t2v_dir() -> Path | None:
    """The world's trained text-to-video pipeline folder when it is present (a diffusers directory), else None."""
    try:
        d = world_dir() / T2V_DIR
    except WorldAssetsMissing:
        return None
    return d if (d / "model_index.json").is_file() and (d / "transformer").is_dir() else None


def _build_wan() -> Any:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = unigram_tokenizer(512, bos=False)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer) + 4,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def _build_flux() -> Any:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = unigram_tokenizer(77, bos=True)
    tokenizer_2 = unigram_tokenizer(512, bos=False)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer) + 4,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            pad_token_id=0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=1,
            hidden_act="gelu",
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2) + 4,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_pipeline(kind: str = "wan", seed: int = 0) -> Any:
    """Build the tiny untrained pipeline `kind` ("wan" video or "flux" image), weights from `seed`.

    Every module is in eval mode, like `from_pretrained` leaves them (freshly built transformers
    models are in train mode: text-encoder dropout would make outputs differ run to run). The
    global torch RNG is left untouched (weights are drawn inside a forked RNG state).
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_wan() if kind == "wan" else _build_flux()
    for component in pipe.components.values():  # inference: no dropout (same seed -> same output)
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(desc=f"tiny {kind}")
    return pipe


def save_tiny_pipeline(path: str | Path, kind: str = "wan", seed: int = 0) -> Path:
    """Save the tiny pipeline `kind` to directory `path` (diffusers layout, loadable by `--model path`)."""
    path = Path(path)
    pipe = build_tiny_pipeline(kind, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return path

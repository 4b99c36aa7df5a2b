"""The synthetic world's models: real diffusers / transformers / timm classes at small sizes, and where they live.

Text-to-video (`WanPipeline`): a `WanTransformer3DModel` on the latents of a small
`AutoencoderKLWan` (2x spatial, 2x temporal compression: 9 frames of 32 x 32 px -> 5 x 16 x 16
latents -> a 5 x 8 x 8 token grid with the (1, 2, 2) patch), a small `UMT5EncoderModel` trained
jointly with the transformer, and a Unigram tokenizer over the world's vocabulary built with
`tokenizers`. The trained pipeline is a plain diffusers directory (`assets/world/t2v`), loaded by
`DiffusionPipeline.from_pretrained` like any checkpoint; `attnplug generate` with no `--model` uses it.

Classifiers (timm): `resnet10t` (the attribute classifier that scores generated frames;
CA / ECA are injected into it) and a small ViT (agent attention), trained with
`python -m vision_attn.finetune` on the world's 18-class colour x shape images and on
scikit-learn's digits; each folder holds `config.json` + `model.safetensors` (`va.load_finetuned`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ..unigram import unigram_tokenizer
from .data import VOCABULARY

__all__ = [
    "ASSETS_PACKAGE",
    "WORLD_DIR_ENV",
    "WorldAssetsMissing",
    "installed_world_dir",
    "T2V_DIR",
    "VIDEO",
    "VAE_CONFIG",
    "TRANSFORMER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "SCHEDULER_CONFIG",
    "CLASSIFIERS",
    "world_dir",
    "world_tokenizer",
    "build_vae",
    "build_transformer",
    "build_text_encoder",
    "build_scheduler",
    "build_pipeline",
    "load_world_pipeline",
]

#: the package the repository's `assets/` ships as (pyproject.toml); its `world/` holds the shipped checkpoints
ASSETS_PACKAGE = "attn_pipelines.assets"
#: a folder to use instead (trained elsewhere, or an install without the package data)
WORLD_DIR_ENV = "ATTNPLUG_WORLD_DIR"
T2V_DIR = "t2v"

#: the training clip: frames x size x size pixels, 16 fps is diffusers' Wan export default; the world uses 8
VIDEO = {"frames": 9, "size": 32, "fps": 8}

VAE_CONFIG: dict[str, Any] = {
    "base_dim": 16,
    "z_dim": 4,
    "dim_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [True],
    "scale_factor_temporal": 2,
    "scale_factor_spatial": 2,
    # latents_mean / latents_std are measured on the training set after the VAE is trained
}

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 384,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 64,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

SCHEDULER_CONFIG: dict[str, Any] = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 2.0}

#: the world's ViT (both datasets): patch 4 on 32 px -> 64 tokens, width 96, 6 blocks
VIT_KWARGS: dict[str, Any] = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}

#: vision checkpoints: folder -> (timm name, model kwargs, dataset, what it is)
CLASSIFIERS: dict[str, dict[str, Any]] = {
    "classifier": {"model": "resnet10t", "kwargs": {}, "data": "shapes", "role": "attribute classifier (CNN)"},
    "vit_shapes": {
        "model": "vit_tiny_patch16_224",
        "kwargs": VIT_KWARGS,
        "data": "shapes",
        "role": "ViT",
    },
    "cnn_digits": {"model": "resnet10t", "kwargs": {}, "data": "digits", "role": "CNN"},
    "vit_digits": {
        "model": "vit_tiny_patch16_224",
        "kwargs": VIT_KWARGS,
        "data": "digits",
        "role": "ViT",
    },
}


class WorldAssetsMissing(FileNotFoundError):
    """Neither `$ATTNPLUG_WORLD_DIR` nor the installed package data `attn_pipelines.assets/world` exists."""


def installed_world_dir() -> Path | None:
    """`world/` of the installed package data `attn_pipelines.assets` (a wheel, or an editable install whose
    finder maps it to the checkout's `assets/`), or None when this install has no such data."""
    try:
        spec = importlib.util.find_spec(ASSETS_PACKAGE)
    except ModuleNotFoundError:
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        d = Path(loc) / "world"
        if d.is_dir():
            return d
    return None


def world_dir() -> Path:
    """Folder of the world's checkpoints: `$ATTNPLUG_WORLD_DIR` when set, else the installed package data
    (`installed_world_dir`); `WorldAssetsMissing` says how to get them when neither is there."""
    env = os.environ.get(WORLD_DIR_ENV)
    if env:
        return Path(env).expanduser()
    found = installed_world_dir()
    if found is None:
        raise WorldAssetsMissing(
            f"the world's trained checkpoints are not installed ({ASSETS_PACKAGE}/world, the repository's "
            "assets/world shipped as package data, was not found): reinstall attnplug (`pip install attnplug`, or "
            f"`pip install -e .` in a checkout) or set {WORLD_DIR_ENV} to a folder holding t2v/ and classifier/"
        )
    return found


def world_tokenizer() -> Any:
    """The world's tokenizer (a `PreTrainedTokenizerFast` over `tokenizers`' Unigram, T5-style ids, 512 tokens)."""
    return unigram_tokenizer(512, bos=False, words=VOCABULARY)


def build_vae(latents_mean: list[float] | None = None, latents_std: list[float] | None = None) -> Any:
    """A fresh `AutoencoderKLWan` of the world's size (per-channel latent statistics when known)."""
    from diffusers import AutoencoderKLWan

    z = VAE_CONFIG["z_dim"]
    return AutoencoderKLWan(
        **VAE_CONFIG, latents_mean=list(latents_mean or [0.0] * z), latents_std=list(latents_std or [1.0] * z)
    )


def build_transformer() -> Any:
    """A fresh `WanTransformer3DModel` of the world's size."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def build_text_encoder(vocab_size: int) -> Any:
    """A fresh `UMT5EncoderModel` of the world's size for a tokenizer of `vocab_size` ids."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG))


def build_scheduler() -> Any:
    """UniPC on flow sigmas, as Wan2.1 ships it (`flow_shift` smaller for the small latent grid)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**SCHEDULER_CONFIG)


def build_pipeline(vae: Any, transformer: Any, text_encoder: Any, tokenizer: Any) -> Any:
    """A `WanPipeline` of the given components, every module in eval mode."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=build_scheduler()
    )
    for c in pipe.components.values():
        if hasattr(c, "eval"):
            c.eval()
    return pipe


def load_world_pipeline(folder: str | Path | None = None) -> Any:
    """The trained world text-to-video `WanPipeline` (float32, eval mode, progress bar off): `folder`, else the
    shipped one (`world_dir() / T2V_DIR`)."""
    from diffusers import DiffusionPipeline

    folder = Path(folder) if folder else world_dir() / T2V_DIR
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe

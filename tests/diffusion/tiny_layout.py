"""Tiny REAL diffusers pipelines for the layout-control and AgentSD tests (built in code, nothing
downloaded, untrained): Stable Diffusion 1.x / XL UNets and pipelines, and an SD3 pipeline, with CLIP /
T5 text encoders and tokenizers built with `tokenizers` (attn_pipelines.tiny's vocabulary)."""

from __future__ import annotations

import torch

from attn_pipelines.tiny import unigram_tokenizer

PROMPT = "a red fox and a blue car in the snow"


def _eval(pipe):
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(tok, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, pad_token_id=0,
        bos_token_id=tok.bos_token_id, eos_token_id=1, hidden_act="gelu",
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, **extra,
    )  # fmt: skip


def tiny_unet(kind: str = "sd15", cross_dim: int = 32):
    """UNet2DConditionModel: "sd15" (attention at the full latent resolution, 2x and the mid block) or
    "sdxl" (no attention at full resolution, SDXL's added text/time conditioning)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if kind == "sd15":
        return UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8,
        ).eval()  # fmt: skip
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=(4, 4, 8), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=(1, 2, 2),
    ).eval()  # fmt: skip


def unet_inputs(unet, batch: int = 1, size: int = 16, text: int = 7):
    g = torch.Generator().manual_seed(1)
    kw = dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor(700),
        encoder_hidden_states=torch.randn(batch, text, unet.config.cross_attention_dim, generator=g),
    )
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(batch, 1),
        }
    return kw


def tiny_sd_pipeline(scheduler: str = "ddim"):
    """StableDiffusionPipeline: CLIP text encoder (hidden 32), the "sd15" UNet, a 4-level VAE (8x)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = unigram_tokenizer(77, bos=True)
        text_encoder = _clip(tok, 32)
        vae = _vae()
        unet = tiny_unet("sd15", 32)
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **betas)
    else:
        sched = EulerDiscreteScheduler(**betas)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip
    return _eval(pipe)


def tiny_sdxl_pipeline():
    """StableDiffusionXLPipeline: two CLIP encoders (hidden 32 each, the second with projection), "sdxl" UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = unigram_tokenizer(77, bos=True)
        te1, te2 = _clip(tok, 32), _clip(tok, 32, projection=True)
        vae = _vae()
        unet = tiny_unet("sdxl", 64)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=unigram_tokenizer(77, bos=True),
        unet=unet, scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    return _eval(pipe)


def tiny_sd3_pipeline():
    """StableDiffusion3Pipeline: two CLIP encoders with projection (hidden 16), a T5 (d_model 32), an SD3
    transformer (patch 2, joint_attention_dim 32) and a 4-level VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = unigram_tokenizer(77, bos=True)
        te1, te2 = _clip(tok, 16, projection=True), _clip(tok, 16, projection=True)
        tok3 = unigram_tokenizer(256, bos=False)
        te3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tok3) + 4, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )
        )  # fmt: skip
        vae = _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=32, qk_norm="rms_norm",
        )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te1,
        tokenizer=tok, text_encoder_2=te2, tokenizer_2=unigram_tokenizer(77, bos=True), text_encoder_3=te3,
        tokenizer_3=tok3,
    )  # fmt: skip
    return _eval(pipe)

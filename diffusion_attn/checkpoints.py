"""The official checkpoints users load, as facts: transformer / UNet configs, sizes, token grids.

One `Checkpoint` per hub checkpoint (no weights). Each names where its values come from:

* transformer / UNet configs: the hub repo's `transformer/config.json` (or `unet/config.json`), as
  written by diffusers' conversion scripts (`scripts/convert_wan_to_diffusers.py`
  `get_transformer_config`, `convert_hunyuan_video_to_diffusers.py` `TRANSFORMER_CONFIGS`,
  `convert_cogvideox_to_diffusers.py` `get_transformer_init_kwargs` and its `--num_layers` /
  `--num_attention_heads` help, `convert_ltx_to_diffusers.py` `get_transformer_config`,
  `convert_sd3_to_diffusers.py` (heads = layers, head dim 64, pos-embed size and dual-attention layers
  read from the checkpoint)) and, where no script holds the numbers (FLUX, SD 3 / 3.5, SD 1.5 / XL),
  the published `config.json` of the hub repo;
* sizes: the pipeline's `__call__` defaults (`WanPipeline` 480 x 832 x 81, `HunyuanVideoPipeline`
  720 x 1280 x 129, `CogVideoXPipeline` from the transformer's `sample_*`, `LTXPipeline` 512 x 704 x 161,
  `FluxPipeline` / `StableDiffusion3Pipeline` `default_sample_size` 128 x VAE 8 = 1024, SD 1.5 64 x 8 = 512,
  SDXL 128 x 8 = 1024) or, where the checkpoint was trained at another size, the size its docs / model
  card give (Wan 14B and I2V-720P 720 x 1280, Wan2.2 TI2V-5B 704 x 1280 x 121, CogVideoX1.5
  768 x 1360 x 81);
* token grids: what the pipeline's latents and the transformer's patchify give (VAE factors: Wan2.1,
  HunyuanVideo, CogVideoX 8 spatial / 4 temporal; Wan2.2 TI2V-5B 16 / 4; LTX-Video 32 / 8; FLUX, SD3,
  SD 1.5 / XL 8). `Checkpoint.grid` / `tokens` compute them; `layout` gives attnplug's `TokenLayout`.

`Checkpoint.build(num_layers=1)` builds the REAL diffusers class with the real config except the layer
count (seeded random weights: the real per-layer shapes, widths and heads), and `tiny_inputs` the
forward arguments of that class at a small token grid, for tests on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .variants.base import TokenLayout

__all__ = ["Checkpoint", "CHECKPOINTS", "get_checkpoint"]

_WAN_SRC = "diffusers scripts/convert_wan_to_diffusers.py get_transformer_config({!r})"
_WAN = dict(
    attention_head_dim=128, cross_attn_norm=True, eps=1e-6, freq_dim=256, out_channels=16, patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads", text_dim=4096, rope_max_seq_len=1024,
)  # fmt: skip
_WAN_13B = dict(_WAN, num_attention_heads=12, ffn_dim=8960, in_channels=16, num_layers=30, added_kv_proj_dim=None)
_WAN_14B = dict(_WAN, num_attention_heads=40, ffn_dim=13824, in_channels=16, num_layers=40, added_kv_proj_dim=None)
_WAN_I2V = dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
_HUNYUAN = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), image_condition_type=None,
)  # fmt: skip
_COG = dict(
    attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
    max_text_seq_length=226, temporal_compression_ratio=4, patch_size=2, use_learned_positional_embeddings=False,
)  # fmt: skip
_COG_10 = dict(_COG, patch_size_t=None, patch_bias=True, sample_height=60, sample_width=90, sample_frames=49)
_LTX = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
    activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6,
    caption_channels=4096, attention_bias=True, attention_out_bias=True,
)  # fmt: skip
_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
_SD3 = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, joint_attention_dim=4096,
    pooled_projection_dim=2048,
)  # fmt: skip
_UNET15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)  # fmt: skip
_UNETXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip

#: adapter family -> diffusers model class
MODEL_CLASSES = {
    "wan": "WanTransformer3DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel",
    "ltx_video": "LTXVideoTransformer3DModel",
    "flux": "FluxTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "unet": "UNet2DConditionModel",
}
#: (spatial, temporal) VAE compression per family (Wan2.2 TI2V-5B overrides: 16)
_VAE = {"wan": (8, 4), "hunyuan_video": (8, 4), "cogvideox": (8, 4), "ltx_video": (32, 8)}
_TEXT_FIRST = {"cogvideox": True, "flux": True}


@dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint: where it is, its transformer / UNet config and the size users generate at.

    text_len: text tokens inside the joint self-attention (the pipeline's max_sequence_length; 0 where
    text enters through cross-attention: Wan, LTX-Video, UNets); cross_len: keys of the text
    cross-attention (0 for joint-attention models). sizes: name -> (height, width, frames) in pixels
    ("default" first); extra_tokens: visual tokens appended to the sequence besides the generated
    image's (FLUX Kontext's reference image).
    """

    name: str
    repo: str
    family: str
    pipeline: str
    config: dict
    config_source: str
    sizes: dict
    size_source: str
    text_len: int = 0
    cross_len: int = 0
    vae_spatial: int = 8
    vae_temporal: int = 4
    experts: int = 1
    pipeline_kwargs: dict = field(default_factory=dict)
    extra_tokens: int = 0
    notes: str = ""

    # -- facts derived from the config ------------------------------------------------------------------
    @property
    def model_class(self) -> str:
        return MODEL_CLASSES[self.family]

    @property
    def video(self) -> bool:
        return self.family in _VAE

    def _unet_top(self) -> tuple[int, int]:
        """(channels, heads) of the UNet's highest-resolution attention level."""
        c = self.config
        i = next(i for i, t in enumerate(c["down_block_types"]) if t.startswith("CrossAttn"))
        dims = c["attention_head_dim"]  # diffusers' UNet name for the head COUNT
        heads = dims[i] if isinstance(dims, (tuple, list)) else dims
        return int(c["block_out_channels"][i]), int(heads)

    @property
    def heads(self) -> int:
        """Attention heads of a self-attention call (UNets: at the highest-resolution attention level)."""
        if self.family == "unet":
            return self._unet_top()[1]
        return int(self.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        if self.family == "unet":
            ch, heads = self._unet_top()
            return ch // heads
        return int(self.config["attention_head_dim"])

    @property
    def width(self) -> int:
        """Attention width, heads x head dim (UNets: the highest-resolution attention level)."""
        return self.heads * self.head_dim

    @property
    def num_layers(self) -> int:
        """Hooked self-attention layers of the full model (SD3.5 medium counts its dual attn2 layers)."""
        c = self.config
        if self.family in ("hunyuan_video", "flux"):
            return int(c["num_layers"]) + int(c["num_single_layers"])
        if self.family == "sd3":
            return int(c["num_layers"]) + len(c.get("dual_attention_layers", ()))
        if self.family == "unet":
            types, lpb = c["down_block_types"], int(c["layers_per_block"])
            tl = c.get("transformer_layers_per_block", 1)
            tl = tuple(tl) if isinstance(tl, (tuple, list)) else (tl,) * len(types)
            n = tl[-1]  # mid block
            for i, t in enumerate(types):
                if t.startswith("CrossAttn"):
                    n += lpb * tl[i] + (lpb + 1) * tl[i]  # down level and its mirrored up level
            return n
        return int(c["num_layers"])

    # -- sizes and tokens -------------------------------------------------------------------------------
    def size(self, name: str = "default") -> tuple[int, int, int]:
        if name not in self.sizes:
            raise ValueError(f"{self.name}: size {name!r} is not one of {', '.join(self.sizes)}")
        return tuple(self.sizes[name])  # type: ignore[return-value]

    def latent_frames(self, frames: int) -> int:
        """Latent frames of `frames` video frames (CogVideoX1.5's pipeline pads them to patch_size_t)."""
        if not self.video:
            return 1
        lf = (frames - 1) // self.vae_temporal + 1
        pt = self.config.get("patch_size_t") if self.family == "cogvideox" else None
        if pt:
            lf = -(-lf // pt) * pt
        return lf

    def grid(self, name: str = "default", *, height: int | None = None, width: int | None = None,
             frames: int | None = None) -> tuple[int, int, int]:  # fmt: skip
        """(frames, height, width) of visual tokens after the VAE and the patchify (UNets: the input latent)."""
        h0, w0, f0 = self.size(name)
        h, w, f = height or h0, width or w0, frames or f0
        s = self.vae_spatial
        c = self.config
        if self.family == "wan":
            pt, ph, pw = c["patch_size"]
            return (self.latent_frames(f) // pt, h // s // ph, w // s // pw)
        if self.family == "hunyuan_video":
            return (self.latent_frames(f) // c["patch_size_t"], h // s // c["patch_size"], w // s // c["patch_size"])
        if self.family == "cogvideox":
            pt = c.get("patch_size_t") or 1
            return (self.latent_frames(f) // pt, h // s // c["patch_size"], w // s // c["patch_size"])
        if self.family == "ltx_video":
            return (self.latent_frames(f), h // s, w // s)
        if self.family == "flux":  # latents rounded down to a multiple of 2, then packed 2 x 2
            return (1, (h // s) // 2, (w // s) // 2)
        if self.family == "sd3":
            return (1, h // s // c["patch_size"], w // s // c["patch_size"])
        return (1, h // s, w // s)  # UNet: the latent; attention levels at 1/1, 1/2, 1/4 ... of it

    def tokens(self, name: str = "default") -> int:
        """Visual tokens of one self-attention call (UNets: the highest-resolution attention level)."""
        f, h, w = self.grid(name)
        if self.family == "unet":
            ds = self.unet_levels()[0]
            return -(-h // ds) * -(-w // ds)
        return f * h * w

    def seq_len(self, name: str = "default") -> int:
        """Tokens of the joint sequence (visual + text + extra reference tokens)."""
        return self.tokens(name) + self.text_len + self.extra_tokens

    def unet_levels(self) -> list[int]:
        """Downsampling factors of the UNet levels that have attention (down path order)."""
        out, ds = [], 1
        for t in self.config["down_block_types"]:
            if t.startswith("CrossAttn"):
                out.append(ds)
            ds *= 2
        return out

    def layout(self, name: str = "default", *, frames: int | None = None) -> TokenLayout:
        """attnplug's TokenLayout of one self / joint attention call at size `name`."""
        grid = self.grid(name, frames=frames)
        if self.family == "unet":
            ds = self.unet_levels()[0]
            grid = (1, -(-grid[1] // ds), -(-grid[2] // ds))
        return TokenLayout(
            grid=grid, text_len=self.text_len, text_first=_TEXT_FIRST.get(self.family, False), family=self.family
        )

    # -- real classes at small sizes --------------------------------------------------------------------
    def model_config(self, num_layers: int = 1) -> dict:
        """The real config with `num_layers` blocks of each kind (UNets: one resnet / transformer per level)."""
        c = dict(self.config)
        if self.family in ("hunyuan_video", "flux"):
            c.update(num_layers=num_layers, num_single_layers=num_layers)
            if self.family == "hunyuan_video":
                c["num_refiner_layers"] = 1
        elif self.family == "sd3":
            c["num_layers"] = max(num_layers, 2) if c.get("dual_attention_layers") else num_layers
            c["dual_attention_layers"] = tuple(i for i in c.get("dual_attention_layers", ()) if i < c["num_layers"] - 1)
        elif self.family == "unet":
            c["layers_per_block"] = 1
            if "transformer_layers_per_block" in c:
                c["transformer_layers_per_block"] = 1
        else:
            c["num_layers"] = num_layers
        return c

    def build(self, num_layers: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
        """The real diffusers class with this config and `num_layers` layers (seeded random weights, eval)."""
        import diffusers

        torch.manual_seed(seed)
        cls = getattr(diffusers, self.model_class)
        model = cls(**self.model_config(num_layers)).eval()
        return model if dtype == torch.float32 else model.to(dtype)

    def tiny_inputs(
        self,
        model: torch.nn.Module,
        grid: tuple[int, int, int] = (2, 2, 3),
        *,
        batch: int = 1,
        text_len: int = 7,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Forward arguments of `model` (this checkpoint's class) for a `grid` of visual tokens.

        Shapes follow the pipeline (latent channels, text / pooled / image-embedding widths from the
        config). CogVideoX-2b's sincos position table covers exactly `max_text_seq_length` text
        tokens, so it always gets 226."""
        g = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype
        c = model.config
        f, h, w = grid

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(dtype)

        t = torch.full((batch,), 900.0)
        if self.family == "wan":
            pt, ph, pw = c.patch_size
            kw: dict[str, Any] = dict(
                hidden_states=rnd(batch, c.in_channels, f * pt, h * ph, w * pw),
                encoder_hidden_states=rnd(batch, text_len, c.text_dim),
                timestep=t,
            )
            if c.image_dim is not None:  # Wan2.1 I2V: CLIP ViT-H/14 image tokens (257)
                kw["encoder_hidden_states_image"] = rnd(batch, 257, c.image_dim)
            if self.pipeline_kwargs.get("expand_timesteps"):  # Wan2.2 TI2V: per-token timesteps
                kw["timestep"] = torch.full((batch, f * h * w), 900.0)
            return kw
        if self.family == "hunyuan_video":
            mask = torch.ones(batch, text_len, dtype=torch.long)
            return dict(
                hidden_states=rnd(batch, c.in_channels, f, h * c.patch_size, w * c.patch_size),
                timestep=t,
                encoder_hidden_states=rnd(batch, text_len, c.text_embed_dim),
                encoder_attention_mask=mask,
                pooled_projections=rnd(batch, c.pooled_projection_dim),
                guidance=torch.full((batch,), 6000.0),
            )
        if self.family == "cogvideox":
            pt = c.patch_size_t or 1
            n_txt = c.max_text_seq_length if not c.use_rotary_positional_embeddings else text_len
            kw = dict(
                hidden_states=rnd(batch, f * pt, c.in_channels, h * c.patch_size, w * c.patch_size),
                encoder_hidden_states=rnd(batch, n_txt, c.text_embed_dim),
                timestep=torch.full((batch,), 900, dtype=torch.long),
            )
            if c.use_rotary_positional_embeddings:
                kw["image_rotary_emb"] = _cogvideox_rope(c, h * c.patch_size * 8, w * c.patch_size * 8, f * pt)
            if c.ofs_embed_dim is not None:
                kw["ofs"] = torch.full((batch,), 2.0)
            return kw
        if self.family == "ltx_video":
            return dict(
                hidden_states=rnd(batch, f * h * w, c.in_channels),
                encoder_hidden_states=rnd(batch, text_len, c.caption_channels),
                timestep=t,
                encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.long),
                num_frames=f,
                height=h,
                width=w,
            )
        if self.family == "flux":
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
        if self.family == "sd3":
            return dict(
                hidden_states=rnd(batch, c.in_channels, h * c.patch_size, w * c.patch_size),
                encoder_hidden_states=rnd(batch, text_len, c.joint_attention_dim),
                pooled_projections=rnd(batch, c.pooled_projection_dim),
                timestep=t,
            )
        kw = dict(sample=rnd(batch, c.in_channels, h, w), timestep=t, encoder_hidden_states=rnd(batch, 77,
                  c.cross_attention_dim))  # fmt: skip
        if c.addition_embed_type == "text_time":  # SDXL micro-conditioning: pooled text + 6 size / crop ids
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
            kw["added_cond_kwargs"] = {"text_embeds": rnd(batch, pooled), "time_ids": ids.to(dtype)}
        return kw

    def summary(self, name: str = "default") -> dict[str, Any]:
        """The table row: config highlights, size, grid and token counts (JSON-ready)."""
        h, w, f = self.size(name)
        return {
            "name": self.name,
            "repo": self.repo,
            "family": self.family,
            "class": self.model_class,
            "pipeline": self.pipeline,
            "layers": self.num_layers,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "width": self.width,
            "size": name,
            "height": h,
            "width_px": w,
            "frames": f,
            "grid": list(self.grid(name)),
            "visual_tokens": self.tokens(name),
            "text_tokens": self.text_len,
            "extra_tokens": self.extra_tokens,
            "seq_len": self.seq_len(name),
            "config_source": self.config_source,
            "size_source": self.size_source,
        }


def _cogvideox_rope(config: Any, height: int, width: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding `CogVideoXPipeline._prepare_rotary_positional_embeddings` passes (pixels in,
    `frames` latent frames before the temporal patchify)."""
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    fake = SimpleNamespace(transformer=SimpleNamespace(config=config), vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, height, width, frames, torch.device("cpu"))


def _wan(name, repo, key, config, sizes, size_source, **kw) -> Checkpoint:
    pipe = "WanImageToVideoPipeline" if "i2v" in name else "WanPipeline"
    return Checkpoint(
        name=name, repo=repo, family="wan", pipeline=pipe, config=config, config_source=_WAN_SRC.format(key),
        sizes=sizes, size_source=size_source, cross_len=512, **kw,
    )  # fmt: skip


_P480 = {"default": (480, 832, 81), "720p": (720, 1280, 81)}
_P720 = {"default": (720, 1280, 81), "480p": (480, 832, 81)}
_WAN_PIPE = "WanPipeline.__call__ defaults 480 x 832 x 81"
_WAN_720 = "Wan2.1 14B / 720P checkpoints: 720 x 1280 x 81 (diffusers wan docs, max_area 720 * 1280)"

CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
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
        Checkpoint(
            name="hunyuanvideo",
            repo="hunyuanvideo-community/HunyuanVideo",
            family="hunyuan_video",
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
        Checkpoint(
            name="cogvideox-2b",
            repo="THUDM/CogVideoX-2b",
            family="cogvideox",
            pipeline="CogVideoXPipeline",
            config=dict(_COG_10, num_layers=30, num_attention_heads=30, use_rotary_positional_embeddings=False),
            config_source="diffusers scripts/convert_cogvideox_to_diffusers.py --version 1.0 (2B: 30 layers, "
            "30 heads, no RoPE)",
            sizes={"default": (480, 720, 49), "81f": (480, 720, 81)},
            size_source="CogVideoXPipeline: sample_height/width x 8 = 480 x 720, sample_frames 49",
            text_len=226,
            notes="sincos position table for exactly 226 text tokens",
        ),
        Checkpoint(
            name="cogvideox-5b",
            repo="THUDM/CogVideoX-5b",
            family="cogvideox",
            pipeline="CogVideoXPipeline",
            config=dict(_COG_10, num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True),
            config_source="diffusers scripts/convert_cogvideox_to_diffusers.py --version 1.0 (5B: 42 layers, "
            "48 heads, RoPE)",
            sizes={"default": (480, 720, 49), "81f": (480, 720, 81)},
            size_source="CogVideoXPipeline: sample_height/width x 8 = 480 x 720, sample_frames 49",
            text_len=226,
        ),
        Checkpoint(
            name="cogvideox1.5-5b",
            repo="THUDM/CogVideoX1.5-5B",
            family="cogvideox",
            pipeline="CogVideoXPipeline",
            config=dict(
                _COG,
                num_layers=42,
                num_attention_heads=48,
                use_rotary_positional_embeddings=True,
                patch_size_t=2,
                patch_bias=False,
                sample_height=300,
                sample_width=300,
                sample_frames=81,
            ),
            config_source="diffusers scripts/convert_cogvideox_to_diffusers.py --version 1.5 (patch_size_t 2)",
            sizes={"default": (768, 1360, 81), "161f": (768, 1360, 161)},
            size_source="diffusers cogvideox docs: T2V best at 1360 x 768, 81 or 161 frames (the pipeline's own "
            "default, sample 300 x 8, is 2400 x 2400)",
            text_len=226,
            notes="latent frames padded to a multiple of patch_size_t=2 by the pipeline",
        ),
        Checkpoint(
            name="ltx-video-0.9.x-2b",
            repo="Lightricks/LTX-Video",
            family="ltx_video",
            pipeline="LTXPipeline",
            config=dict(_LTX, attention_head_dim=64, cross_attention_dim=2048, num_layers=28),
            config_source="diffusers scripts/convert_ltx_to_diffusers.py get_transformer_config (0.9.0 / 0.9.1 / "
            "0.9.5: the 2B transformer)",
            sizes={"default": (512, 704, 161), "768x512x121": (512, 768, 121)},
            size_source="LTXPipeline.__call__ defaults 512 x 704 x 161",
            cross_len=128,
            vae_spatial=32,
            vae_temporal=8,
            notes="0.9.1 / 0.9.5 differ in the VAE (timestep-aware decoder), not the transformer",
        ),
        Checkpoint(
            name="ltx-video-0.9.7-13b",
            repo="Lightricks/LTX-Video-0.9.7-dev",
            family="ltx_video",
            pipeline="LTXConditionPipeline",
            config=dict(_LTX, attention_head_dim=128, cross_attention_dim=4096, num_layers=48),
            config_source="diffusers scripts/convert_ltx_to_diffusers.py get_transformer_config('0.9.7')",
            sizes={"default": (512, 704, 161)},
            size_source="LTXConditionPipeline.__call__ defaults 512 x 704 x 161",
            cross_len=256,
            vae_spatial=32,
            vae_temporal=8,
        ),
        Checkpoint(
            name="flux.1-dev",
            repo="black-forest-labs/FLUX.1-dev",
            family="flux",
            pipeline="FluxPipeline",
            config=_FLUX,
            config_source="hub transformer/config.json (= FluxTransformer2DModel defaults, guidance_embeds true)",
            sizes={"default": (1024, 1024, 1), "2048": (2048, 2048, 1), "4096": (4096, 4096, 1)},
            size_source="FluxPipeline default_sample_size 128 x 8 = 1024; 2048 / 4096 for high resolution (GNA "
            "paper: 256 x 256 tokens)",
            text_len=512,
            notes="guidance-distilled: no CFG, guidance as an embedding",
        ),
        Checkpoint(
            name="flux.1-schnell",
            repo="black-forest-labs/FLUX.1-schnell",
            family="flux",
            pipeline="FluxPipeline",
            config=dict(_FLUX, guidance_embeds=False),
            config_source="hub transformer/config.json (guidance_embeds false: timestep-distilled)",
            sizes={"default": (1024, 1024, 1)},
            size_source="FluxPipeline default 1024; max_sequence_length 256",
            text_len=256,
        ),
        Checkpoint(
            name="flux.1-fill-dev",
            repo="black-forest-labs/FLUX.1-Fill-dev",
            family="flux",
            pipeline="FluxFillPipeline",
            config=dict(_FLUX, in_channels=384, out_channels=64),
            config_source="hub transformer/config.json (in_channels 384 = 64 latent + 64 masked image + 256 mask)",
            sizes={"default": (1024, 1024, 1)},
            size_source="FluxFillPipeline default 1024 (guidance 30)",
            text_len=512,
        ),
        Checkpoint(
            name="flux.1-kontext-dev",
            repo="black-forest-labs/FLUX.1-Kontext-dev",
            family="flux",
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
        Checkpoint(
            name="sd3-medium",
            repo="stabilityai/stable-diffusion-3-medium-diffusers",
            family="sd3",
            pipeline="StableDiffusion3Pipeline",
            config=dict(
                _SD3,
                num_layers=24,
                num_attention_heads=24,
                caption_projection_dim=1536,
                pos_embed_max_size=192,
                qk_norm=None,
                dual_attention_layers=(),
            ),
            config_source="hub transformer/config.json (scripts/convert_sd3_to_diffusers.py: heads = layers)",
            sizes={"default": (1024, 1024, 1)},
            size_source="StableDiffusion3Pipeline default_sample_size 128 x 8",
            text_len=333,
            notes="text = 77 CLIP + 256 T5 tokens, after the image",
        ),
        Checkpoint(
            name="sd3.5-medium",
            repo="stabilityai/stable-diffusion-3.5-medium",
            family="sd3",
            pipeline="StableDiffusion3Pipeline",
            config=dict(
                _SD3,
                num_layers=24,
                num_attention_heads=24,
                caption_projection_dim=1536,
                pos_embed_max_size=384,
                qk_norm="rms_norm",
                dual_attention_layers=tuple(range(13)),
            ),
            config_source="hub transformer/config.json (MMDiT-X: dual attention in blocks 0-12, qk rms_norm)",
            sizes={"default": (1024, 1024, 1), "1440": (1440, 1440, 1)},
            size_source="StableDiffusion3Pipeline default 1024 (pos_embed_max_size 384 allows up to 1536)",
            text_len=333,
            notes="blocks 0-12 add an image-only self-attention attn2 (dual attention)",
        ),
        Checkpoint(
            name="sd3.5-large",
            repo="stabilityai/stable-diffusion-3.5-large",
            family="sd3",
            pipeline="StableDiffusion3Pipeline",
            config=dict(
                _SD3,
                num_layers=38,
                num_attention_heads=38,
                caption_projection_dim=2432,
                pos_embed_max_size=192,
                qk_norm="rms_norm",
                dual_attention_layers=(),
            ),
            config_source="hub transformer/config.json",
            sizes={"default": (1024, 1024, 1)},
            size_source="StableDiffusion3Pipeline default 1024",
            text_len=333,
        ),
        Checkpoint(
            name="sd1.5",
            repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
            family="unet",
            pipeline="StableDiffusionPipeline",
            config=_UNET15,
            config_source="hub unet/config.json",
            sizes={"default": (512, 512, 1)},
            size_source="StableDiffusionPipeline: sample_size 64 x 8 = 512",
            cross_len=77,
            notes="8 heads of 40..160 dims per level (attention_head_dim 8 = heads)",
        ),
        Checkpoint(
            name="sdxl-base-1.0",
            repo="stabilityai/stable-diffusion-xl-base-1.0",
            family="unet",
            pipeline="StableDiffusionXLPipeline",
            config=_UNETXL,
            config_source="hub unet/config.json",
            sizes={"default": (1024, 1024, 1)},
            size_source="StableDiffusionXLPipeline: sample_size 128 x 8 = 1024",
            cross_len=77,
            notes="micro-conditioning: text_time embedding (pooled 1280 + 6 size / crop ids x 256)",
        ),
    )
}


def get_checkpoint(name: str) -> Checkpoint:
    """The table entry `name`, or a ValueError listing the known names."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[name]


def _check_table() -> None:
    """Guard against typos in the table: every entry's size gives a whole token grid."""
    for c in CHECKPOINTS.values():
        for s in c.sizes:
            assert all(g >= 1 for g in c.grid(s)), (c.name, s)
            assert math.prod(c.grid(s)) >= 1


_check_table()

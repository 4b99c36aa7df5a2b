"""Stable Diffusion 1.x / 2.x / XL UNets (`UNet2DConditionModel`): the self-attention `attn1` and, for
variants that ask for it (`Variant.cross_attention`: Boundary), the text cross-attention `attn2` of
every `BasicTransformerBlock`, in execution order (down blocks, mid block, up blocks).

Tokens: each attention call sees the feature map of its UNet level, `height x width` tokens
(row-major, no text in self-attention). The level's downsampling relative to the latent input is
read from the block structure when `apply` runs (a down block's attentions run at the current
factor, its downsampler doubles it; up blocks halve it after their upsampler) and the call's grid is
`ceil(H / ds) x ceil(W / ds)` of the latent `H x W` (diffusers' stride-2 convolutions round up);
`TokenLayout.downsample` carries `ds`. Forward signature: (sample, timestep, encoder_hidden_states, ...).

The processors reproduce `AttnProcessor2_0` exactly (anything else, e.g. IP-Adapter or a custom
processor, is refused before patching); calls with an attention mask or a spatial / group norm run
the original processor. For AgentSD's token merging (ToMeSD's metric is the block input, not the
normalised attention input), a diffusers hook on each `BasicTransformerBlock` hands the block's
input hidden states to its `attn1` processor (`AttnPlan.extras["metric"]`); `remove()` takes it off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from ..variants._pipes import phrase_token_indices
from ..variants.base import TokenLayout
from .base import Adapter, AttnRuntime, SparseProcessor, register_adapter

BLOCK_HOOK = "attnplug_unet_block_input"


class UNetSelfProcessor(SparseProcessor):
    """`AttnProcessor2_0` for `attn1` (self-attention) with the attention call replaced by attnplug's."""

    cross = False

    def __init__(self, runtime: AttnRuntime, layer: int, original: Any, downsample: int = 1) -> None:
        super().__init__(runtime, layer, original)
        self.downsample = downsample
        self.block_input: torch.Tensor | None = None  # set by the block hook just before this call
        self._layouts: dict = {}

    def _layout(self, n: int, text: int) -> TokenLayout | None:
        """This call's TokenLayout (cached per token count), None when `n` is not the level's grid."""
        key = (self.runtime.grid, n, text)
        hit = self._layouts.get(key)
        if hit is None:
            _, H, W = self.runtime.grid
            ds = self.downsample
            h, w = -(-H // ds), -(-W // ds)
            if h * w != n:
                return None
            hit = self._layouts[key] = TokenLayout(
                grid=(1, h, w), family="unet", cross_len=text if self.cross else 0, downsample=ds
            )
        return hit

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        metric, self.block_input = self.block_input, None
        out = self._run(attn, hidden_states, encoder_hidden_states, attention_mask, metric)
        if out is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return out

    def _run(self, attn, hidden_states, encoder_hidden_states, attention_mask, metric):
        """attnplug's path (None when the call runs the model's own processor)."""
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            return None
        if hidden_states.ndim != 3 or (encoder_hidden_states is not None) != self.cross:
            return None
        B, n, _ = hidden_states.shape
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        layout = self._layout(n, text)
        if layout is None:
            return None
        heads = attn.heads
        head_dim = attn.to_k.out_features // heads
        rt = self.runtime
        plan = rt.plan(self.layer, layout, B, heads, head_dim, hidden_states.device, hidden_states.dtype)
        if plan.is_dense:
            return None
        if metric is not None:
            plan.extras["metric"] = metric
        plan.extras["hidden_states"] = hidden_states
        query = attn.to_q(hidden_states)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = (
                attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
            )
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (t.view(B, -1, heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:  # AttnProcessor2_0 normalises [B, H, N, D]
            query = attn.norm_q(query.transpose(1, 2)).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key.transpose(1, 2)).transpose(1, 2)
        out = rt.run(plan, query, key, value, layout=layout)
        out = out.reshape(B, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class UNetCrossProcessor(UNetSelfProcessor):
    """`AttnProcessor2_0` for `attn2` (text cross-attention); planned only by cross-attention variants."""

    cross = True


class BlockInputHook(ModelHook):
    """Hands a BasicTransformerBlock's input hidden states to its attn1 processor (AgentSD's merge metric)."""

    def __init__(self, processor: UNetSelfProcessor) -> None:
        super().__init__()
        self.processor = processor

    def pre_forward(self, module, *args, **kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        if module.attn1.processor is self.processor and isinstance(hs, torch.Tensor):
            self.processor.block_input = hs
        return args, kwargs


def _levels(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, BasicTransformerBlock, downsample) in execution order."""
    out: list[tuple[str, nn.Module, int]] = []

    def blocks(prefix: str, unet_block: nn.Module, ds: int) -> None:
        for a, t2d in enumerate(getattr(unet_block, "attentions", None) or ()):
            for j, blk in enumerate(getattr(t2d, "transformer_blocks", ())):
                if type(blk).__name__ == "BasicTransformerBlock":
                    out.append((f"{prefix}.attentions.{a}.transformer_blocks.{j}", blk, ds))

    ds = 1
    for i, b in enumerate(model.down_blocks):
        blocks(f"down_blocks.{i}", b, ds)
        if getattr(b, "downsamplers", None):
            ds *= 2
    if model.mid_block is not None:
        blocks("mid_block", model.mid_block, ds)
    for i, b in enumerate(model.up_blocks):
        blocks(f"up_blocks.{i}", b, ds)
        if getattr(b, "upsamplers", None):
            ds //= 2
    return out


# -- official checkpoints (diffusion_attn.checkpoints) ------------------------------------------------------
# configs: the hub repo's unet/config.json; sizes: the pipelines' sample_size x VAE 8 (SD 1.5 64 x 8 = 512, SDXL
# 128 x 8 = 1024); text through the cross-attention (77 CLIP tokens); the token grid is the latent, attention runs
# at the levels of its CrossAttn blocks (SD 1.5: from the latent itself; SDXL: from 1/2 of it)
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
_UNET_CHECKPOINTS = (
    dict(
        name="sd1.5",
        repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline="StableDiffusionPipeline",
        config=_UNET15,
        config_source="hub unet/config.json",
        sizes={"default": (512, 512, 1)},
        size_source="StableDiffusionPipeline: sample_size 64 x 8 = 512",
        cross_len=77,
        notes="8 heads of 40..160 dims per level (attention_head_dim 8 = heads)",
    ),
    dict(
        name="sdxl-base-1.0",
        repo="stabilityai/stable-diffusion-xl-base-1.0",
        pipeline="StableDiffusionXLPipeline",
        config=_UNETXL,
        config_source="hub unet/config.json",
        sizes={"default": (1024, 1024, 1)},
        size_source="StableDiffusionXLPipeline: sample_size 128 x 8 = 1024",
        cross_len=77,
        notes="micro-conditioning: text_time embedding (pooled 1280 + 6 size / crop ids x 256)",
    ),
)


def _top_level(config: Any) -> tuple[int, int]:
    """(channels, heads) of the UNet's highest-resolution attention level."""
    i = next(i for i, t in enumerate(config["down_block_types"]) if t.startswith("CrossAttn"))
    dims = config["attention_head_dim"]  # diffusers' UNet name for the head COUNT
    heads = dims[i] if isinstance(dims, (tuple, list)) else dims
    return int(config["block_out_channels"][i]), int(heads)


@register_adapter
class UNetAdapter(Adapter):
    name = "unet"
    model_classes = ("UNet2DConditionModel",)
    processors = {"AttnProcessor2_0": UNetSelfProcessor}
    cross_processors = {"AttnProcessor2_0": UNetCrossProcessor}
    grid_inputs = ("sample",)
    multilevel = True
    pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    official_checkpoints = _UNET_CHECKPOINTS

    @classmethod
    def config_attention(cls, config):
        """At the highest-resolution attention level."""
        ch, heads = _top_level(config)
        return heads, ch // heads

    @classmethod
    def config_layers(cls, config):
        """Every BasicTransformerBlock: the down levels with attention, their mirrored up levels, the mid block."""
        types, lpb = config["down_block_types"], int(config["layers_per_block"])
        tl = config.get("transformer_layers_per_block", 1)
        tl = tuple(tl) if isinstance(tl, (tuple, list)) else (tl,) * len(types)
        n = tl[-1]  # mid block
        for i, t in enumerate(types):
            if t.startswith("CrossAttn"):
                n += lpb * tl[i] + (lpb + 1) * tl[i]  # down level and its mirrored up level
        return n

    @classmethod
    def config_with_layers(cls, config, num_layers):
        """One resnet and one transformer block per level (whatever `num_layers`)."""
        c = dict(config)
        c["layers_per_block"] = 1
        if "transformer_layers_per_block" in c:
            c["transformer_layers_per_block"] = 1
        return c

    @classmethod
    def config_grid(cls, config, latent_frames, height, width, vae_spatial):
        """The latent (attention levels at `attention_levels` of it)."""
        return (1, height // vae_spatial, width // vae_spatial)

    @classmethod
    def attention_levels(cls, config):
        """Downsampling factors of the levels that have attention (down path order)."""
        out, ds = [], 1
        for t in config["down_block_types"]:
            if t.startswith("CrossAttn"):
                out.append(ds)
            ds *= 2
        return out

    @classmethod
    def tiny_inputs(cls, checkpoint, model, grid, *, batch, text_len, rnd):
        """The latent sample, 77 CLIP tokens; SDXL's micro-conditioning (pooled text + 6 size / crop ids)."""
        c = model.config
        _, h, w = grid
        kw = dict(sample=rnd(batch, c.in_channels, h, w), timestep=torch.full((batch,), 900.0),
                  encoder_hidden_states=rnd(batch, 77, c.cross_attention_dim))  # fmt: skip
        if c.addition_embed_type == "text_time":  # SDXL micro-conditioning: pooled text + 6 size / crop ids
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
            dtype = next(model.parameters()).dtype
            kw["added_cond_kwargs"] = {"text_embeds": rnd(batch, pooled), "time_ids": ids.to(dtype)}
        return kw

    @classmethod
    def encode_prompt(cls, pipe, prompt, device, max_sequence_length):
        """The pipeline's CLIP token embeddings (SDXL: both encoders' concatenated); no length option."""
        if type(pipe).__name__ == "StableDiffusionXLPipeline":
            return pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]  # fmt: skip
        return pipe.encode_prompt(prompt, device, 1, False)[0]

    @classmethod
    def pixels_per_token(cls, pipe, model):
        return int(pipe.vae_scale_factor)

    @classmethod
    def phrase_tokens(cls, pipe, prompt, phrase, where):
        """The phrase in the CLIP tokens, after BOS."""
        return phrase_token_indices(pipe.tokenizer, prompt, phrase, 1, where)

    @classmethod
    def set_denoiser_input(cls, pipe, model, args, kwargs, z, t, batch):
        """`sample` scaled as the scheduler's `scale_model_input`, the timestep as the pipeline passes it."""
        sample = pipe.scheduler.scale_model_input(z, t) if hasattr(pipe.scheduler, "scale_model_input") else z
        args = cls.set_forward_arg(model, args, kwargs, "sample", sample)
        return cls.set_forward_arg(model, args, kwargs, "timestep", t)

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        levels = _levels(model)
        self._ds = {id(b.attn1): ds for _, b, ds in levels} | {id(b.attn2): ds for _, b, ds in levels if b.attn2}
        return [(f"{name}.attn1", b.attn1) for name, b, _ in levels]

    def cross_attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        levels = _levels(model)
        missing = [name for name, b, _ in levels if b.attn2 is None]
        if missing:
            raise ValueError(f"apply(): {missing[0]} of {type(model).__name__} has no text cross-attention (attn2)")
        return [(f"{name}.attn2", b.attn2) for name, b, _ in levels]

    def make_processor(self, runtime, layer, module, cross=False):
        cls = (self.cross_processors if cross else self.processors)[type(module.processor).__name__]
        return cls(runtime, layer, module.processor, self._ds.get(id(module), 1))

    def grid(self, model, args, kwargs):
        sample = self.forward_arg(model, args, kwargs, "sample")
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            raise ValueError("attnplug[unet]: the UNet must be called with a [B, C, H, W] sample tensor")
        return (1, int(sample.shape[2]), int(sample.shape[3]))

    def install(self, model: nn.Module, runtime: AttnRuntime) -> list[Callable[[], None]]:
        """A hook on every BasicTransformerBlock handing its input to attnplug's attn1 processor."""
        from diffusers.hooks import HookRegistry

        hook_cls = BlockInputHook
        undo: list[Callable[[], None]] = []
        for _, blk, _ in _levels(model):
            proc = blk.attn1.processor
            if not isinstance(proc, UNetSelfProcessor):
                continue
            registry = HookRegistry.check_if_exists_or_initialize(blk)
            registry.register_hook(hook_cls(proc), BLOCK_HOOK)
            undo.append(lambda blk=blk: _remove_hook(blk, BLOCK_HOOK))
        if undo:
            undo.insert(0, lambda: _invalidate(model))  # undone in reverse: after the blocks' hooks are gone
        return undo


def _invalidate(model: nn.Module) -> None:
    """Drop the cached child-registry lists (diffusers caches which submodules carry hooks)."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def _remove_hook(module: nn.Module, name: str) -> None:
    """Remove diffusers hook `name` from `module`; drop the registry (and the forward it installed) when empty."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        del module._diffusers_hook
        fwd = module.__dict__.get("forward")
        if getattr(fwd, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]

"""Fine-tune a peft LoRA on a diffusers video transformer with attnplug variants applied during training.

    from diffusion_attn.lora import TrainLoRAConfig, train_lora
    import diffusion_attn as da

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    cfg = TrainLoRAConfig(data_dir="clips", output_dir="out/radial-lora", variants=(da.Radial(),),
                          height=480, width=832, num_frames=81, steps=2000, mixed_precision="bf16")
    train_lora(pipe, cfg)                # out/radial-lora/pytorch_lora_weights.safetensors + README.md
    pipe.load_lora_weights("out/radial-lora")

Why: radial attention's long-video results need a LoRA trained WITH the sparse attention (the model
learns to live with the mask); attnplug's kernel has a backward, so the variant runs in every training
forward and the gradients flow through the sparse kernel.

Data (`data_dir`): one video file per clip (.mp4 .webm .mov .mkv .avi .gif) with its caption in a text file
of the same stem (`clip_001.mp4` + `clip_001.txt`). Each clip is resized (shorter side, bilinear) and
centre-cropped to `height` x `width`, its first `num_frames` frames kept (None: the clip's own size / all
frames; the family's VAE needs frames = 4k + 1 for Wan, HunyuanVideo, CogVideoX, 8k + 1 for LTX-Video),
encoded once with the pipeline's VAE (the posterior mean) and text encoder, and cached in
`output_dir/cache/` (one file per clip, rebuilt when the clip, its caption or the settings change). The
VAE and text encoders are then moved off the device: training holds only the transformer.

Loss: the model's own. Flow matching for Wan, HunyuanVideo and LTX-Video: x_t = (1 - s) x0 + s noise with
s = shift(sigmoid(n)), n ~ N(0, 1) (logit-normal; `flow_shift` as the family's scheduler), target
noise - x0, timestep 1000 s. CogVideoX: its scheduler's DDPM objective (t uniform, `add_noise`; v-prediction
turned into x0 with `get_velocity` and weighted 1 / (1 - alphas_cumprod[t]), as diffusers' CogVideoX LoRA
script; epsilon-prediction schedulers: noise target).

Training runs on accelerate (mixed precision, gradient accumulation, data parallel under
`accelerate launch`; each process takes its share of every global batch), with gradient checkpointing
on request. Seeded and resumable: the clip order and every noise / timestep draw come from generators
seeded by (seed, step), and `output_dir/checkpoints/step-N` (accelerate's `save_state`: LoRA, optimizer,
scheduler) lets a rerun continue, so a resumed run equals an uninterrupted one. The variants run at
denoising step `train_step` (default: past every dense warm-up, so Radial is sparse outside its
`dense_layers`). Variants with inference-only paths are refused: LiteAttention (its tile statistics run
without gradients) and guidance / layout-control variants (they need the pipeline's own calls).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import find_adapter
from .hooks import apply
from .registry import ADAPTERS
from .variants.base import check_range

__all__ = ["FAMILIES", "VIDEO_EXTENSIONS", "TrainLoRAConfig", "find_clips", "train_lora", "lora_loss"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


class _LoRATargets(Mapping):
    """family -> the attention projections of its transformer (the default `target_modules`): each adapter's
    `lora_targets`, read on access, so the trainable families are those whose adapter declares them."""

    def __getitem__(self, family: str) -> tuple[str, ...]:
        targets = getattr(ADAPTERS.get(family), "lora_targets", ())
        if not targets:
            raise KeyError(family)
        return tuple(targets)

    def __iter__(self) -> Iterator[str]:
        return (name for name, cls in ADAPTERS.items() if cls.lora_targets)

    def __len__(self) -> int:
        return sum(1 for _ in self)


TARGET_MODULES: Mapping[str, tuple[str, ...]] = _LoRATargets()
#: the families `train_lora` trains (a live view of `TARGET_MODULES`' keys)
FAMILIES = TARGET_MODULES.keys()
_REFUSED = {
    "lite": "LiteAttention's tile statistics run without gradients (inference only)",
}
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainLoRAConfig:
    """Settings of `train_lora` (see the module docstring). Every field is checked before anything loads."""

    data_dir: str
    output_dir: str
    variants: tuple = ()  # diffusion_attn variants applied to the transformer during training
    rank: int = 16
    alpha: float | None = None  # LoRA alpha (None: rank, i.e. scale 1)
    target_modules: tuple[str, ...] | None = None  # None: the family's attention projections
    steps: int = 1000
    learning_rate: float = 1e-4
    warmup_steps: int = 0  # linear warm-up, then constant
    batch_size: int = 1  # per process and micro-step
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 500  # checkpoint (resumable state) every that many steps, and at the end
    resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    max_sequence_length: int | None = None  # text tokens (None: the pipeline's __call__ default)
    flow_shift: float | None = None  # None: the pipeline scheduler's `shift` / `flow_shift` (else 1)
    train_step: int = 10**6  # denoising step the variants see during training
    kernel_backend: str = "auto"
    progress: bool = True
    cache_dir: str | None = None  # cached latents / embeddings (None: output_dir/cache)
    base_model: str = ""  # for the model card (e.g. the Hub id)
    extra_card: dict = field(default_factory=dict)  # more lines for the model card

    def check(self) -> None:
        """Refuse bad settings with the parameter and its allowed range."""
        for name in ("rank", "steps", "batch_size", "gradient_accumulation_steps", "save_every", "seed"):
            check_range(f"TrainLoRAConfig.{name}", getattr(self, name), 0 if name == "seed" else 1, None, kind=int)
        check_range("TrainLoRAConfig.warmup_steps", self.warmup_steps, 0, None, kind=int)
        check_range("TrainLoRAConfig.train_step", self.train_step, 0, None, kind=int)
        check_range("TrainLoRAConfig.learning_rate", self.learning_rate, 1e-12, 1.0)
        if self.alpha is not None:
            check_range("TrainLoRAConfig.alpha", self.alpha, 1e-6, None)
        if self.flow_shift is not None:
            check_range("TrainLoRAConfig.flow_shift", self.flow_shift, 1e-3, 100.0)
        for name in ("height", "width", "num_frames", "max_sequence_length"):
            if getattr(self, name) is not None:
                check_range(f"TrainLoRAConfig.{name}", getattr(self, name), 1, None, kind=int)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"TrainLoRAConfig.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if (self.height is None) != (self.width is None):
            raise ValueError("TrainLoRAConfig.height and width must be given together (or neither)")
        if not Path(self.data_dir).is_dir():
            raise ValueError(f"TrainLoRAConfig.data_dir {self.data_dir!r} is not a directory")
        for v in self.variants:
            reason = _REFUSED.get(getattr(v, "name", ""))
            if reason is None and getattr(v, "role", "") == "guidance":
                reason = "guidance variants run extra pipeline forwards (inference only)"
            if reason is None and getattr(v, "cross_attention", False):
                reason = "layout-control variants need the pipeline's own calls (entity prompts, callbacks)"
            if reason is not None:
                raise ValueError(f"TrainLoRAConfig.variants: {type(v).__name__} cannot be trained with: {reason}")


def find_clips(data_dir: str | Path) -> list[tuple[Path, str]]:
    """(video path, caption) of every clip in `data_dir` (sorted by name); ValueError naming what is missing."""
    root = Path(data_dir)
    clips, missing = [], []
    for p in sorted(root.iterdir()):
        if p.suffix.lower() not in VIDEO_EXTENSIONS or not p.is_file():
            continue
        cap = p.with_suffix(".txt")
        if not cap.is_file():
            missing.append(cap.name)
            continue
        clips.append((p, cap.read_text(encoding="utf-8").strip()))
    if missing:
        raise ValueError(
            f"data_dir {str(root)!r}: no caption file for {len(missing)} clip(s): {', '.join(missing[:4])}"
        )
    if not clips:
        raise ValueError(
            f"data_dir {str(root)!r} holds no clip: expected video files ({', '.join(VIDEO_EXTENSIONS)}) each with a "
            "caption file of the same stem (.txt)"
        )
    return clips


def read_video(path: Path, height: int | None, width: int | None, num_frames: int | None) -> torch.Tensor:
    """float [3, F, H, W] in [-1, 1]: resized (shorter side) and centre-cropped, the first `num_frames` frames."""
    import imageio.v3 as iio
    import numpy as np

    frames = np.asarray(iio.imread(path, index=None))
    if frames.ndim == 3:  # one frame
        frames = frames[None]
    frames = frames[..., :3]
    if num_frames is not None:
        if frames.shape[0] < num_frames:
            raise ValueError(f"{path.name}: {frames.shape[0]} frames, fewer than num_frames={num_frames}")
        frames = frames[:num_frames]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, 3, h, w]
    if height is not None:
        h, w = x.shape[-2:]
        s = max(height / h, width / w)
        nh, nw = max(height, round(h * s)), max(width, round(w * s))
        if (nh, nw) != (h, w):
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - height) // 2, (nw - width) // 2
        x = x[:, :, top : top + height, left : left + width]
    return x.clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------- families
def _family(pipe: Any) -> str:
    name = find_adapter(pipe.transformer).name
    if name not in FAMILIES:
        raise ValueError(
            f"train_lora: {type(pipe.transformer).__name__} ({name}) is not a video family {tuple(FAMILIES)}"
        )
    return name


def _default_text_len(pipe: Any) -> int:
    import inspect

    p = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    return int(p.default) if p is not None and isinstance(p.default, int) else 226


@torch.no_grad()
def encode_clip(pipe: Any, family: str, video: torch.Tensor, caption: str, text_len: int, device: Any = None) -> dict:
    """Cached inputs of one clip: normalised latents and the prompt's conditioning, as the pipeline builds them
    (on `device`, default the VAE's)."""
    dev = pipe.vae.device if device is None else torch.device(device)
    vae = pipe.vae
    x = video[None].to(dev, vae.dtype)
    out = ADAPTERS[family].lora_inputs(pipe, x, caption, text_len, dev)
    return {k: v.detach().cpu() for k, v in out.items()}


def _shift(pipe: Any, cfg: TrainLoRAConfig) -> float:
    if cfg.flow_shift is not None:
        return float(cfg.flow_shift)
    sc = pipe.scheduler.config
    for name in ("flow_shift", "shift"):
        val = sc.get(name) if hasattr(sc, "get") else getattr(sc, name, None)
        if isinstance(val, (int, float)) and val > 0:
            return float(val)
    return 1.0


def lora_loss(
    pipe: Any, transformer: Any, family: str, batch: dict, gen: torch.Generator, shift: float
) -> torch.Tensor:
    """The model's own training loss on one batch of cached inputs (see the module docstring)."""
    x0 = batch["latents"]
    B, dev = x0.shape[0], x0.device
    config = getattr(transformer, "module", transformer).config  # under DDP: the wrapped model's
    noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(dev, x0.dtype)
    adapter = ADAPTERS[family]
    if adapter.lora_objective == "ddpm":
        sched = pipe.scheduler
        T = sched.config.num_train_timesteps
        t = torch.randint(0, T, (B,), generator=gen, device=gen.device).to(dev)
        noisy = sched.add_noise(x0, noise, t)
        out = adapter.lora_forward(pipe, transformer, config, noisy, t, batch)
        alphas = sched.alphas_cumprod.to(dev)[t].float()
        weights = (1 / (1 - alphas)).view(B, *([1] * (x0.dim() - 1)))
        if sched.config.prediction_type == "v_prediction":
            pred, target = sched.get_velocity(out.float(), noisy.float(), t), x0.float()
        else:
            pred, target, weights = out.float(), noise.float(), torch.ones_like(weights)
        return (weights * (pred - target) ** 2).mean()
    u = torch.sigmoid(torch.randn(B, generator=gen, device=gen.device)).to(dev)
    s = shift * u / (1 + (shift - 1) * u)
    sv = s.view(B, *([1] * (x0.dim() - 1)))
    xt = ((1 - sv) * x0.float() + sv * noise.float()).to(x0.dtype)
    pred = adapter.lora_forward(pipe, transformer, config, xt, s * 1000, batch)
    return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())


# ---------------------------------------------------------------------------------------------- training
def _cache_key(path: Path, caption: str, cfg: TrainLoRAConfig, family: str, text_len: int, base: str) -> str:
    st = path.stat()
    raw = json.dumps([path.name, st.st_size, st.st_mtime_ns, caption, cfg.height, cfg.width, cfg.num_frames,
                      family, text_len, base])  # fmt: skip
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _prepare_cache(pipe: Any, family: str, cfg: TrainLoRAConfig, accelerator: Any, base: str) -> list[Path]:
    """Encode every clip once (main process), return the cache files in clip order."""
    clips = find_clips(cfg.data_dir)
    text_len = cfg.max_sequence_length or _default_text_len(pipe)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"
    files = []
    todo = []
    for path, caption in clips:
        f = cache / f"{path.stem}-{_cache_key(path, caption, cfg, family, text_len, base)}.pt"
        files.append(f)
        if not f.is_file():
            todo.append((path, caption, f))
    if todo and accelerator.is_main_process:
        cache.mkdir(parents=True, exist_ok=True)
        dev = accelerator.device
        for name in ("vae", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if isinstance(m, torch.nn.Module):
                m.to(dev)
        for path, caption, f in todo:
            video = read_video(path, cfg.height, cfg.width, cfg.num_frames)
            data = encode_clip(pipe, family, video, caption, text_len, dev)
            data["caption"] = caption
            torch.save(data, f.with_suffix(".tmp"))
            f.with_suffix(".tmp").replace(f)
    accelerator.wait_for_everyone()
    for name in ("vae", "text_encoder", "text_encoder_2"):  # training holds only the transformer on the device
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            m.to("cpu")
    return files


def _collate(items: list[dict], device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k in items[0]:
        if k == "caption":
            continue
        t = torch.stack([it[k] for it in items]).to(device)
        out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit()]
    return sorted(found)


def _usual_permissions(path: Path) -> None:
    """The permissions the umask allows (0666 & ~umask), like any file the user writes: safetensors >= 0.8 (under
    diffusers' `save_lora_weights`) writes through a temporary file and leaves 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def train_lora(pipe: Any, cfg: TrainLoRAConfig) -> Path:
    """Train a LoRA on `pipe.transformer` with `cfg.variants` applied; returns the output directory holding
    `pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights` format), `README.md` (model card),
    `train_config.json`, `metrics.json` and `checkpoints/` (resumable state)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tqdm.auto import tqdm

    cfg.check()
    family = _family(pipe)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    base = cfg.base_model or str(getattr(pipe, "name_or_path", "") or "")
    files = _prepare_cache(pipe, family, cfg, accelerator, base)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.to(accelerator.device)
    targets = list(cfg.target_modules or TARGET_MODULES[family])
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, init_lora_weights=True, target_modules=targets)
    transformer.add_adapter(lora)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # trained weights in fp32 (mixed precision autocasts the forward)
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    handle = (
        apply(transformer, *cfg.variants, step_source="callback", kernel_backend=cfg.kernel_backend)
        if cfg.variants
        else None
    )
    if handle is not None:
        handle.set_step(cfg.train_step)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    model, optimizer, sched = accelerator.prepare(transformer, optimizer, sched)
    start = 0
    ckpts = _checkpoints(out)
    if cfg.resume and ckpts:
        start, path = ckpts[-1]
        accelerator.load_state(str(path))
    shift = _shift(pipe, cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * world  # clips per micro-step, over every process
    n = len(files)
    cache: dict[int, dict] = {}
    dtype = transformer.dtype if cfg.mixed_precision == "no" else torch.float32
    metrics = {"loss": []}
    if (out / "metrics.json").is_file() and start:
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["loss"] = metrics["loss"][:start]
    show = cfg.progress and accelerator.is_main_process
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not show, desc=f"train-lora {family}")
    for step in bar:
        total = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            draw = (step * cfg.gradient_accumulation_steps + micro) * per_step  # global clip counter
            idx = []
            for i in range(draw + rank * cfg.batch_size, draw + (rank + 1) * cfg.batch_size):
                epoch, pos = divmod(i, n)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
                idx.append(int(order[pos]))
            items = []
            for i in idx:
                if i not in cache:
                    cache[i] = torch.load(files[i], weights_only=True) | {"caption": ""}
                items.append(cache[i])
            batch = _collate(items, accelerator.device, dtype)
            gen = torch.Generator(accelerator.device).manual_seed(
                ((cfg.seed * 1_000_003 + step) * 1009 + micro) * 131 + rank
            )
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = lora_loss(pipe, model, family, batch, gen, shift)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                sched.step()
                optimizer.zero_grad(set_to_none=True)
            total += float(accelerator.gather(loss.detach()[None]).mean()) / cfg.gradient_accumulation_steps
        metrics["loss"].append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        done = step + 1
        if done % cfg.save_every == 0 or done == cfg.steps:
            accelerator.wait_for_everyone()
            accelerator.save_state(str(out / "checkpoints" / f"step-{done}"))
            if accelerator.is_main_process:
                (out / "metrics.json").write_text(json.dumps(metrics))
                for _, old in _checkpoints(out)[:-2]:  # keep the two newest
                    shutil.rmtree(old, ignore_errors=True)
    bar.close()
    accelerator.wait_for_everyone()
    if handle is not None:
        handle.remove()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unwrapped).items()}
        type(pipe).save_lora_weights(str(out), transformer_lora_layers=state, safe_serialization=True)
        _usual_permissions(out / "pytorch_lora_weights.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics))
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("variants", "extra_card")}
        settings["variants"] = [repr(v) for v in cfg.variants]
        settings.update(family=family, clips=n, processes=world, target_modules=targets, flow_shift_used=shift)
        (out / "train_config.json").write_text(json.dumps(settings, indent=2, default=str))
        (out / "README.md").write_text(_model_card(cfg, family, base, n, world, targets, metrics))
    accelerator.wait_for_everyone()
    return out


def _model_card(cfg: TrainLoRAConfig, family: str, base: str, n: int, world: int, targets: list, metrics: dict) -> str:
    losses = metrics["loss"]
    last = losses[-min(len(losses), 20) :]
    variants = ", ".join(repr(v) for v in cfg.variants) or "none (dense attention)"
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {base or 'unknown'}",
        "tags: [lora, text-to-video, attnplug]",
        "---",
        "",
        f"# LoRA for {base or 'a ' + family + ' transformer'}, trained with attnplug",
        "",
        f"* attention during training: {variants}",
        f"* family: {family}; target modules: {', '.join(targets)}; rank {cfg.rank}, alpha {cfg.alpha or cfg.rank}",
        f"* data: {n} clip(s), {cfg.height or 'native'} x {cfg.width or 'native'} px, {cfg.num_frames or 'all'} frames",
        f"* {cfg.steps} steps, batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x {world} "
        f"process(es), learning rate {cfg.learning_rate}, warm-up {cfg.warmup_steps}, mixed precision "
        f"{cfg.mixed_precision}, gradient checkpointing {cfg.gradient_checkpointing}, seed {cfg.seed}",
        f"* loss: first step {losses[0]:.4f}, mean of the last {len(last)} steps {sum(last) / len(last):.4f}"
        if losses
        else "* loss: no step recorded",
        *[f"* {k}: {v}" for k, v in cfg.extra_card.items()],
        "",
        "## Use",
        "",
        "```python",
        "pipe.load_lora_weights(PATH)  # this folder",
        "# generate with the same attention the LoRA was trained with, e.g.",
        "# import diffusion_attn as da; da.apply(pipe, da.Radial())",
        "```",
        "",
    ]
    if not math.isfinite(losses[-1] if losses else 0.0):
        lines.append("WARNING: the last loss is not finite.")
    return "\n".join(lines)

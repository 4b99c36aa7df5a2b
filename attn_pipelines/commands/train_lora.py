"""`attnplug train-lora`: fine-tune a LoRA on a diffusers video pipeline's transformer with attnplug variants
applied during training (radial attention's length-extension recipe), on accelerate.

    attnplug train-lora --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --data clips/ --out out/radial-lora \\
        --attn radial --height 480 --width 832 --frames 161 --steps 2000 --mixed-precision bf16 \\
        --gradient-checkpointing
    accelerate launch --num_processes 8 -m attn_pipelines train-lora ...     # data parallel on 8 GPUs

`--data` holds one video per clip with its caption in a .txt file of the same stem (clip_001.mp4 +
clip_001.txt). Latents and text embeddings are computed once and cached in `--out`/cache. Rerunning the
same command continues from the newest checkpoint in `--out`/checkpoints (`--restart` starts over). The
LoRA is `--out`/pytorch_lora_weights.safetensors, loadable with diffusers' `pipe.load_lora_weights(out)`,
with a model card (README.md). Python: `diffusion_attn.lora.train_lora`. Bad input fails before any weight
is loaded.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from attn_spec import parse_spec

from .. import argtypes
from ..config import build_variant
from ..errors import CLIError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    t = sub.add_parser("train-lora", help="fine-tune a LoRA with attnplug variants applied during training")
    t.add_argument("--model", required=True, help="Hub id (cached) or local diffusers pipeline directory")
    t.add_argument("--data", required=True, help="folder of clips: VIDEO + caption .txt of the same stem")
    t.add_argument("--out", required=True, help="output folder (LoRA, model card, cache, checkpoints)")
    t.add_argument("--attn", action="append", default=[], metavar="VARIANT[:k=v,...]", help="variant(s) applied")
    t.add_argument("--rank", type=argtypes.positive_int, default=16, help="LoRA rank")
    t.add_argument("--alpha", type=argtypes.finite_float, default=None, help="LoRA alpha (default: the rank)")
    t.add_argument("--target-modules", default=None, help="comma-separated module names (default: attention)")
    t.add_argument("--steps", type=argtypes.positive_int, default=1000)
    t.add_argument("--lr", type=argtypes.finite_float, default=1e-4, help="learning rate")
    t.add_argument("--warmup", type=argtypes.nonneg_int, default=0, help="linear warm-up steps")
    t.add_argument("--batch-size", type=argtypes.positive_int, default=1, help="clips per process and micro-step")
    t.add_argument("--grad-accum", type=argtypes.positive_int, default=1, help="gradient accumulation steps")
    t.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--seed", type=argtypes.nonneg_int, default=0)
    t.add_argument("--save-every", type=argtypes.positive_int, default=500, help="checkpoint every N steps")
    t.add_argument("--restart", action="store_true", help="delete --out/checkpoints and start over")
    t.add_argument("--height", type=argtypes.positive_int, default=None, help="pixels (with --width)")
    t.add_argument("--width", type=argtypes.positive_int, default=None)
    t.add_argument("--frames", type=argtypes.positive_int, default=None, help="frames per clip (default: all)")
    t.add_argument("--text-len", type=argtypes.positive_int, default=None, help="text tokens (default: pipeline's)")
    t.add_argument("--flow-shift", type=argtypes.finite_float, default=None, help="default: the scheduler's")
    t.add_argument("--cache-dir", default=None, help="cached latents / text embeddings (default: --out/cache)")
    t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="base weights")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check everything, load the pipeline, train."""
    import torch

    from diffusion_attn.lora import TrainLoRAConfig, find_clips, train_lora

    from ..loading import load_pipeline

    variants = tuple(build_variant(parse_spec(s, where="--attn"), where="--attn") for s in args.attn)
    targets = None
    if args.target_modules is not None:
        targets = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
        if not targets:
            raise CLIError(f"--target-modules: expected comma-separated module names, got {args.target_modules!r}")
    cfg = TrainLoRAConfig(
        data_dir=args.data, output_dir=args.out, variants=variants, rank=args.rank, alpha=args.alpha,
        target_modules=targets, steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
        batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, save_every=args.save_every,
        resume=not args.restart, height=args.height, width=args.width, num_frames=args.frames,
        max_sequence_length=args.text_len, flow_shift=args.flow_shift, progress=not args.no_progress,
        base_model=args.model, cache_dir=args.cache_dir,
    )  # fmt: skip
    try:
        cfg.check()
        find_clips(args.data)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e).replace("TrainLoRAConfig.", "--").replace("data_dir", "--data")) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a directory")
    if args.restart and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")
    pipe = load_pipeline(args.model, getattr(torch, args.dtype))
    try:
        train_lora(pipe, cfg)
    except ValueError as e:  # a family attnplug cannot train, a clip too short, ...
        raise CLIError(str(e)) from None
    print(f"attnplug: LoRA written to {out / 'pytorch_lora_weights.safetensors'} (model card: {out / 'README.md'})")
    return 0

"""Fine-tune a timm model with an attnplug variant injected, on an ImageFolder dataset.

    python -m vision_attn.finetune --model resnet50 --variant eca --data /data/imagenette --epochs 5
    accelerate launch -m vision_attn.finetune --model vit_small_patch16_224 --variant agent:num_agents=49 ...

The data folder holds `train/<class>/*.jpg` and optionally `val/<class>/*.jpg`. Runs on one GPU,
several GPUs through `accelerate launch`, or the CPU (`--cpu`). Writes `model.safetensors`,
`config.json` and `metrics.json` to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["VISION_VARIANTS", "build_model", "main", "parse_variant"]


def _variants() -> dict[str, type]:
    import vision_attn as va

    return {"eca": va.ECA, "coord": va.CoordAttention, "agent": va.Agent}


VISION_VARIANTS = _variants


def _coerce(value: str, current: Any) -> Any:
    if isinstance(current, bool) or value.lower() in ("true", "false"):
        return value.lower() in ("1", "true", "yes")
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() == "none":
        return None
    return value


def parse_variant(spec: str):
    """`name:key=value,key=value` -> a vision_attn variant; unknown names/keys list the valid ones."""
    name, _, opts = spec.partition(":")
    table = _variants()
    if name not in table:
        raise ValueError(f"--variant: unknown variant {name!r}; choose one of {sorted(table)}")
    cls = table[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--variant: option {item!r} must look like key=value")
        if key not in fields:
            raise ValueError(f"--variant: {name} has no option {key!r}; valid options: {sorted(fields)}")
        kwargs[key] = _coerce(value, fields[key].default)
    return cls(**kwargs)


def build_model(args: argparse.Namespace):
    """Create the timm model (local weights optional), inject the variant; returns (model, handle)."""
    import timm

    import vision_attn as va

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(args.pretrained_file)))
    try:
        model = timm.create_model(args.model, num_classes=args.num_classes, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"--model: unknown timm model {args.model!r}") from e
        raise
    handle = va.inject(model, parse_variant(args.variant)) if args.variant else None
    return model, handle


def _loaders(args: argparse.Namespace, model):
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(args.data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not train_dir.is_dir():
        raise FileNotFoundError(f"--data: {root} is not a directory (expected train/<class>/* images)")
    cfg = resolve_data_config({"input_size": (3, args.img_size, args.img_size)} if args.img_size else {}, model=model)
    train = ImageFolder(str(train_dir), transform=create_transform(**cfg, is_training=not args.no_augment))
    if len(train) == 0:
        raise ValueError(f"--data: no images found under {train_dir}")
    val = None
    if (root / "val").is_dir():
        val = ImageFolder(str(root / "val"), transform=create_transform(**cfg, is_training=False))
    mk = lambda ds, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        ds, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.workers, drop_last=False
    )
    return mk(train, True), (mk(val, False) if val is not None else None), train.classes


def train(args: argparse.Namespace) -> dict:
    """The training loop; returns the metrics dict (also written to --out/metrics.json)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    model, handle = build_model(args)
    train_dl, val_dl, classes = _loaders(args, model)
    if args.num_classes != len(classes):
        raise ValueError(f"--num-classes {args.num_classes} but the dataset has {len(classes)} classes: {classes}")
    if args.train_only_new:
        if handle is None:
            raise ValueError("--train-only-new needs --variant")
        new = {id(p) for m in handle.new_modules for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in new)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_dl)
    total = args.max_steps or args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model, opt, train_dl, sched = accelerator.prepare(model, opt, train_dl, sched)
    if val_dl is not None:
        val_dl = accelerator.prepare(val_dl)
    loss_fn = torch.nn.CrossEntropyLoss()
    history: list[dict] = []
    step = 0
    bar = tqdm(total=total, disable=not accelerator.is_local_main_process, desc="fine-tune")
    while step < total:
        model.train()
        for x, y in train_dl:
            with accelerator.accumulate(model):
                loss = loss_fn(model(x), y)
                accelerator.backward(loss)
                if args.clip_grad:
                    accelerator.clip_grad_norm_(params, args.clip_grad)
                opt.step()
                sched.step()
                opt.zero_grad()
            history.append({"step": step, "loss": float(loss.detach())})
            if not math.isfinite(history[-1]["loss"]):
                raise FloatingPointError(f"loss became {history[-1]['loss']} at step {step}")
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            step += 1
            if step >= total:
                break
    bar.close()
    metrics: dict = {"steps": step, "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}
    if val_dl is not None:
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in val_dl:
                pred = accelerator.gather_for_metrics(model(x).argmax(-1))
                y = accelerator.gather_for_metrics(y)
                correct += int((pred == y).sum())
                seen += y.numel()
        metrics["val_top1"] = correct / max(seen, 1)
    if accelerator.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
        accelerator.print(json.dumps(metrics))
    return metrics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vision_attn.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="timm model name (or an attnplug-registered one)")
    p.add_argument("--variant", default=None, help="e.g. eca, coord:reduction=16, agent:num_agents=49")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ (and optional val/)")
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--pretrained-file", default=None, help="local checkpoint loaded through timm's pretrained_cfg")
    p.add_argument("--model-kwargs", default=None, help='JSON of extra timm.create_model kwargs, e.g. {"img_size": 64}')
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--train-only-new", action="store_true", help="train only the parameters the variant added")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

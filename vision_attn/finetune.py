"""Fine-tune (or evaluate) a timm model with an attnplug variant injected, on an ImageFolder dataset.

    python -m vision_attn.finetune --model resnet50 --variant eca --data /data/imagenette --epochs 5
    accelerate launch -m vision_attn.finetune --model vit_small_patch16_224 --variant agent:num_agents=49 ...
    python -m vision_attn.finetune --model resnet18 --pretrained-file ckpt.pt --data ./digits --eval-only

`--model` is a timm name or an attnplug-registered one (`agent_deit_tiny_patch16_224`, ...);
`--variant` is `name:key=value,...` (`vision_attn.spec`; tuples in brackets:
`agent:num_agents=16,blocks=(1,2,3)`). The data folder holds `train/<class>/*` and optionally
`val/<class>/*` (a folder of class folders without train/ is the train split). `--pretrained-file`
is loaded after injection: a checkpoint of the base model or of the injected one (e.g. from
`vision_attn.calibrate`); its classifier is kept when its shape fits `--num-classes`, and the run
says so when it is replaced. Writes `model.safetensors`, `config.json` (typed: what
`load_finetuned(out)` needs to rebuild the model) and `metrics.json` to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .build import UsageError, build_model, load_finetuned, new_parameter_names
from .checkpoint import usual_permissions
from .spec import SpecError, variant_spec

__all__ = [
    "UsageError", "build_model", "cosine_multiplier", "cosine_schedule", "evaluate", "load_finetuned", "main",
    "parser", "train",
]  # fmt: skip

TRANSFORMS = ("auto", "timm", "simple")


# ------------------------------------------------------------------------------------------ schedule


@functools.lru_cache(maxsize=32)
def _diffusers_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """diffusers' cosine-with-warmup multiplier (`get_cosine_schedule_with_warmup`), taken from the LambdaLR it
    builds on a throw-away optimizer (diffusers does not expose the function itself)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_cosine_schedule_with_warmup(dummy, warmup, total).lr_lambdas[0]


def cosine_multiplier(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` of `total`: linear warm-up (step + 1) /
    (warmup + 1), then a half cosine down to `min_ratio`, held there past `total`.

    diffusers' cosine-with-warmup schedule, one step ahead (its warm-up starts at 0, ours at 1 / (warmup + 1):
    the first step already learns), with the floor applied on top; the curve of every attnplug run so far, so
    a resumed run keeps it."""
    span = max(1, total - warmup)
    f = _diffusers_cosine(total + 1, warmup + 1)(min(step, warmup + span) + 1)
    return f if step < warmup else min_ratio + (1 - min_ratio) * f


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR of `cosine_multiplier` on `optimizer` (its state_dict is a plain LambdaLR's, so states saved
    before this helper existed load into it)."""

    def lr_lambda(step: int) -> float:
        return cosine_multiplier(step, total, warmup, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


# --------------------------------------------------------------------------------------------- data


def _class_folders(data: str) -> tuple[Path, Path | None, list[str]]:
    from torchvision.datasets.folder import find_classes

    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data: {root} is not a directory (expected {root}/train/<class>/*.png|jpg)")
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if (root / "val").is_dir() else None
    try:
        classes, _ = find_classes(str(train_dir))
    except FileNotFoundError as e:
        raise UsageError(f"--data: no class folders under {train_dir} (expected {train_dir}/<class>/*.png|jpg)") from e
    return train_dir, val_dir, classes


def _imagenet_like(folder: Path) -> bool:
    """Photos of a usual size: RGB and at least 128 px on the short side (a few files looked at)."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMG_EXTENSIONS][:8]
    if not files:
        return False
    for f in files:
        with Image.open(f) as im:
            if im.mode not in ("RGB", "RGBA", "CMYK", "YCbCr") or min(im.size) < 128:
                return False
    return True


def data_config(model: nn.Module, img_size: int | None) -> dict[str, Any]:
    """timm's resolved data config for the model (input size overridden by `img_size`)."""
    from timm.data import resolve_data_config

    overrides = {"input_size": (3, img_size, img_size)} if img_size else {}
    cfg = resolve_data_config(overrides, model=model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def make_transform(cfg: dict[str, Any], kind: str, training: bool):
    """ "timm": timm's recipe (RandomResizedCrop, flip, colour jitter when training; resize + centre
    crop to crop_pct otherwise); "simple": resize to the input size and normalise, nothing else."""
    from timm.data import create_transform
    from torchvision import transforms as T

    size = tuple(cfg["input_size"][1:])
    if kind == "simple":
        return T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
    tcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return create_transform(**tcfg, is_training=training)


def _folder(path: Path, transform, classes: list[str] | None = None):
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(path), transform=transform)
    except FileNotFoundError as e:  # class folders without any image
        raise UsageError(f"--data: no images under {path}: {e}") from e
    if len(ds) == 0:
        raise UsageError(f"--data: no images under {path}")
    if classes is not None and ds.classes != classes:
        raise UsageError(f"--data: {path.name}/ classes {ds.classes} differ from train/ classes {classes}")
    return ds


def evaluate(model: nn.Module, loader, accelerator=None) -> float:
    """Top-1 accuracy of `model` over `loader` (gathered across processes under accelerate)."""
    model.eval()
    correct = seen = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in loader:
            if accelerator is None:
                x, y = x.to(device), y.to(device)
            pred = model(x).argmax(-1)
            if accelerator is not None:
                pred, y = accelerator.gather_for_metrics(pred), accelerator.gather_for_metrics(y)
            correct += int((pred == y).sum())
            seen += y.numel()
    return correct / max(seen, 1)


# --------------------------------------------------------------------------------------------- run


def _model_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs must be a JSON object, got {text!r}: {e}") from e
    if not isinstance(kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {text!r}")
    return kwargs


def train(args: argparse.Namespace) -> dict:
    """The training (or --eval-only) run; returns the metrics dict (also written to --out/metrics.json)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum
    )
    say = accelerator.print
    torch.manual_seed(args.seed)
    train_dir, val_dir, classes = _class_folders(args.data)
    if args.num_classes is not None and args.num_classes != len(classes):
        raise UsageError(f"--num-classes {args.num_classes} but the dataset has {len(classes)} classes: {classes}")
    model_kwargs = _model_kwargs(args.model_kwargs)
    try:
        model = build_model(
            args.model, len(classes), variant=args.variant, img_size=args.img_size, model_kwargs=model_kwargs,
            pretrained_file=args.pretrained_file, log=say,
        )  # fmt: skip
    except SpecError as e:
        raise UsageError(str(e)) from e
    new_params = new_parameter_names(model)
    cfg = data_config(model, args.img_size)
    kind = args.transform
    if kind == "auto":
        kind = "timm" if _imagenet_like(train_dir) else "simple"
        say(f"--transform auto: {kind} ({'ImageNet-like photos' if kind == 'timm' else 'small or non-RGB images'})")
    eval_tf = make_transform(cfg, kind, training=False)

    def loader(ds, shuffle: bool):
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.workers)

    val_dl = loader(_folder(val_dir, eval_tf, classes), False) if val_dir is not None else None
    out = Path(args.out)
    if args.eval_only:
        split, dl = ("val", val_dl) if val_dl is not None else ("train", loader(_folder(train_dir, eval_tf), False))
        model = accelerator.prepare(model)
        metrics = {f"{split}_top1": evaluate(model, accelerator.prepare(dl), accelerator), "eval_only": True}
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        say(json.dumps(metrics))
        return metrics

    train_dl = loader(_folder(train_dir, make_transform(cfg, kind, training=not args.no_augment), classes), True)
    if args.train_only_new:
        if not new_params:
            raise UsageError(
                "--train-only-new needs an injection that adds parameters (--variant or an attnplug-registered --model)"
            )
        also = tuple(p for p in (args.also_train or "").split(",") if p)
        keep = set(new_params)
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep or n.startswith(also))
    params = [p for p in model.parameters() if p.requires_grad]
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, opt, train_dl = accelerator.prepare(model, opt, train_dl)
    if val_dl is not None:
        val_dl = accelerator.prepare(val_dl)

    batches = args.max_steps * args.grad_accum if args.max_steps else args.epochs * len(train_dl)
    total = max(1, math.ceil(batches / args.grad_accum))  # optimizer steps: the schedule steps once per each
    sched = cosine_schedule(opt, total, min(args.warmup_steps, total - 1), args.min_lr_ratio)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    say(f"model {args.model} variant {args.variant}: {n_train:,} of {n_total:,} parameters trained; "
        f"{len(classes)} classes; {batches} batches ({total} optimizer steps) on {accelerator.device}")  # fmt: skip
    history: list[dict] = []
    epochs: list[dict] = []
    batch_idx = epoch = 0
    bar = tqdm(total=batches, disable=not accelerator.is_local_main_process or args.quiet, desc="fine-tune")
    while batch_idx < batches:
        model.train()
        sums = torch.zeros(3, device=accelerator.device)  # loss*n, correct, n (this process)
        for x, y in train_dl:
            with accelerator.accumulate(model):
                logits = model(x)
                loss = loss_fn(logits, y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip_grad:
                    accelerator.clip_grad_norm_(params, args.clip_grad)
                opt.step()
                if accelerator.sync_gradients:
                    sched.step()
                opt.zero_grad()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at batch {batch_idx} (epoch {epoch})")
            n = y.shape[0]
            sums += torch.tensor([value * n, float((logits.argmax(-1) == y).sum()), n], device=sums.device)
            history.append({"step": batch_idx, "epoch": epoch, "loss": value, "lr": opt.param_groups[0]["lr"]})
            bar.update(1)
            batch_idx += 1
            if batch_idx >= batches:
                break
        sums = accelerator.reduce(sums, reduction="sum")
        row = {"epoch": epoch, "train_loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2])}
        if val_dl is not None and (args.eval_every_epoch or batch_idx >= batches):
            row["val_top1"] = evaluate(model, val_dl, accelerator)
        epochs.append(row)
        if not args.quiet:
            say(json.dumps(row))
        epoch += 1
    bar.close()
    metrics: dict = {
        "steps": batch_idx,
        "optimizer_steps": math.ceil(batch_idx / args.grad_accum),
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "epochs": epochs,
        "params_total": n_total,
        "params_trained": n_train,
    }
    if val_dl is not None:
        metrics["val_top1"] = epochs[-1]["val_top1"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        state = {k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        usual_permissions(out / "model.safetensors")
        variant = None
        for h in getattr(unwrapped, "_attnplug_handles", []):
            if not h.removed and args.variant:
                variant = variant_spec(h.variant)
        config = {
            "model": args.model,
            "num_classes": len(classes),
            "img_size": args.img_size,
            "model_kwargs": model_kwargs,
            "variant": variant,
            "classes": classes,
            "transform": kind,
            "data_config": cfg,
            "new_parameters": new_params,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    say(json.dumps({k: v for k, v in metrics.items() if k != "epochs"}))
    return metrics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vision_attn.finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="timm model name (or an attnplug-registered one)")
    p.add_argument(
        "--variant", default=None, help="name:key=value,... e.g. eca, coord:reduction=16, agent:num_agents=49"
    )
    p.add_argument("--data", required=True, help="ImageFolder root with train/<class>/ (and optional val/<class>/)")
    p.add_argument("--out", default="runs/finetune", help="output folder")
    p.add_argument(
        "--pretrained-file", default=None, help="local checkpoint (base or injected model), loaded after injection"
    )
    p.add_argument("--model-kwargs", default=None, help='JSON of extra timm.create_model kwargs, e.g. {"depth": 6}')
    p.add_argument("--num-classes", type=int, default=None, help="checked against the dataset (default: its classes)")
    p.add_argument("--img-size", type=int, default=None, help="model (where it takes img_size) and data resolution")
    p.add_argument(
        "--transform",
        default="auto",
        choices=TRANSFORMS,
        help="timm: timm's ImageNet recipe; simple: resize + normalise; auto: timm for RGB photos >= 128 px",
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate (val/, else train/) and write metrics.json only")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many batches (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup (optimizer steps)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm (0 = off)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--train-only-new", action="store_true", help="train exactly the parameters the injection created")
    p.add_argument("--also-train", default=None, help="with --train-only-new: comma-separated name prefixes, e.g. head")
    p.add_argument("--no-augment", action="store_true", help="evaluation transform for training too")
    p.add_argument("--eval-every-epoch", action="store_true", help="validate after every epoch (default: at the end)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar / per-epoch lines")
    return p  # fmt: skip


def _check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1 and not args.eval_only:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs} (use --eval-only to evaluate without training)")
    for flag in ("batch_size", "grad_accum"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.img_size is not None and args.img_size < 8:
        raise UsageError(f"--img-size must be >= 8, got {args.img_size}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.pretrained_file is not None and not Path(args.pretrained_file).is_file():
        raise UsageError(f"--pretrained-file: {args.pretrained_file!r} does not exist or is not a file")
    if args.also_train and not args.train_only_new:
        raise UsageError("--also-train only applies with --train-only-new")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _check_args(args)
        train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Convert a trained ViT-family model to agent attention without labels: measure, distil, choose.

Plain `inject(model, Agent(...))` starts the new biases and the DWC at zero (the paper's
from-scratch configuration) and can cost a trained model much of its accuracy. `calibrate` keeps
the model instead, on unlabelled images only:

1. **distil** — every candidate block's agent attention is trained (new parameters only: biases,
   DWC) to reproduce that block's original softmax-attention output on the same input, all blocks
   at once from one forward of the original model (relative MSE, Adam);
2. **measure** — each block converted alone: top-1 agreement and KL of the logits against the
   original on held-out images (its sensitivity), and the relative output drift of its attention;
3. **choose** — blocks are added from the least to the most sensitive while the agreement of the
   converted model stays >= `min_agreement` (blocks drifting more than `max_drift` are skipped);
4. **refine** (optional, `kd_steps`) — the new parameters of the chosen blocks are trained on the
   KL between the converted model's logits and the original's (self-distillation, still no labels).

    python -m vision_attn.calibrate --model vit_small_patch16_224 --pretrained-file vit.pth \\
        --data ./images --variant agent:num_agents=16 --out runs/calibrated
    python -m vision_attn.finetune --model vit_small_patch16_224 --variant <printed spec> \\
        --pretrained-file runs/calibrated/model.safetensors --data ./imagefolder ...

The output folder loads with `vision_attn.load_finetuned(out)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import usual_permissions
from .finetune import UsageError, _model_kwargs, build_model, data_config, make_transform
from .inject import InjectionHandle, inject
from .spec import SpecError, parse_variant, variant_spec
from .variants.agent import Agent

__all__ = ["BlockReport", "Calibration", "calibrate", "main"]


@dataclasses.dataclass
class BlockReport:
    """One candidate block: attention output drift (relative L2) before / after distillation, and
    the model's top-1 agreement and logit KL with the original when only this block is converted."""

    index: int
    drift_init: float
    drift: float
    agreement_alone: float
    kl_alone: float
    converted: bool = False


@dataclasses.dataclass
class Calibration:
    """Result of `calibrate`: the live injection handle and what was measured (all on held-out images)."""

    handle: InjectionHandle
    variant: Agent
    blocks: tuple[int, ...]
    reports: list[BlockReport]
    agreement_plain: float  # every candidate block converted at zero init (the from-scratch configuration)
    agreement_distilled_all: float  # every candidate block, after distillation
    agreement: float  # the chosen blocks, after distillation (and refinement)
    kl: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("handle", "variant", "reports")}
        d["variant"] = dataclasses.asdict(self.variant)
        d["reports"] = [dataclasses.asdict(r) for r in self.reports]
        return d


def _batches(images: torch.Tensor | Iterable, batch_size: int) -> torch.Tensor:
    """All calibration images as one tensor (labels, if the iterable yields (x, y), are ignored)."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        parts = [b[0] if isinstance(b, (tuple, list)) else b for b in images]
        if not parts:
            raise ValueError("calibrate(images=...): no images")
        x = torch.cat(parts)
    if x.ndim != 4:
        raise ValueError(f"calibrate(images=...): expected [N, C, H, W] images, got shape {tuple(x.shape)}")
    if x.shape[0] < 4:
        raise ValueError(f"calibrate(images=...): need at least 4 images, got {x.shape[0]}")
    return x


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _compare(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || logits)) between two logit tensors."""
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return agree, kl


class _Swap:
    """Put chosen replacements' original modules back (teacher) or the agent modules (student)."""

    def __init__(self, handle: InjectionHandle, index: list[int]) -> None:
        self.reps = {i: r for i, r in zip(index, handle.replacements)}

    def set(self, converted: Iterable[int]) -> None:
        converted = set(converted)
        for i, r in self.reps.items():
            r.parent._modules[r.name] = r.new if i in converted else r.old


def _capture(swap: _Swap, model: nn.Module, x: torch.Tensor) -> dict[int, tuple[tuple, dict, torch.Tensor]]:
    """Run the original model on x; per block: the attention's (args, kwargs, output)."""
    seen: dict[int, tuple[tuple, dict, torch.Tensor]] = {}
    hooks = []
    for i, r in swap.reps.items():

        def hook(_m, args, kwargs, out, i=i):
            seen[i] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs), out.detach())

        hooks.append(r.old.register_forward_hook(hook, with_kwargs=True))
    swap.set(())
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _drift(swap: _Swap, seen: dict) -> dict[int, float]:
    out = {}
    with torch.no_grad():
        for i, (args, kwargs, y) in seen.items():
            out[i] = ((swap.reps[i].new(*args, **kwargs) - y).norm() / y.norm().clamp_min(1e-12)).item()
    return out


def calibrate(
    model: nn.Module,
    variant: Agent,
    images: torch.Tensor | Iterable,
    *,
    min_agreement: float = 0.98,
    max_drift: float | None = None,
    distill_steps: int = 300,
    kd_steps: int = 0,
    lr: float = 5e-3,
    batch_size: int = 32,
    holdout: float = 0.25,
    seed: int = 0,
    log=None,
) -> Calibration:
    """Convert `model` (a trained timm ViT-family model, changed in place) to agent attention in the
    blocks it tolerates; returns a `Calibration` whose `handle.remove()` restores the original.

    variant: the Agent configuration (its `blocks` are the candidates, None = every block);
    images: unlabelled images [N, 3, H, W] already normalised for the model (or an iterable of
    batches / (x, y) pairs); min_agreement in [0, 1]: top-1 agreement with the original the
    converted model must keep on the held-out images; max_drift: optional upper bound on a block's
    relative attention-output error after distillation; distill_steps / kd_steps: Adam steps of
    per-block distillation / logit self-distillation; holdout in (0, 1): fraction of images kept
    for measuring (never trained on).
    """
    t0 = time.perf_counter()
    say = log or (lambda *_: None)
    if not isinstance(variant, Agent):
        raise TypeError(f"calibrate(variant=...) expects a vision_attn.Agent instance, got {type(variant).__name__}")
    if not 0.0 <= min_agreement <= 1.0 or math.isnan(min_agreement):
        raise ValueError(f"calibrate: min_agreement must be in [0, 1], got {min_agreement}")
    if max_drift is not None and not max_drift > 0:
        raise ValueError(f"calibrate: max_drift must be > 0 or None, got {max_drift}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"calibrate: holdout must be in (0, 1), got {holdout}")
    for name, v in (("distill_steps", distill_steps), ("kd_steps", kd_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"calibrate: {name} must be an int >= 0, got {v!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"calibrate: lr must be a finite number > 0, got {lr}")
    if not hasattr(model, "blocks"):
        raise ValueError(
            f"calibrate: {type(model).__name__} is not a ViT-family model (Agent.blocks); Swin is not supported"
        )
    x_all = _batches(images, batch_size)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x_all.shape[0], generator=g)
    n_hold = max(2, int(round(holdout * x_all.shape[0])))
    x_hold, x_train = x_all[perm[:n_hold]].to(device), x_all[perm[n_hold:]].to(device)
    was_training = model.training
    model.eval()
    ref = _logits(model, x_hold, batch_size)
    t_logits = _logits(model, x_train, batch_size) if kd_steps else None  # the original model is the teacher

    candidates = list(range(len(model.blocks))) if variant.blocks is None else list(variant.blocks)
    handle = inject(model, dataclasses.replace(variant, blocks=tuple(candidates)))
    swap = _Swap(handle, candidates)
    params = list(handle.new_parameters().values())  # read while the agent modules are in the model
    try:
        swap.set(candidates)
        plain, _ = _compare(_logits(model, x_hold, batch_size), ref)
        seen_hold = _capture(swap, model, x_hold[:batch_size])
        drift_init = _drift(swap, seen_hold)

        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, distill_steps))
        for step in range(distill_steps):
            idx = torch.randint(0, x_train.shape[0], (min(batch_size, x_train.shape[0]),), generator=g)
            seen = _capture(swap, model, x_train[idx.to(x_train.device)])
            loss = sum(
                (swap.reps[i].new(*a, **kw) - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12)
                for i, (a, kw, y) in seen.items()
            ) / len(seen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0 or step == distill_steps - 1:
                say(f"distil step {step}: mean relative MSE {loss.item():.4f}")
        drift = _drift(swap, seen_hold)
        swap.set(candidates)
        all_agree, _ = _compare(_logits(model, x_hold, batch_size), ref)

        reports = []
        for i in candidates:
            swap.set([i])
            agree, kl = _compare(_logits(model, x_hold, batch_size), ref)
            reports.append(BlockReport(i, drift_init[i], drift[i], agree, kl))
        chosen: list[int] = []
        for r in sorted(reports, key=lambda r: (r.kl_alone, r.drift)):
            if max_drift is not None and r.drift > max_drift:
                continue
            swap.set([*chosen, r.index])
            agree, _ = _compare(_logits(model, x_hold, batch_size), ref)
            if agree >= min_agreement:
                chosen.append(r.index)
        chosen.sort()
        say(f"blocks converted: {chosen} of {candidates}")
        swap.set(candidates)
        states = {i: {k: v.detach().clone() for k, v in swap.reps[i].new.state_dict().items()} for i in candidates}
    finally:
        swap.set(candidates)
        handle.remove()
    final_variant = dataclasses.replace(variant, blocks=tuple(chosen))
    if not chosen:
        model.train(was_training)
        raise ValueError(
            f"calibrate: no block keeps top-1 agreement >= {min_agreement} when converted "
            f"(best alone: {max(r.agreement_alone for r in reports):.3f}); lower min_agreement or distil longer"
        )
    handle = inject(model, final_variant)
    for i, r in zip(chosen, handle.replacements):
        r.new.load_state_dict(states[i])
    if kd_steps:
        params = list(handle.new_parameters().values())
        opt = torch.optim.Adam(params, lr=lr * 0.2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, kd_steps)
        for step in range(kd_steps):
            idx = torch.randint(0, x_train.shape[0], (min(batch_size, x_train.shape[0]),), generator=g)
            idx = idx.to(x_train.device)
            out = model(x_train[idx])
            loss = F.kl_div(out.log_softmax(-1), t_logits[idx].log_softmax(-1), log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0 or step == kd_steps - 1:
                say(f"self-distillation step {step}: KL {loss.item():.4f}")
    agree, kl = _compare(_logits(model, x_hold, batch_size), ref)
    for r in reports:
        r.converted = r.index in chosen
    model.train(was_training)
    return Calibration(
        handle, final_variant, tuple(chosen), reports, plain, all_agree, agree, kl, time.perf_counter() - t0
    )


# --------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vision_attn.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="timm ViT-family model name")
    p.add_argument("--pretrained-file", required=True, help="the trained model's local checkpoint")
    p.add_argument("--data", required=True, help="a folder of images (class sub-folders allowed; labels unused)")
    p.add_argument("--variant", default="agent:num_agents=16", help="agent:num_agents=...,blocks=(...) candidates")
    p.add_argument("--out", default="runs/calibrated")
    p.add_argument("--num-classes", type=int, required=True, help="the checkpoint's number of classes")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--model-kwargs", default=None, help="JSON of extra timm.create_model kwargs")
    p.add_argument("--transform", default="simple", choices=("simple", "timm"), help="evaluation transform family")
    p.add_argument("--max-images", type=int, default=512)
    p.add_argument("--min-agreement", type=float, default=0.98)
    p.add_argument("--max-drift", type=float, default=None)
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--kd-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file
    from torchvision.datasets import ImageFolder

    args = parser().parse_args(argv)
    try:
        variant = parse_variant(args.variant)
        if not isinstance(variant, Agent):
            raise UsageError(f"--variant: calibrate converts to agent attention, got {args.variant!r}")
        kwargs = _model_kwargs(args.model_kwargs)
        model = build_model(args.model, args.num_classes, img_size=args.img_size, model_kwargs=kwargs,
                            pretrained_file=args.pretrained_file)  # fmt: skip
        cfg = data_config(model, args.img_size)
        if not Path(args.data).is_dir():
            raise UsageError(f"--data: {args.data} is not a directory")
        ds = ImageFolder(args.data, transform=make_transform(cfg, args.transform, training=False))
        n = min(len(ds), args.max_images)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:n]
        images = torch.stack([ds[int(i)][0] for i in idx])
        torch.manual_seed(args.seed)
        result = calibrate(
            model, variant, images, min_agreement=args.min_agreement, max_drift=args.max_drift,
            distill_steps=args.distill_steps, kd_steps=args.kd_steps, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, log=print,
        )  # fmt: skip
    except (UsageError, SpecError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    usual_permissions(out / "model.safetensors")
    spec = variant_spec(result.variant)
    config = {
        "model": args.model, "num_classes": args.num_classes, "img_size": args.img_size, "model_kwargs": kwargs,
        "variant": spec, "classes": None, "transform": args.transform, "data_config": cfg,
        "new_parameters": result.handle.new_parameter_names, "args": vars(args),
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "reports"}))
    print(f"variant spec for fine-tuning: --variant '{spec}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

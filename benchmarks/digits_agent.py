"""Agent attention on trained models, measured on scikit-learn's bundled handwritten digits.

    pip install -e ".[eval]"                       # scikit-learn (the digits ship inside it)
    python benchmarks/digits_agent.py              # ~15 min on 2 CPU cores -> results/digits_agent.json
    python benchmarks/digits_agent.py --smoke      # a minute: tiny settings, writes to --out

Data: the 1,797 8x8 digits upsampled (bilinear) to 32x32, 80/20 split (seed 0), written as an
ImageFolder. Models, trained from scratch here with `python -m vision_attn.finetune` (no weights are
downloaded): the digits ViT (patch 4 -> 64 tokens + class token, depth 6, width 96, 3 heads) and
a register-token ViT with global average pooling (timm's vit_medium_patch16_reg4_gap_256 family at
patch 4, depth 6, width 128, 4 heads, 4 register tokens). Each trained model is then converted:

* plain `inject(model, Agent(num_agents=n))`, zero-initialised (the paper's from-scratch config);
* `vision_attn.calibrate` (unlabelled train images only): distillation of the new biases / DWC,
  per-block sensitivity, blocks chosen for >= --min-agreement, optional logit self-distillation;
* a short fine-tune (`--max-steps`, labels) of the plain and of the calibrated conversion.

Reported on the 360 validation digits: top-1 accuracy and agreement with the original model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "digits_vit": (
        "vit_tiny_patch16_224",
        {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3},
    ),
    "reg4_gap_vit": (
        "vit_medium_patch16_reg4_gap_256",
        {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4},
    ),
}


def write_digits(root: Path) -> dict:
    """The digits as 32x32 PNG ImageFolder train/ and val/ (80/20, seed 0)."""
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    idx_train, idx_val = train_test_split(range(len(x)), test_size=0.2, random_state=0)
    for split, idx in (("train", idx_train), ("val", idx_val)):
        for i in idx:
            folder = root / split / str(int(d.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0] * 255).round().to(torch.uint8).numpy(), mode="L").convert("RGB").save(
                folder / f"{i}.png"
            )
    return {"train": len(idx_train), "val": len(idx_val)}


def tensors(root: Path, split: str, model) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import ImageFolder

    from vision_attn.finetune import data_config, make_transform

    ds = ImageFolder(str(root / split), transform=make_transform(data_config(model, 32), "simple", training=False))
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def scores(model, x, y, ref_pred=None) -> dict:
    model.eval()
    pred = torch.cat([model(x[i : i + 128]).argmax(-1) for i in range(0, len(x), 128)])
    out = {"top1": (pred == y).float().mean().item()}
    if ref_pred is not None:
        out["agreement"] = (pred == ref_pred).float().mean().item()
    return out, pred


def finetune(args_list: list[str]) -> dict:
    from vision_attn.finetune import main

    t = time.perf_counter()
    rc = main([*args_list, "--cpu", "--quiet"])
    if rc != 0:
        raise SystemExit(f"finetune failed ({rc}): {args_list}")
    out = Path(args_list[args_list.index("--out") + 1])
    metrics = json.loads((out / "metrics.json").read_text())
    return {"val_top1": metrics.get("val_top1"), "steps": metrics["steps"], "params_trained": metrics["params_trained"],
            "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip


def run_model(key: str, data: Path, work: Path, a) -> dict:
    from safetensors.torch import save_file

    import vision_attn as va
    from vision_attn.calibrate import calibrate

    base, kw = MODELS[key]
    common = ["--model", base, "--model-kwargs", json.dumps(kw), "--img-size", "32", "--data", str(data),
              "--transform", "simple", "--batch-size", "64", "--seed", "0"]  # fmt: skip
    res: dict = {"timm_model": base, "model_kwargs": kw}
    run = work / f"{key}_scratch"
    res["train_from_scratch"] = finetune([*common, "--out", str(run), "--epochs", str(a.epochs), "--lr", "2e-3",
                                          "--warmup-steps", "50", "--weight-decay", "0.05"])  # fmt: skip
    model = va.load_finetuned(run)
    x_tr, _ = tensors(data, "train", model)  # labels of the train split are not used below
    x_val, y_val = tensors(data, "val", model)
    orig, ref = scores(model, x_val, y_val)
    res["original"] = orig
    res["reload_top1_matches_training_run"] = abs(orig["top1"] - res["train_from_scratch"]["val_top1"]) < 1e-6

    plain = {}
    for n in a.agents:
        h = va.inject(model, va.Agent(num_agents=n))
        plain[str(n)], _ = scores(model, x_val, y_val, ref)
        h.remove()
    res["plain_conversion_all_blocks"] = plain
    per_block = {}
    for i in range(len(model.blocks)):
        h = va.inject(model, va.Agent(num_agents=a.num_agents, blocks=(i,)))
        per_block[str(i)], _ = scores(model, x_val, y_val, ref)
        h.remove()
    res[f"plain_conversion_one_block_n{a.num_agents}"] = per_block

    cal_runs = {}
    for label, kd in (("distill", 0), ("distill+kd", a.kd_steps)):
        torch.manual_seed(0)
        cal = calibrate(model, va.Agent(num_agents=a.num_agents), x_tr, min_agreement=a.min_agreement,
                        distill_steps=a.distill_steps, kd_steps=kd, seed=0)  # fmt: skip
        s, _ = scores(model, x_val, y_val, ref)
        cal_runs[label] = {"val": s, **{k: v for k, v in cal.to_dict().items()}}
        if label == "distill+kd":
            out = work / f"{key}_calibrated"
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
            spec = va.variant_spec(cal.variant)
        cal.handle.remove()
    res["calibrated"] = cal_runs

    src = run / "model.safetensors"
    short = ["--max-steps", str(a.ft_steps), "--lr", "3e-4", "--warmup-steps", "5", "--weight-decay", "0.0"]
    spec_all = f"agent:num_agents={a.num_agents}"
    res["short_finetune"] = {
        "plain_all_blocks_full": finetune([*common, *short, "--variant", spec_all, "--pretrained-file", str(src),
                                           "--out", str(work / f"{key}_ft_plain")]),
        "plain_all_blocks_train_only_new": finetune([*common, *short, "--variant", spec_all, "--pretrained-file",
                                                     str(src), "--train-only-new", "--lr", "1e-2",
                                                     "--out", str(work / f"{key}_ft_plain_new")]),
        "calibrated_full": finetune([*common, *short, "--variant", spec, "--pretrained-file",
                                     str(work / f"{key}_calibrated" / "model.safetensors"),
                                     "--out", str(work / f"{key}_ft_cal")]),
        "calibrated_variant": spec,
    }  # fmt: skip
    ft_model = va.load_finetuned(work / f"{key}_ft_cal")
    res["short_finetune"]["calibrated_full_reloaded"], _ = scores(ft_model, x_val, y_val, ref)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny settings to check the script")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--agents", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--num-agents", type=int, default=16)
    ap.add_argument("--min-agreement", type=float, default=0.98)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--kd-steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=88)
    a = ap.parse_args(argv)
    if a.smoke:
        a.epochs, a.distill_steps, a.kd_steps, a.ft_steps, a.models, a.agents = 1, 5, 5, 3, ["digits_vit"], [16]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    report = {
        "benchmark": "digits_agent",
        "command": " ".join(["python benchmarks/digits_agent.py", *(sys.argv[1:] if argv is None else argv)]),
        "smoke": a.smoke,
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "sklearn": __import__("sklearn").__version__,
        },  # fmt: skip
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        report["split"] = write_digits(data)
        report["models"] = {key: run_model(key, data, Path(tmp), a) for key in a.models}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    name = (
        "digits_agent" + ("_smoke" if a.smoke else "") + ("" if a.models == list(MODELS) else "_" + "_".join(a.models))
    )
    name += ".json"
    (a.out / name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1)[:4000])
    return report


if __name__ == "__main__":
    main()

"""Train the world's timm classifiers with `python -m vision_attn.finetune` (accelerate, seeded) and ship them.

    pip install -e ".[eval]"                                   # digits need scikit-learn
    python -m attn_pipelines.world.train_vision               # all four, ~25 min on 1 CPU thread
    python -m attn_pipelines.world.train_vision --only classifier --dest /tmp/x --smoke

Checkpoints (`models.CLASSIFIERS`): `classifier` (resnet10t on the 18 colour x shape classes:
the attribute classifier that scores generated videos, and the CNN of the CA / ECA benchmark),
`vit_shapes` (a 6-block ViT, patch 4, on the same set: the agent-attention benchmark), and the same
two architectures on scikit-learn's digits (`cnn_digits`, `vit_digits`). Each lands in
`--dest/<name>/` as finetune writes it (`config.json`, `model.safetensors`, `metrics.json`,
loadable with `vision_attn.load_finetuned`) plus `MODEL_CARD.md`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from vision_attn.finetune import main as finetune

from .common import Timer, environment, model_card, setup_threads, write_json
from .models import CLASSIFIERS, world_dir
from .vision import digits_available, write_dataset

__all__ = ["RECIPES", "main", "train_one"]

#: finetune arguments per architecture (from scratch; no weights are downloaded)
RECIPES = {
    "resnet10t": ["--epochs", "10", "--lr", "3e-3", "--warmup-steps", "50", "--weight-decay", "0.01"],
    "vit_tiny_patch16_224": ["--epochs", "12", "--lr", "1e-3", "--warmup-steps", "100", "--weight-decay", "0.05"],
}
#: per-checkpoint changes to its architecture's recipe (the digits set is 6x smaller: more epochs)
EPOCHS = {"vit_digits": "60", "cnn_digits": "30"}


def train_one(name: str, data: Path, dest: Path, *, smoke: bool = False, seed: int = 0) -> dict:
    """Train checkpoint `name` of `CLASSIFIERS` on the ImageFolder `data`; copy it to `dest/name`."""
    spec = CLASSIFIERS[name]
    recipe = list(RECIPES[spec["model"]])
    if name in EPOCHS:
        recipe[recipe.index("--epochs") + 1] = EPOCHS[name]
    if smoke:
        recipe += ["--max-steps", "3"]
    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / name
        argv = ["--model", spec["model"], "--model-kwargs", json.dumps(spec["kwargs"]), "--img-size", "32",
                "--data", str(data), "--transform", "simple", "--batch-size", "64", "--seed", str(seed),
                "--out", str(run), "--cpu", "--quiet", *recipe]  # fmt: skip
        rc = finetune(argv)
        if rc != 0:
            raise SystemExit(f"finetune failed ({rc}) for {name}: {argv}")
        target = dest / name
        target.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((run / "config.json").read_text())
        cfg["args"]["data"] = f"<{spec['data']} ImageFolder written by attn_pipelines.world.vision>"
        cfg["args"]["out"] = str(Path("assets/world") / name)
        write_json(target / "config.json", cfg)
        shutil.copy(run / "model.safetensors", target / "model.safetensors")
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("history", None)
        write_json(target / "metrics.json", metrics)
    command = "python -m attn_pipelines.world.train_vision --only " + name
    temp = ("--data", "--out")
    shown = " ".join(x for i, x in enumerate(argv) if x not in temp and argv[i - 1] not in temp)
    model_card(
        target / "MODEL_CARD.md",
        f"{name}: {spec['model']} on {spec['data']} ({spec['role']})",
        {
            "What": f"timm `{spec['model']}` with {spec['kwargs'] or 'its default'} kwargs, 32 x 32 input, "
            f"{cfg['num_classes']} classes ({', '.join(cfg['classes'][:6])}, ...), trained from scratch.",
            "Data": "18 colour x shape classes from `attn_pipelines.world.data.class_sample(0, i)` (train 0..8999, val "
            "9000..10799)"
            if spec["data"] == "shapes"
            else "scikit-learn's bundled digits, 32 x 32, 80/20 split with random_state=0 (train 1437, val 360)",
            "Training": {"command": f"`{command}`", "finetune args": f"`{shown}`", "seconds": round(timer.elapsed)},
            "Result": {"validation top-1": metrics.get("val_top1"), "steps": metrics.get("steps")},
            "Load": f'`vision_attn.load_finetuned("assets/world/{name}")`',
        },
    )
    return {"name": name, "val_top1": metrics.get("val_top1"), "seconds": round(timer.elapsed, 1)}


def parser() -> argparse.ArgumentParser:
    prog = "python -m attn_pipelines.world.train_vision"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(CLASSIFIERS), help="train only these (repeatable)")
    p.add_argument("--dest", default=None, help="folder of the checkpoints (default: assets/world)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="3 steps on a few hundred images (tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_threads(a.threads)
    dest = Path(a.dest) if a.dest else world_dir()
    names = a.only or list(CLASSIFIERS)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        written: dict[str, Path] = {}
        for name in names:
            data = CLASSIFIERS[name]["data"]
            if data == "digits" and not digits_available():
                print(f"skip {name}: the digits need scikit-learn (pip install -e '.[eval]')", file=sys.stderr)
                continue
            if data not in written:
                written[data] = Path(tmp) / data
                write_dataset(data, written[data], smoke=a.smoke)
            results.append(train_one(name, written[data], dest, smoke=a.smoke))
            print(json.dumps(results[-1]), flush=True)
    if not a.smoke:  # one row per checkpoint, kept across partial runs
        log = dest / "vision_training.json"
        rows = json.loads(log.read_text())["results"] if log.is_file() else []
        rows = [r for r in rows if r["name"] not in {x["name"] for x in results}] + results
        write_json(log, {"results": sorted(rows, key=lambda r: r["name"]), **environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

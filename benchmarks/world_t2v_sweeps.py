"""Sweeps for the world's text-to-video recipe (issue 23): learning rate, batch and caption dropout, one at a time
from the centre, at an equal budget of training clips, each run's training-time accuracy curve.

    python benchmarks/world_t2v_sweeps.py --work /work/runs/t2v_sweeps --vae VAE train [RUN ...]  # one after another
    python benchmarks/world_t2v_sweeps.py --work /work/runs/t2v_sweeps --vae VAE collect          # -> JSON + PNG

What is swept is the recipe that retrains the shipped transformer onto a new VAE's latents: every run starts from
the same pipeline (`--init`, by default the shipped `assets/world/t2v`) and the same encoded clips (5,000, encoded
once with `--vae` and linked into each run's folder), and gets `BUDGET_SAMPLES` training clips (steps x batch, so a
run at batch 64 takes half the steps of one at 32), a cosine schedule with 5% warm-up, EMA 0.999 (warmed up), and
the accuracy of its EMA weights on the 24 training-time prompts (seed 0, 20 steps, guidance 5) at every quarter
of its steps. `train` runs `python -m attn_pipelines.world.train_t2v` for each named run (all of `RUNS` when none
is named), 1 thread each; rerunning resumes (train_t2v's `state.pt`) and a finished run is only read, so two
shells can share the list (`train centre lr_2.5e-4 ...` in one, the rest in the other). `collect` writes
`benchmarks/results/world_t2v_sweeps.json` (device, versions, settings, each run's command and curve) and its plot.
The guidance scale is swept apart, on a trained model: `benchmarks/world_t2v_guidance.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "world_t2v_sweeps.json"
BUDGET_SAMPLES = 200 * 32
BUDGET_EVALS = 4
CLIPS, SEED, TWO_OBJECT_PROB = 5000, 0, 0.2
#: the shipped model's recipe (assets/world/t2v/MODEL_CARD.md), which every run varies one setting of
CENTRE: dict[str, Any] = {"lr": 5e-4, "batch_size": 32, "caption_dropout": 0.1}
#: run name -> (the setting it varies, its value); "centre" is the centre itself
RUNS: dict[str, tuple[str | None, Any]] = {
    "centre": (None, None),
    "lr_2.5e-4": ("lr", 2.5e-4),
    "lr_1e-3": ("lr", 1e-3),
    "batch_16": ("batch_size", 16),
    "batch_64": ("batch_size", 64),
    "dropout_0": ("caption_dropout", 0.0),
    "dropout_0.25": ("caption_dropout", 0.25),
}
BEST_KEYS = ("step", "attr_acc", "direction_acc", "score")
CURVE_KEYS = ("step", "color_acc", "shape_acc", "attr_acc", "direction_acc", "moves", "score", "loss_avg", "s")


def settings(run: str) -> dict[str, Any]:
    key, value = RUNS[run]
    s = {**CENTRE, **({key: value} if key else {})}
    s["steps"] = BUDGET_SAMPLES // s["batch_size"]
    s["eval_every"] = s["steps"] // BUDGET_EVALS
    s["warmup"] = max(1, s["steps"] // 20)
    return s


def command(work: Path, run: str, vae: Path, init: Path) -> list[str]:
    s = settings(run)
    return [sys.executable, "-m", "attn_pipelines.world.train_t2v", "--vae", str(vae), "--init-pipeline", str(init),
            "--out", str(work / run), "--threads", "1", "--steps", str(s["steps"]), "--batch-size",
            str(s["batch_size"]), "--lr", str(s["lr"]), "--warmup", str(s["warmup"]), "--caption-dropout",
            str(s["caption_dropout"]), "--clips", str(CLIPS), "--seed", str(SEED), "--two-object-prob",
            str(TWO_OBJECT_PROB), "--eval-every", str(s["eval_every"]), "--save-every", str(s["eval_every"]),
            "--ema", "0.999"]  # fmt: skip


def shared_latents(work: Path, vae: Path) -> Path:
    """The 5,000 clips encoded once by `vae` (what train_t2v would encode in each run's folder)."""
    sys.path.insert(0, str(ROOT))
    from attn_pipelines.world.common import setup_threads
    from attn_pipelines.world.train_t2v import cached_latents, latent_cache

    path = latent_cache(work, SEED, CLIPS, TWO_OBJECT_PROB)
    if not path.is_file():
        setup_threads(1)
        cached_latents(path, vae, SEED, CLIPS, TWO_OBJECT_PROB)
    return path


def train(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from attn_pipelines.world.common import run_sweep

    def prepare(run: str) -> None:  # the shared encoded clips, linked into the run's folder
        latents = shared_latents(a.work, a.vae)
        link = a.work / run / latents.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(latents.resolve())

    run_sweep(a.work, a.runs, RUNS, lambda run: settings(run)["steps"], prepare,
              lambda run: command(a.work, run, a.vae, a.init), ROOT)  # fmt: skip


def collect(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from attn_pipelines.world.common import environment

    runs = {}
    for run, (key, value) in RUNS.items():
        m = a.work / run / "metrics.json"
        if not m.is_file():
            continue
        metrics = json.loads(m.read_text())
        cmd = command(a.work, run, a.vae, a.init)
        runs[run] = {"varies": key, "value": value, "settings": settings(run),
                     "command": "python -m attn_pipelines.world.train_t2v " + " ".join(cmd[3:]),
                     "steps_done": metrics["steps"], "seconds": metrics["seconds"],
                     "curve": [{k: e.get(k) for k in CURVE_KEYS} for e in metrics["evals"]],
                     "best": {k: metrics["best"].get(k) for k in BEST_KEYS}}  # fmt: skip
    res = {"what": "world text-to-video recipe, retraining the shipped transformer and text encoder onto a new "
                   "VAE's latents: one setting varied at a time from the centre, equal budget "
                   f"({BUDGET_SAMPLES} training clips per run), training-time accuracy of the EMA weights on the 24 "
                   "fixed one-object prompts (seed 0, 20 steps, guidance 5); score = colour+shape + direction",
           "script": "python benchmarks/world_t2v_sweeps.py --work WORK --vae VAE train && ... collect",
           "vae": str(a.vae), "init": str(a.init), "device": "CPU, 1 thread per run (2-core machine, 2 jobs)",
           "centre": CENTRE, "budget_samples": BUDGET_SAMPLES, "clips": CLIPS, "runs": runs,
           **environment()}  # fmt: skip
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    plot(res)
    for run, r in runs.items():
        last = r["curve"][-1] if r["curve"] else {}
        print(
            f"{run:13s} last c+s {last.get('attr_acc')} dir {last.get('direction_acc')}  best {r['best']}  "
            f"({r['seconds']:.0f} s)"
        )


def plot(res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    keys = [k for k in CENTRE if any(r["varies"] == k for r in runs.values())]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        members = [run for run, r in runs.items() if r["varies"] in (None, key)]
        for i, run in enumerate(members):
            r = runs[run]
            x = [e["step"] * r["settings"]["batch_size"] for e in r["curve"]]
            label = f"{key}={r['settings'][key]}" + (" (centre)" if r["varies"] is None else "")
            ax.plot(x, [e["attr_acc"] for e in r["curve"]], marker="o", color=f"C{i}", label=label)
            ax.plot(x, [e["direction_acc"] for e in r["curve"]], ls="--", color=f"C{i}", alpha=0.6)
        ax.set_title(f"{key} (solid: colour+shape, dashed: direction)", fontsize=9)
        ax.set_xlabel("training clips")
        ax.set_ylabel("accuracy, 24 prompts")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="one folder per run, and the shared encoded clips")
    p.add_argument("--vae", type=Path, required=True, help="the VAE whose latents every run trains on")
    p.add_argument(
        "--init", type=Path, default=ROOT / "assets" / "world" / "t2v", help="the pipeline all runs start from"
    )
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("runs", nargs="*")
    sub.add_parser("collect")
    a = p.parse_args(argv)
    {"train": train, "collect": collect}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

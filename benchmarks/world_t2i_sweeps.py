"""Sweeps for the world's text-to-image model (issue 23): one setting varied at a time, equal budget, each
run's training-time accuracy curve; and guidance scale at inference on a trained model.

    python benchmarks/world_t2i_sweeps.py --work /work/runs/t2i_sweeps train [RUN ...]   # one run at a time
    python benchmarks/world_t2i_sweeps.py --work /work/runs/t2i_sweeps collect           # -> JSON + PNG
    python benchmarks/world_t2i_sweeps.py --work /work/runs/t2i_sweeps guidance --model assets/world/t2i

`train` runs `python -m attn_pipelines.world.train_t2i` for each named run (all of `RUNS` when none is named),
one after the other, 1 thread each, in `WORK/<run>`. Every run starts from the same VAE (`--vae`, copied) and
the same encoded scenes, and gets the same budget: `BUDGET_SAMPLES` training images (steps x batch, so a run
at batch 32 takes half the steps) with the accuracy of its EMA weights on the 24 training-time prompts (seed 0,
20 steps, guidance 5) every `BUDGET_EVALS`-th of its steps. Rerunning resumes (train_t2i's `state.pt`); a
finished run is only read. `collect` writes `benchmarks/results/world_t2i_sweeps.json` (device, versions,
settings and per-run curve) and its plot. `guidance` generates all 72 one-object prompts with `--model` at each
guidance scale (seed 0, 20 steps) and adds the accuracy per scale to the same JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "world_t2i_sweeps.json"
BUDGET_SAMPLES = 1200 * 16
BUDGET_EVALS = 6
#: the centre every sweep varies one setting of (max_sequence_length: the zero T5 positions; text_lr None: --lr).
#: The first centre had max_sequence_length 0; after the t5 comparison (256 drew colour+shape better) it is 256,
#: and text_frozen, run against the first centre, keeps max_sequence_length 0 (its settings say so).
CENTRE: dict[str, Any] = {
    "max_sequence_length": 256,
    "lr": 1e-3,
    "text_lr": None,
    "sigma_shift": 1.0,
    "batch_size": 16,
    "caption_dropout": 0.1,
}
#: run name -> (the setting it varies, the settings it changes from the centre); "centre" is the centre itself
RUNS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "centre": (None, {}),
    "t5_0": ("max_sequence_length", {"max_sequence_length": 0}),
    "t5_1": ("max_sequence_length", {"max_sequence_length": 1}),
    "text_frozen": ("text_lr", {"text_lr": 0.0, "max_sequence_length": 0}),
    "shift_3": ("sigma_shift", {"sigma_shift": 3.0}),
    "lr_3e-4": ("lr", {"lr": 3e-4}),
    "lr_3e-3": ("lr", {"lr": 3e-3}),
    "batch_32": ("batch_size", {"batch_size": 32}),
    "batch_8": ("batch_size", {"batch_size": 8}),
    "dropout_0": ("caption_dropout", {"caption_dropout": 0.0}),
    "dropout_0.25": ("caption_dropout", {"caption_dropout": 0.25}),
}
GUIDANCE = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0)


def settings(run: str) -> dict[str, Any]:
    s = {**CENTRE, **RUNS[run][1]}
    s["steps"] = BUDGET_SAMPLES // s["batch_size"]
    s["eval_every"] = s["steps"] // BUDGET_EVALS
    return s


def command(work: Path, run: str) -> list[str]:
    s = settings(run)
    cmd = [sys.executable, "-m", "attn_pipelines.world.train_t2i", "--out", str(work / run), "--threads", "1",
            "--steps", str(s["steps"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
            "--caption-dropout", str(s["caption_dropout"]), "--max-sequence-length", str(s["max_sequence_length"]),
            "--eval-every", str(s["eval_every"])]  # fmt: skip
    cmd += ["--sigma-shift", str(s["sigma_shift"])]
    return cmd + ([] if s["text_lr"] is None else ["--text-lr", str(s["text_lr"])])


def prepare(work: Path, run: str, vae: Path, latents: Path | None) -> None:
    """The shared VAE (and its metrics) and, when given, the shared encoded scenes in the run's folder."""
    d = work / run
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "vae").is_dir():
        shutil.copytree(vae, d / "vae")
        metrics = vae.parent / "vae_metrics.json"
        if metrics.is_file():
            shutil.copy(metrics, d / "vae_metrics.json")
    if latents is not None and not (d / latents.name).exists():
        (d / latents.name).symlink_to(latents.resolve())


def train(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from attn_pipelines.world.common import run_sweep

    run_sweep(a.work, a.runs, RUNS, lambda run: settings(run)["steps"],
              lambda run: prepare(a.work, run, a.vae, a.latents), lambda run: command(a.work, run), ROOT)  # fmt: skip


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def collect(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from attn_pipelines.world.common import environment

    res = _load()
    runs = {}
    for run in RUNS:
        m = a.work / run / "metrics.json"
        if not m.is_file():
            continue
        metrics = json.loads(m.read_text())
        key, changes = RUNS[run]
        runs[run] = {"varies": key, "value": changes.get(key), "settings": settings(run),
                     "command": "python -m attn_pipelines.world.train_t2i " + " ".join(command(a.work, run)[3:]),
                     "steps_done": metrics["steps"], "seconds": metrics["seconds"],
                     "curve": [{k: e[k] for k in ("step", "color", "shape", "color_shape", "place", "loss_avg", "s")}
                               for e in metrics["evals"]],
                     "best": {k: metrics["best"].get(k) for k in ("step", "color_shape", "place")}}  # fmt: skip
    res.update({"what": "world text-to-image model: one setting varied at a time from the centre, equal budget "
                        f"({BUDGET_SAMPLES} training images per run), training-time accuracy of the EMA weights "
                        "on the 24 fixed one-object prompts (seed 0, 20 steps, guidance 5)",
                "script": "python benchmarks/world_t2i_sweeps.py --work WORK train && ... collect",
                "device": "CPU, 1 thread (2-core machine shared with another training job)",
                "centre": CENTRE, "budget_samples": BUDGET_SAMPLES, "runs": runs, **environment()})  # fmt: skip
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    plot(res)
    for run, r in runs.items():
        last = r["curve"][-1] if r["curve"] else {}
        print(f"{run:14s} best {r['best']}  last {last.get('color_shape')} ({r['seconds']:.0f} s)")


def plot(res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    groups: dict[str, list[str]] = {}
    for run, r in runs.items():
        if r["varies"]:
            groups.setdefault(r["varies"], []).append(run)
    ncol = len(groups) + (1 if "guidance" in res else 0)
    fig, axes = plt.subplots(1, max(1, ncol), figsize=(4 * max(1, ncol), 3.4), squeeze=False)
    for ax, (key, members) in zip(axes[0], groups.items()):
        refs = []  # the run each member differs from in `key` only (the centre, or the first centre for text_frozen)
        for run in members:
            want = {**{k: runs[run]["settings"][k] for k in CENTRE}, key: CENTRE[key]}  # steps follow the batch
            refs += [o for o, r in runs.items() if {k: r["settings"][k] for k in CENTRE} == want and o not in refs]
        for i, run in enumerate(refs + members):
            r = runs[run]
            x = [e["step"] * r["settings"]["batch_size"] for e in r["curve"]]
            label = f"{run}: {key}={r['settings'][key]}"
            ax.plot(x, [e["color_shape"] for e in r["curve"]], marker="o", color=f"C{i}", label=label)
            ax.plot(x, [e["place"] for e in r["curve"]], ls="--", color=f"C{i}", alpha=0.6)
        ax.set_title(f"{key} (solid: colour+shape, dashed: place)", fontsize=9)
        ax.set_xlabel("training images")
        ax.set_ylabel("accuracy, 24 prompts")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    if "guidance" in res:
        ax = axes[0][-1]
        g = res["guidance"]["scales"]
        for k in ("color", "shape", "color_shape", "place"):
            ax.plot([r["guidance"] for r in g], [r[k] for r in g], marker="o", label=k)
        ax.set_title("guidance scale (72 prompts, final model)")
        ax.set_xlabel("guidance scale")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=90)


def guidance(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from attn_pipelines.world.common import environment, setup_threads
    from attn_pipelines.world.models import world_dir
    from attn_pipelines.world.score import AttributeScorer
    from attn_pipelines.world.t2i import load_t2i_pipeline, one_object_prompts, t2i_accuracy, t2i_call_kwargs

    setup_threads(1)
    scorer = AttributeScorer(world_dir() / "classifier")
    pipe = load_t2i_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for g in GUIDANCE:
        t0 = time.perf_counter()
        r = t2i_accuracy(pipe, scorer, one_object_prompts(), guidance=g)
        rows.append({"guidance": g, **{k: round(r[k], 4) for k in ("color", "shape", "color_shape", "place")},
                     "s": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(rows[-1], flush=True)
    res = _load()
    res["guidance"] = {"model": str(a.model), "prompts": 72, "seed": 0, "steps": 20, **t2i_call_kwargs(pipe),
                       "command": f"python benchmarks/world_t2i_sweeps.py --work WORK guidance --model {a.model}",
                       "scales": rows, **environment()}  # fmt: skip
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    if "runs" in res:
        plot(res)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="one folder per run")
    p.add_argument("--vae", type=Path, default=ROOT / "assets" / "world" / "t2i" / "vae", help="the shared VAE")
    p.add_argument("--latents", type=Path, default=None, help="train_t2i's encoded scenes of this VAE (shared)")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("runs", nargs="*")
    sub.add_parser("collect")
    g = sub.add_parser("guidance")
    g.add_argument("--model", type=Path, required=True)
    a = p.parse_args(argv)
    {"train": train, "collect": collect, "guidance": guidance}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

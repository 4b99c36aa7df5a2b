"""Ship a `train_t2i` run: accuracy over all 72 one-object prompts, the pipeline, its model card.

    python -m attn_pipelines.world.publish_t2i --run runs/world_t2i          # best/ -> assets/world/t2i

Reads `--run`'s `best/` (or `--checkpoint`), `metrics.json`, `train_config.json` and `vae_metrics.json`;
generates every one-object prompt (6 colours x 3 shapes x 4 places, seed 0, the CLI's defaults and the
model's own `max_sequence_length`) and scores each requested quadrant with the attribute classifier
(`t2i.t2i_accuracy`); writes `--accuracy-out` (JSON), copies the pipeline folder to `--dest` and writes its
`MODEL_CARD.md` (training command, curve, accuracy, confusion table) and `samples.png` (the 72 images).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import train_t2i
from .accuracy import confusion_markdown
from .common import environment, model_card, setup_threads, write_json
from .data import COLORS, PLACES, SHAPES
from .models import world_dir
from .score import AttributeScorer
from .t2i import load_t2i_pipeline, one_object_prompts, t2i_accuracy, t2i_call_kwargs

__all__ = ["curve_table", "train_command", "sample_grid", "main"]


def curve_table(evals: list[dict[str, Any]]) -> str:
    """Markdown table of the training accuracy curve (24 prompts, seed 0)."""
    lines = ["| step | colour | shape | colour+shape | place | loss (avg) | s |", "|---|---|---|---|---|---|---|"]
    for e in evals:
        lines.append(f"| {e['step']} | {e['color']:.0%} | {e['shape']:.0%} | {e['color_shape']:.0%} | {e['place']:.0%} "
                     f"| {e.get('loss_avg')} | {e.get('s')} |")  # fmt: skip
    return "\n".join(lines)


def train_command(args: dict[str, Any]) -> str:
    """The `train_t2i` command of a run's recorded arguments (`--out` and every argument off its default)."""

    defaults = vars(train_t2i.parser().parse_args(["--out", "x"]))
    parts = ["python -m attn_pipelines.world.train_t2i", f"--out {args['out']}"]
    for k, v in args.items():
        if k != "out" and k in defaults and v != defaults[k] and v is not None:
            parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def sample_grid(images: np.ndarray, path: Path, scale: int = 2) -> Path:
    """The 72 one-object images (`one_object_prompts` order) as one PNG: a row per colour and shape, a column per
    place (top left, top right, bottom left, bottom right), upscaled `scale`x with nearest neighbour."""
    from PIL import Image

    n_places = len(PLACES)
    rows = [
        np.concatenate(list(images[r * n_places : (r + 1) * n_places]), axis=1)
        for r in range(len(COLORS) * len(SHAPES))
    ]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.publish_t2i", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="train_t2i's --out")
    p.add_argument("--checkpoint", type=Path, default=None, help="pipeline folder to ship (default: RUN/best)")
    p.add_argument("--dest", type=Path, default=Path("assets/world/t2i"))
    p.add_argument("--accuracy-out", type=Path, default=Path("benchmarks/results/world_t2i_accuracy.json"))
    p.add_argument("--classifier", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    ckpt = a.checkpoint or a.run / "best"
    if not (ckpt / "model_index.json").is_file():
        raise SystemExit(f"--checkpoint {ckpt}: not a pipeline folder (no model_index.json)")
    setup_threads(a.threads)

    metrics = json.loads((a.run / "metrics.json").read_text())
    cfg = json.loads((a.run / "train_config.json").read_text())
    vae = json.loads((a.run / "vae_metrics.json").read_text())
    scorer = AttributeScorer(a.classifier or world_dir() / "classifier")
    pipe = load_t2i_pipeline(ckpt)
    pipe.set_progress_bar_config(disable=True)
    res = t2i_accuracy(pipe, scorer, one_object_prompts())
    summary = {k: round(res[k], 4) for k in ("color", "shape", "color_shape", "place")}
    both = sum(r["attr_ok"] and r["place_ok"] for r in res["rows"]) / len(res["rows"])
    summary["color_shape_place"] = round(both, 4)
    call = t2i_call_kwargs(pipe)
    write_json(a.accuracy_out, {"checkpoint": str(ckpt), "prompts": 72, "seed": 0, "steps": 20, "guidance": 5.0,
                                **call, **summary, "rows": res["rows"], **environment()})  # fmt: skip
    if a.dest.exists():
        shutil.rmtree(a.dest)
    shutil.copytree(ckpt, a.dest)
    best = metrics.get("best", {})
    args = cfg["args"]
    cmd = train_command(args)
    sample_grid(res["images"], a.dest / "samples.png")
    msl = call.get("max_sequence_length", 256)
    model_card(a.dest / "MODEL_CARD.md", "World text-to-image model (StableDiffusion3Pipeline, trained here)", {
        "What": "A `StableDiffusion3Pipeline` of real diffusers / transformers classes at small sizes: a one-level "
                "`AutoencoderKL` (32 x 32 px -> 4 x 32 x 32), an `SD3Transformer2DModel` (patch 4: an 8 x 8 token "
                "grid, 4 joint blocks, 4 heads x 32), two `CLIPTextModelWithProjection` (3 layers, width 64) and a "
                f"Unigram tokenizer over the world's words; no T5 (the pipeline appends {msl} zero positions: "
                f"`max_sequence_length={msl}`, stored in `t2i_settings.json` and passed by `attnplug generate`, "
                "`t2i.generate` and the eval). It draws a circle, square or triangle in one of six "
                "colours in a named quadrant: \"a red circle at the top left\". Definition: "
                "`attn_pipelines/world/t2i.py`.",
        "Data": "`attn_pipelines.world.data.scene_sample` (seed 0, scenes 0..N-1): one or two shapes, each in its "
                "own quadrant, with tight boxes and masks; captions name colour, shape and place.",
        "Training": f"`{cmd}` (1 CPU thread on a shared 2-core machine; the same command resumes from its "
                    f"`state.pt`). The VAE first ({vae['steps']} steps: "
                    f"held-out PSNR {vae['psnr_db']} dB), then flow matching on its latents with both text encoders; "
                    f"EMA weights. Shipped: step {best.get('step')} of {metrics['steps']} (the best colour+shape "
                    f"on the 24 training-time prompts), {metrics['seconds']:.0f} s in all.",
        "Accuracy curve (24 prompts, seed 0, 20 steps, guidance 5)": curve_table(metrics.get("evals", [])),
        "Result (all 72 one-object prompts, seed 0, the CLI's defaults)":
            f"`python -m attn_pipelines.world.publish_t2i --run {args['out']}`: the attribute classifier on the "
            "requested quadrant (pasted on a 32 x 32 background canvas) reads colour "
            f"{summary['color']:.1%}, shape {summary['shape']:.1%}, colour+shape {summary['color_shape']:.1%}; "
            f"most of the named colour's pixels lie in the named quadrant in {summary['place']:.1%}; all of it "
            f"{summary['color_shape_place']:.1%} (`{a.accuracy_out}`). `samples.png`: the 72 images, a row per "
            "colour and shape (" + ", ".join(f"{c} {s}" for c in COLORS for s in SHAPES) + "), a column per place ("
            + ", ".join(PLACES) + ").\n\nAsked (rows) vs read by the classifier on the requested quadrant "
            "(columns):\n\n" + confusion_markdown(res),
        "Use": "`attnplug generate --out x.png --prompt \"a blue square at the bottom right\"` (no --model: this "
               "model is the CLI's image default); in Python `attn_pipelines.world.t2i.load_t2i_pipeline()`.",
    })  # fmt: skip
    for name in ("train_config.json", "metrics.json", "vae_metrics.json"):
        shutil.copy(a.run / name, a.dest / name)
    print({"shipped": str(ckpt), "to": str(a.dest), **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())

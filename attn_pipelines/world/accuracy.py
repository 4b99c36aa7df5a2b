"""Does the world's text-to-video model draw what it is asked? Attribute accuracy over fixed prompts and seeds.

    python -m attn_pipelines.world.accuracy                                   # the shipped model, 72 + 24 prompts
    python -m attn_pipelines.world.accuracy --model runs/world/t2v/best --out /tmp/acc.json

Two readings of every video, generated with the CLI's defaults (20 steps, guidance 5, seed 0):

* the attribute classifier (`score.AttributeScorer`: colour and shape from the frames' mean class
  probabilities) and the tracked direction of the foreground, against the caption (one-object prompts);
* a colour-segmentation check that does not use the classifier: pixels near the named colour
  (`score.color_mask`) are present in most frames (`present`), and their centroid moves the named
  way (`moves`); for two-object prompts each object is checked this way on its own colour.

One-object prompts (all 72 colour x shape x direction) and two-object prompts are reported apart,
with a confusion table of (asked colour shape) -> (read colour shape). `train_t2v` runs the same
function on `TRAIN_EVAL_PROMPTS` (24 prompts, every colour and direction) to log the accuracy curve
and choose the checkpoint that ships.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import Timer, environment, setup_threads, write_json
from .data import COLORS, DIRECTIONS, SHAPES, parse_caption, single_prompts
from .models import VIDEO, load_world_pipeline, world_dir
from .score import AttributeScorer, color_mask, direction_of

__all__ = ["TRAIN_EVAL_PROMPTS", "two_object_prompts", "generate", "colour_check", "accuracy", "selection_score"]

#: minimum pixels of the named colour for it to count as present in a frame (a drawn shape covers 60-130 px)
MIN_COLOUR_PIXELS = 6


def _train_eval_prompts() -> tuple[str, ...]:
    """24 one-object prompts: every colour with every direction once, shapes rotating (each shape 8 times)."""
    colors, dirs = list(COLORS), list(DIRECTIONS)
    out = []
    for d, direction in enumerate(dirs):
        for c, color in enumerate(colors):
            out.append(f"a {color} {SHAPES[(c + d) % len(SHAPES)]} moving {direction}")
    return tuple(out)


#: the fixed prompts (seed 0) whose accuracy `train_t2v` logs during training
TRAIN_EVAL_PROMPTS = _train_eval_prompts()


def two_object_prompts(n: int = 24) -> list[str]:
    """`n` two-object prompts (distinct colours and shapes, opposite or crossing directions), in a fixed order."""
    colors, dirs = list(COLORS), list(DIRECTIONS)
    out = []
    for i in range(n):
        c1, c2 = colors[i % 6], colors[(i + 1 + i // 6) % 6]
        s1, s2 = SHAPES[i % 3], SHAPES[(i + 1) % 3]
        d1, d2 = dirs[i % 4], dirs[(i // 4 + i + 1) % 4]
        out.append(f"a {c1} {s1} moving {d1} and a {c2} {s2} moving {d2}")
    return out


def generate(pipe: Any, prompt: str, seed: int = 0, steps: int = 20, guidance: float = 5.0) -> np.ndarray:
    """One video [F, H, W, 3] in [0, 1] with the CLI's defaults (the world's clip size)."""
    out = pipe(prompt=prompt, num_inference_steps=steps, num_frames=VIDEO["frames"], height=VIDEO["size"],
               width=VIDEO["size"], guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
               output_type="np").frames[0]  # fmt: skip
    return np.asarray(out, dtype=np.float32)


def colour_check(video: np.ndarray, color: str, direction: str, min_pixels: int = MIN_COLOUR_PIXELS) -> dict:
    """Classifier-free sanity: the named colour is present in most frames and its centroid moves the named way."""
    centers = np.full((len(video), 2), np.nan, dtype=np.float32)
    for t, frame in enumerate(video):
        ys, xs = np.nonzero(color_mask(frame, color))
        if len(xs) >= min_pixels:
            centers[t] = (xs.mean() + 0.5, ys.mean() + 0.5)
    present = float(np.mean(~np.isnan(centers[:, 0])))
    moved = direction_of(centers)
    return {"present_frac": present, "present": present >= 0.5, "colour_direction": moved,
            "moves": present >= 0.5 and moved == direction}  # fmt: skip


def selection_score(summary: dict[str, float]) -> float:
    """What chooses the checkpoint that ships: colour+shape accuracy plus direction accuracy (one-object)."""
    return float(summary.get("attr_acc", 0.0) + summary.get("direction_acc", 0.0))


def accuracy(pipe: Any, scorer: Any, prompts: list[str] | tuple[str, ...], seeds: tuple[int, ...] = (0,),
             steps: int = 20, guidance: float = 5.0) -> dict[str, Any]:  # fmt: skip
    """Accuracy of `pipe` on `prompts` x `seeds`: one-object prompts by the classifier, tracking and the colour
    check; two-object prompts by the colour check per object. Returns summaries, a confusion table and rows."""
    timer = Timer()
    one, two = [], []
    for seed in seeds:
        for p in prompts:
            video = generate(pipe, p, seed, steps, guidance)
            objs = parse_caption(p)
            if len(objs) == 1:
                o = objs[0]
                row = {"prompt": p, "seed": seed, **scorer.score(video, p)}
                row |= colour_check(video, o["color"], o["direction"])
                one.append(row)
            else:
                checks = [colour_check(video, o["color"], o["direction"]) for o in objs]
                two.append({"prompt": p, "seed": seed, "present": all(c["present"] for c in checks),
                            "moves": all(c["moves"] for c in checks), "objects": checks})  # fmt: skip
    out: dict[str, Any] = {"seeds": list(seeds), "steps": steps, "guidance": guidance}
    if one:
        keys = ("color_ok", "shape_ok", "attr_ok", "direction_ok", "present", "moves")
        out["one_object"] = {k.replace("_ok", "_acc"): float(np.mean([r[k] for r in one])) for k in keys}
        out["one_object"]["videos"] = len(one)
        conf = Counter(f"{p['prompt'].split()[1]} {p['prompt'].split()[2]} -> {p['pred_color']} {p['pred_shape']}"
                       for p in one if not p["attr_ok"])  # fmt: skip
        out["confusions"] = dict(conf.most_common())
        out["by_colour"] = {c: float(np.mean([r["color_ok"] for r in one if r["prompt"].split()[1] == c]))
                            for c in COLORS if any(r["prompt"].split()[1] == c for r in one)}  # fmt: skip
        out["by_shape"] = {s: float(np.mean([r["shape_ok"] for r in one if r["prompt"].split()[2] == s]))
                           for s in SHAPES if any(r["prompt"].split()[2] == s for r in one)}  # fmt: skip
        out["by_direction"] = {d: float(np.mean([r["direction_ok"] for r in one if r["prompt"].split()[-1] == d]))
                               for d in DIRECTIONS if any(r["prompt"].split()[-1] == d for r in one)}  # fmt: skip
        out["pred_directions"] = dict(Counter(r["pred_direction"] for r in one).most_common())
    if two:
        out["two_object"] = {"present_acc": float(np.mean([r["present"] for r in two])),
                             "moves_acc": float(np.mean([r["moves"] for r in two])), "videos": len(two)}  # fmt: skip
    out["seconds"] = round(timer.elapsed, 1)
    out["rows"] = one + two
    return out


def confusion_markdown(result: dict[str, Any]) -> str:
    """A markdown colour x shape table of the one-object videos: rows asked, columns read by the classifier."""
    one = [r for r in result["rows"] if "pred_color" in r]
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    counts = Counter((" ".join(r["prompt"].split()[1:3]), f"{r['pred_color']} {r['pred_shape']}") for r in one)
    read = [c for c in classes if any(counts[(a, c)] for a in classes)]
    lines = ["| asked \\ read | " + " | ".join(read) + " |", "|---" * (len(read) + 1) + "|"]
    for a in classes:
        if any(counts[(a, c)] for c in classes):
            lines.append(f"| {a} | " + " | ".join(str(counts[(a, c)] or "") for c in read) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the shipped assets/world/t2v)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/world_t2v_accuracy.json"))
    p.add_argument("--prompts", type=int, default=72, help="first N of the 72 one-object prompts")
    p.add_argument("--two-object", type=int, default=24, help="two-object prompts (reported apart)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if not 1 <= a.prompts <= 72:
        raise SystemExit(f"--prompts must be in 1..72, got {a.prompts}")
    if not 0 <= a.two_object:
        raise SystemExit(f"--two-object must be >= 0, got {a.two_object}")
    setup_threads(a.threads)
    seeds = tuple(int(s) for s in a.seeds.split(","))
    pipe = load_world_pipeline(a.model)
    scorer = AttributeScorer(world_dir() / "classifier")
    prompts = single_prompts()[: a.prompts] + two_object_prompts(a.two_object)
    res = accuracy(pipe, scorer, prompts, seeds, a.steps, a.guidance)
    cmd = "python -m attn_pipelines.world.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": cmd.strip(), "model": str(a.model or "assets/world/t2v"), **res, **environment()}
    write_json(a.out, res)
    print(f"one-object: {res.get('one_object')}\ntwo-object: {res.get('two_object')}\n{confusion_markdown(res)}")
    print(f"-> {a.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

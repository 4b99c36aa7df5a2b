"""Guidance-scale sweep of the world's shipped text-to-video model (issue 23: the CLI's guidance is chosen by a
measured sweep). Every scale generates the same prompts and seeds (20 steps, the CLI's defaults otherwise) and is
read by `attn_pipelines.world.accuracy.accuracy`: the classifier's colour / shape, the tracked direction and the
classifier-free colour check, one-object prompts and two-object prompts apart.

    python benchmarks/world_t2v_guidance.py                                   # 1, 3, 5, 8 over all 72 prompts
    python benchmarks/world_t2v_guidance.py --scales 1,5 --prompts 4 --two-object 0 --out /tmp/g   # a smoke run

Writes `world_t2v_guidance.json` (device, versions, settings, one summary per scale) and `.png` to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_pipelines.world.accuracy import accuracy, two_object_prompts  # noqa: E402
from attn_pipelines.world.common import environment, setup_threads, write_json  # noqa: E402
from attn_pipelines.world.data import single_prompts  # noqa: E402
from attn_pipelines.world.models import load_world_pipeline, world_dir  # noqa: E402
from attn_pipelines.world.score import AttributeScorer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLI_GUIDANCE = 5.0  # `attnplug generate`'s default
KEYS = ("attr_acc", "color_acc", "shape_acc", "direction_acc", "moves")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default="1,3,5,8", help="comma-separated guidance scales (each >= 1)")
    p.add_argument("--prompts", type=int, default=72, help="first N of the 72 one-object prompts (1..72)")
    p.add_argument("--two-object", type=int, default=12, help="two-object prompts, reported apart (>= 0)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    try:
        a.scales = tuple(float(x) for x in a.scales.split(","))
        a.seeds = tuple(int(x) for x in a.seeds.split(","))
    except ValueError:
        p.error(f"--scales / --seeds must be comma-separated numbers, got {a.scales!r} / {a.seeds!r}")
    if not a.scales or min(a.scales) < 1:
        p.error(f"--scales must be >= 1 (1 = no classifier-free guidance), got {a.scales}")
    if not 1 <= a.prompts <= 72 or a.two_object < 0 or a.steps < 1:
        p.error("--prompts must be in 1..72, --two-object >= 0, --steps >= 1")
    return a


def plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance"] for r in res["scales"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k in KEYS:
        ax.plot(scales, [100 * r["one_object"][k] for r in res["scales"]], marker="o", label=k)
    if all("two_object" in r for r in res["scales"]):
        ax.plot(scales, [100 * r["two_object"]["moves_acc"] for r in res["scales"]], "k--", marker="x",
                label="two-object: both move as named")  # fmt: skip
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("% of videos")
    ax.set_title(f"world text-to-video, {res['settings']['prompts']} prompts, seed(s) {res['settings']['seeds']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_scale(scales: list[dict], default: float = CLI_GUIDANCE) -> tuple[float, list[float]]:
    """The scale with the most one-object videos right on colour+shape plus direction, counted in videos (so float
    rounding cannot split a tie), and every scale tied with it. A tie keeps the CLI's `default` when it is among
    them: changing the default takes a strict win."""

    def count(r: dict) -> int:
        one = r["one_object"]
        return round((one["attr_acc"] + one["direction_acc"]) * one["videos"])

    top = max(count(r) for r in scales)
    tied = [r["guidance"] for r in scales if count(r) == top]
    return (default if default in tied else tied[0]), tied


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    setup_threads(a.threads)
    pipe = load_world_pipeline()
    scorer = AttributeScorer(world_dir() / "classifier")
    prompts = single_prompts()[: a.prompts] + two_object_prompts(a.two_object)
    settings = {"scales": list(a.scales), "prompts": a.prompts, "two_object": a.two_object, "steps": a.steps,
                "seeds": list(a.seeds), "model": "assets/world/t2v (shipped)"}  # fmt: skip
    cmd = "python benchmarks/world_t2v_guidance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res: dict = {"command": cmd.strip(), "settings": settings, "scales": [], **environment()}
    for g in a.scales:
        r = accuracy(pipe, scorer, prompts, a.seeds, a.steps, g)
        r.pop("rows")
        res["scales"].append(r)
        one = r.get("one_object", {})
        print(f"guidance {g:g}: " + ", ".join(f"{k} {100 * one.get(k, 0):.0f}%" for k in KEYS)
              + (f", two-object moves {100 * r['two_object']['moves_acc']:.0f}%" if "two_object" in r else "")
              + f" ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
        res["best_guidance"], res["tied_best"] = best_scale(res["scales"])
        a.out.mkdir(parents=True, exist_ok=True)
        write_json(a.out / "world_t2v_guidance.json", res)  # partial results after every scale
    plot(res, a.out / "world_t2v_guidance.png")
    print(f"best guidance {res['best_guidance']:g} -> {a.out / 'world_t2v_guidance.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HeadHunter on the world's text-to-video model: which heads SoftPAG should perturb, by an exact objective.

HeadHunter (cvlab-kaist) scores every attention head by the objective of the outputs generated with SoftPAG on
that head and keeps the best `top_k` (one round here: the world's transformer has 4 layers x 4 heads = 16
candidates). On real models the objective is a learned proxy (CLIP score, aesthetic or style scores); the world
makes it exact: `attribute_objective` is, averaged over the videos, half the attribute classifier's probability
of the requested colour-and-shape class (mean over frames) and half whether the tracked motion goes the
captioned way.

The search runs on `SEARCH_PROMPTS` (12 of the 72 one-object prompts, seed 0); the effect is measured on the
held-out `EVAL_PROMPTS` (30 others, seed 0): the plain model, SoftPAG on the hunted heads, on the heads the
search ranked worst, on 4 heads drawn at random (seeded) and on every head of layer 2 (`attnplug eval`'s
arbitrary choice), all with the same scale and u. Results: benchmarks/results/world_headhunt.json; the heads:
assets/world/headhunter/heads.json (`SoftPAG(heads_file=...)` loads it and checks the model it came from).

    python -m attn_pipelines.world.headhunt          # search (resumable) + held-out comparison
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffusion_attn as da
from diffusion_attn.headhunter import HeadHunter

from .common import Timer, environment, setup_threads, write_json
from .data import parse_caption, single_prompts
from .evaluate import load_world_pipeline
from .models import VIDEO, world_dir
from .score import AttributeScorer, crispness, direction_of, track

__all__ = ["SEARCH_PROMPTS", "EVAL_PROMPTS", "attribute_objective", "world_generate", "hunt", "compare", "main"]

#: the search prompts (every 6th one-object prompt) and the held-out comparison prompts (every 2nd of the rest)
SEARCH_PROMPTS: tuple[str, ...] = tuple(single_prompts()[::6])
EVAL_PROMPTS: tuple[str, ...] = tuple([p for p in single_prompts() if p not in SEARCH_PROMPTS][::2])


def world_generate(steps: int = 20, guidance: float = 5.0) -> Callable[[Any, str, int], np.ndarray]:
    """`generate(pipe, prompt, seed)` for HeadHunter: one world video [F, H, W, 3] in [0, 1] at the CLI's size
    (a plain pipeline call, so its classifier-free-guidance branches run in their cache contexts)."""

    def generate(pipe: Any, prompt: str, seed: int) -> np.ndarray:
        out = pipe(prompt=prompt, num_inference_steps=steps, num_frames=VIDEO["frames"], height=VIDEO["size"],
                   width=VIDEO["size"], guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                   output_type="np").frames[0]  # fmt: skip
        return np.asarray(out, dtype=np.float32)

    return generate


def _p_requested(scorer: Any, video: np.ndarray, prompt: str) -> float:
    """The classifier's probability of the requested colour-and-shape class, averaged over the frames."""
    want = parse_caption(prompt)[0]
    return float(scorer.probs(video).mean(0)[scorer.classes.index(f"{want['color']}_{want['shape']}")])


def _video_score(scorer: Any, video: np.ndarray, prompt: str) -> dict[str, float]:
    """p: `_p_requested`; direction_ok: the tracked motion goes the captioned way."""
    want = parse_caption(prompt)[0]
    return {"p": _p_requested(scorer, video, prompt),
            "direction_ok": float(direction_of(track(video)) == want["direction"])}  # fmt: skip


def attribute_objective(scorer: Any) -> Callable[[list[Any], list[tuple[str, int]]], float]:
    """HeadHunter objective (higher is better): mean over videos of (p(requested class) + direction right) / 2."""

    def world_attribute(outputs: list[Any], pairs: list[tuple[str, int]]) -> float:
        vals = []
        for video, (prompt, _) in zip(outputs, pairs):
            s = _video_score(scorer, np.asarray(video), prompt)
            vals.append(0.5 * s["p"] + 0.5 * s["direction_ok"])
        return float(np.mean(vals))

    return world_attribute


def hunt(pipe: Any, scorer: Any, path: Path, *, top_k: int = 4, scale: float = 1.0, u: float = 1.0,
         steps: int = 20, max_seconds: float | None = None) -> Any:  # fmt: skip
    """The HeadHunter search on `SEARCH_PROMPTS` (seed 0), resumable from `path`."""
    hh = HeadHunter(pipe=pipe, objective=attribute_objective(scorer), prompts=list(SEARCH_PROMPTS),
                    seeds=[0] * len(SEARCH_PROMPTS), rounds=1, top_k=top_k, u=u, scale=scale,
                    generate=world_generate(steps), objective_name="world_attribute")  # fmt: skip
    return hh.run(path, max_seconds=max_seconds)


def _configs(result: Any, heads_file: Path, top_k: int, n_layers: int, n_heads: int) -> dict[str, dict | None]:
    ranked = sorted(result.rounds[0]["scores"].items(), key=lambda kv: kv[1])
    worst = tuple(tuple(int(x) for x in k.split(",")) for k, _ in ranked[:top_k])
    rng = random.Random(0)
    everything = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    drawn = tuple(sorted(rng.sample(everything, top_k)))
    return {
        "plain": None,
        "hunted": {"heads_file": str(heads_file)},
        "worst": {"heads": worst},
        "random": {"heads": drawn},
        "layer2": {"layers": (2,)},
    }


def compare(pipe: Any, scorer: Any, configs: dict[str, dict | None], *, scale: float, u: float, steps: int = 20,
            prompts: tuple[str, ...] = EVAL_PROMPTS, log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Each configuration on the held-out prompts (seed 0): attribute accuracy, direction, p, crispness."""
    gen = world_generate(steps)
    out: dict[str, Any] = {}
    timer = Timer()
    for name, heads in configs.items():
        rows = []
        for prompt in prompts:
            handle = da.apply(pipe, da.SoftPAG(scale=scale, u=u, **heads)) if heads is not None else None
            try:
                video = gen(pipe, prompt, 0)
            finally:
                if handle is not None:
                    handle.remove()
            rows.append({"prompt": prompt, **scorer.score(video, prompt), "p": _p_requested(scorer, video, prompt),
                         "crispness": crispness(video)})  # fmt: skip
        summary = {k: float(np.mean([float(r[k]) for r in rows]))
                   for k in ("attr_ok", "color_ok", "shape_ok", "direction_ok", "p", "crispness")}  # fmt: skip
        summary["objective"] = 0.5 * summary["p"] + 0.5 * summary["direction_ok"]
        out[name] = {"softpag": heads, "summary": summary, "rows": rows}
        log(f"{name}: {summary} ({timer.elapsed:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.headhunt", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="text-to-video pipeline folder (default: the shipped world t2v)")
    p.add_argument("--heads", type=Path, default=None, help="search state / result JSON (default: the shipped one)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.0, help="SoftPAG scale during the search and the comparison")
    p.add_argument("--u", type=float, default=1.0, help="SoftPAG u (1: identity attention on the chosen heads)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-prompts", type=int, default=len(EVAL_PROMPTS), help="held-out prompts compared")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/world_headhunt.json"))
    a = p.parse_args(argv)
    if not 1 <= a.top_k <= 16:
        p.error(f"--top-k must be in [1, 16], got {a.top_k}")
    if not 1 <= a.eval_prompts <= len(EVAL_PROMPTS):
        p.error(f"--eval-prompts must be in [1, {len(EVAL_PROMPTS)}], got {a.eval_prompts}")
    threads = setup_threads(a.threads)
    pipe = load_world_pipeline(a.model)
    scorer = AttributeScorer(world_dir() / "classifier")
    heads = a.heads or world_dir() / "headhunter" / "heads.json"
    heads.parent.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    result = hunt(pipe, scorer, heads, top_k=a.top_k, scale=a.scale, u=a.u, steps=a.steps)
    search_s = timer.elapsed
    print(f"headhunt: selected {result.selected} ({search_s:.0f} s)", flush=True)
    tcfg = pipe.transformer.config
    configs = _configs(result, heads, a.top_k, tcfg.num_layers, tcfg.num_attention_heads)
    log = lambda m: print(f"headhunt: {m}", flush=True)  # noqa: E731
    comp = compare(pipe, scorer, configs, scale=a.scale, u=a.u, steps=a.steps, prompts=EVAL_PROMPTS[: a.eval_prompts],
                   log=log)  # fmt: skip
    args = argv if argv is not None else sys.argv[1:]
    write_json(a.out, {"command": "python -m attn_pipelines.world.headhunt " + " ".join(args), "threads": threads,
                       **environment(), "objective": "mean of (p(requested class) + direction right) / 2",
                       "search_prompts": list(SEARCH_PROMPTS), "eval_prompts": list(EVAL_PROMPTS[: a.eval_prompts]),
                       "scale": a.scale, "u": a.u, "steps": a.steps, "top_k": a.top_k, "heads_file": str(heads),
                       "selected": [list(h) for h in result.selected], "search_scores": result.rounds[0]["scores"],
                       "search_seconds": round(search_s, 1), "compare": comp,
                       "seconds": round(timer.elapsed, 1)})  # fmt: skip
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

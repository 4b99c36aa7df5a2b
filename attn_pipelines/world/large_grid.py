"""The world at a size where sparse attention matters: 2,112 attention tokens instead of 320.

The world's text-to-video model is trained on 9 frames (5 x 8 x 8 = 320 tokens); there, radial attention keeps
about 92% of the pairs and nothing beats dense. Here the same model generates 65 frames (33 latent frames x 8 x 8
= 2,112 tokens, 6.6x the training length in latent frames: `LARGE_LATENT_FRAMES`), where the sparse variants run
at density <= 0.5 with their default block sizes or the documented smaller ones (one 64-token frame per block).

Protocol (the one the sparse-video papers use: radial attention, Sparse VideoGen, GNA/STA, LiteAttention): the
same prompt and seed with and without the variant, the dense video as the reference, frame-wise quality (PSNR and
SSIM over all frames, torchmetrics), the first denoising steps dense (radial: `dense_steps=5` of 20 and layer 0;
LiteAttention: 5 warm-up steps; our GNA has no dense warm-up option and runs sparse from step 0), plus what the
world makes exact: attribute accuracy (the shipped classifier on the first 9 frames, where the model was trained)
and the direction of motion tracked over those frames. LPIPS needs torchvision's pretrained AlexNet/VGG weights,
which an offline machine does not have: it is reported as unavailable, never approximated.

Density is reported two ways: `density` (mean over every self-attention call, dense calls counting 1, the
eval's usual figure) and `sparse_density` (mean over the calls that ran sparse: the layout the kernel saw).
CPU time is the whole generation's seconds, measured right after the dense video of the same prompt, with its
ratio to that dense time. On CPU the sparse layouts run on attnplug's reference backend (block-gathered
matmuls); LiteAttention's needs explicit score tiles for its statistics there, so its CPU time measures the
reference, not the Triton kernel.

    python -m attn_pipelines.world.large_grid               # -> benchmarks/results/world_large_grid.{json,png}
    attnplug eval --part large                              # the same
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .common import Timer, environment, setup_threads, write_json
from .data import single_prompts
from .evaluate import Case, EvalSettings, _mean_finite, _rates, _video_metrics, case_status, generate
from .evaluate import load_world_pipeline as _load
from .models import VIDEO, world_dir
from .score import AttributeScorer

__all__ = ["LARGE_LATENT_FRAMES", "LARGE_SUITE", "large_frames", "run_large", "write", "main"]

#: latent frames generated (x 8 x 8 tokens each): 33 -> 2,112 tokens (the training clip has 5)
LARGE_LATENT_FRAMES = 33

#: (case, prompts it runs on: None = all); options chosen for the 33 x 8 x 8 grid (64-token frames)
LARGE_SUITE: tuple[tuple[Case, int | None], ...] = (
    (Case("radial", "sparse", ("radial:dense_steps=5,dense_layers=1,block_size=64",),
          "64-token blocks (one frame); dense for 5 of 20 steps and layer 0"), None),
    (Case("radial_b32", "sparse", ("radial:dense_steps=5,dense_layers=1,block_size=32",),
          "32-token blocks; dense for 5 of 20 steps and layer 0"), None),
    (Case("gna", "sparse", ("gna:kernel_size=(17,7,7),block_size=64",),
          "17 x 7 x 7 token neighbourhood (about half the frames, 7 of 8 rows and columns); no dense warm-up"), None),
    (Case("gna_time", "sparse", ("gna:kernel_size=(33,5,5),block_size=64",),
          "every frame, 5 x 5 spatial neighbourhood; no dense warm-up"), None),
    (Case("lite", "sparse", ("lite:threshold=-1.0,warmup_steps=5,block_size=64",),
          "tiles skipped from step 5 on, threshold -1 (log2); reference backend on CPU (slow): fewer prompts"), 2),
    (Case("lite_b32", "sparse", ("lite:threshold=-1.0,warmup_steps=5,block_size=32",),
          "as lite, 32-token blocks (half a frame): finer tiles to skip"), 2),
    (Case("lite_t05", "sparse", ("lite:threshold=-0.5,warmup_steps=5,block_size=64",),
          "as lite, threshold -0.5: keeps only tiles within 2^-0.5 of a row's running maximum"), 2),
    (Case("lite_b16", "sparse", ("lite:threshold=-1.0,warmup_steps=5,block_size=16",),
          "as lite, 16-token blocks (a quarter frame)"), 2),
    (Case("lite_b32_t05", "sparse", ("lite:threshold=-0.5,warmup_steps=5,block_size=32",),
          "32-token blocks and threshold -0.5"), 2),
)  # fmt: skip


def large_frames(pipe: Any) -> int:
    """Pixel frames whose latent has `LARGE_LATENT_FRAMES` frames (the pipeline's temporal compression)."""
    return (LARGE_LATENT_FRAMES - 1) * pipe.vae_scale_factor_temporal + 1


def _tokens(pipe: Any) -> int:
    t = pipe.transformer.config
    side = VIDEO["size"] // pipe.vae_scale_factor_spatial // t.patch_size[1]
    return LARGE_LATENT_FRAMES // t.patch_size[0] * side * side


def _generate(pipe: Any, prompt: str, seed: int, s: EvalSettings, variants: list | None, frames: int):
    """evaluate.generate, with the mean density of every call and of the calls that ran sparse."""
    record: list = []
    video, sec, mean = generate(pipe, prompt, seed, s, variants, frames=frames, record=record)
    return video, sec, mean, (record[0].sparse_mean if record else None)


def run_large(s: EvalSettings, prompts: int = 8, cases: tuple[str, ...] | None = None, log: Any = print,
              model: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Dense and every case of `LARGE_SUITE` (or the named `cases`) at 2,112 tokens, same prompts and seeds."""
    pipe = _load(model)
    scorer = AttributeScorer(world_dir() / "classifier")
    frames = large_frames(pipe)
    allp = single_prompts()
    chosen = allp[:: max(1, len(allp) // prompts)][:prompts]
    suite = [(c, n) for c, n in LARGE_SUITE if cases is None or c.name in cases]
    timer = Timer()
    dense: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    rows: dict[str, list[dict]] = {"dense": []} | {c.name: [] for c, _ in suite}
    status = {c.name: case_status(c) for c, _ in suite}
    for i, p in enumerate(chosen):
        for seed in s.seeds:
            ref, sec, _, _ = _generate(pipe, p, seed, s, None, frames)
            dense[(p, seed)] = (ref, sec)
            rows["dense"].append({"prompt": p, "seed": seed, "seconds": sec, "density": 1.0,
                                  **scorer.score(ref[: s.frames], p)})  # fmt: skip
            for case, limit in suite:
                st, variants = status[case.name]
                if variants is None or (limit is not None and i >= limit):
                    continue
                video, vsec, dmean, dsparse = _generate(pipe, p, seed, s, variants, frames)
                row = {"prompt": p, "seed": seed, "seconds": vsec, "dense_seconds": sec, "time_ratio": vsec / sec,
                       "density": dmean, "sparse_density": dsparse, **_video_metrics(video, ref)}  # fmt: skip
                rows[case.name].append(row | scorer.score(video[: s.frames], p))
        log(f"prompt {i + 1}/{len(chosen)} done ({timer.elapsed:.0f} s)")
    out: dict[str, Any] = {}
    for name, rr in rows.items():
        entry: dict[str, Any] = {"rows": rr}
        if name != "dense":
            case = next(c for c, _ in suite if c.name == name)
            entry |= {"status": status[name][0], "attn": list(case.attn), "note": case.note}
        summ: dict[str, Any] = _rates(rr, ("color_ok", "shape_ok", "attr_ok", "direction_ok"))
        for k in ("psnr", "ssim", "density", "sparse_density", "seconds", "time_ratio"):
            v = _mean_finite([r.get(k) for r in rr])
            if v is not None:
                summ[k] = v
        summ["videos"] = len(rr)
        entry["summary"] = summ
        out[name] = entry
    return {"tokens": _tokens(pipe), "frames": frames, "latent_frames": LARGE_LATENT_FRAMES, "prompts": chosen,
            "lpips": "unavailable: needs torchvision's pretrained AlexNet/VGG weights (offline machine)",
            "cases": out, "seconds": round(timer.elapsed, 1)}  # fmt: skip


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """PSNR against sparse density, one point per case, and CPU time relative to dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {k: v["summary"] for k, v in results["cases"].items() if k != "dense" and v["summary"].get("videos")}
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, s in cases.items():
        ax[0].scatter(s.get("sparse_density", 1.0), s.get("psnr", 0.0), label=name)
        ax[0].annotate(name, (s.get("sparse_density", 1.0), s.get("psnr", 0.0)))
    ax[0].set_xlabel("density of the sparse calls")
    ax[0].set_ylabel("PSNR vs dense (dB)")
    ax[0].set_title(f"world at {results['tokens']} tokens ({results['frames']} frames)")
    names = list(cases)
    ax[1].bar(names, [cases[n].get("time_ratio", np.nan) for n in names])
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_ylabel("CPU seconds / dense seconds")
    ax[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.large_grid", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="one-object prompts (spread over the 72; default 8)")
    p.add_argument("--cases", default=None, help=f"comma-separated, of {', '.join(c.name for c, _ in LARGE_SUITE)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", default="0")
    p.add_argument("--model", default=None, help="text-to-video pipeline folder (default: the shipped world t2v)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results", help="folder for <stem>.{json,png}")
    p.add_argument("--stem", default="world_large_grid", help="file name stem of the results (default %(default)s)")
    a = p.parse_args(argv)
    known = [c.name for c, _ in LARGE_SUITE]
    cases = tuple(a.cases.split(",")) if a.cases else None
    bad = [c for c in cases or () if c not in known]
    if bad:
        p.error(f"--cases: unknown {bad}; known: {', '.join(known)}")
    if a.prompts < 1 or a.steps < 1:
        p.error(f"--prompts and --steps must be >= 1, got {a.prompts} and {a.steps}")
    try:
        seeds = tuple(int(x) for x in a.seeds.split(","))
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    threads = setup_threads(a.threads)
    s = EvalSettings(steps=a.steps, seeds=seeds)
    res = run_large(s, a.prompts, cases, log=lambda m: print(f"large_grid: {m}", flush=True), model=a.model)
    args = argv if argv is not None else sys.argv[1:]
    res = {"command": "python -m attn_pipelines.world.large_grid " + " ".join(args),
           "threads": threads, "steps": a.steps, "seeds": list(seeds), "guidance": s.guidance,
           "dense_engine_block_density": os.environ.get("ATTNPLUG_DENSE_ENGINE_DENSITY"), **environment(),
           **res}  # fmt: skip
    js, png = write(res, Path(a.out), a.stem)
    for name, e in res["cases"].items():
        print(f"{name:>11}: {json.dumps(e['summary'])}")
    print(f"wrote {js} and {png}")
    return 0


def write(results: dict[str, Any], out: Path, stem: str = "world_large_grid") -> tuple[Path, Path]:
    """`<stem>.json` and its plot in `out`."""
    return write_json(out / f"{stem}.json", results), plot(results, out / f"{stem}.png")


if __name__ == "__main__":
    sys.exit(main())

"""`attnplug eval`: ground-truth evaluation of the variants on the synthetic world's trained models.

    attnplug eval                      # everything -> benchmarks/results/world_eval.{json,png}
    attnplug eval --part diffusion --cases radial,gna --prompts 24
    attnplug eval --smoke              # a minute: 2 prompts, 2 steps, tiny fine-tunes, into a temp dir
    attnplug eval --part large         # the sparse variants at 2,112 tokens -> world_large_grid.{json,png}

What is measured, and how a new variant joins: `attn_pipelines/world/evaluate.py` and docs/world.md.
Smoke runs never write into benchmarks/results/ (their numbers are not results).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CLIError, RunError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="measure the variants on the synthetic world's trained models (JSON + plot)")
    e.add_argument(
        "--part",
        choices=("all", "diffusion", "vision", "large"),
        default="all",
        help="large: radial / GNA / LiteAttention at 2,112 tokens (world/large_grid.py; not in all)",
    )
    e.add_argument("--cases", default=None, help="comma-separated diffusion cases (default: all; see docs/world.md)")
    e.add_argument("--vision-models", default=None, help="comma-separated vision checkpoints (default: all)")
    e.add_argument("--prompts", type=int, default=None, help="one-object prompts per case (default 72: all)")
    e.add_argument("--length-prompts", type=int, default=None, help="prompts of the length cases (default 24)")
    e.add_argument("--seeds", default=None, help="comma-separated seeds (default 0)")
    e.add_argument("--steps", type=int, default=None, help="denoising steps (default 20)")
    e.add_argument("--finetune-steps", type=int, default=None, help="vision fine-tune steps (default 150)")
    e.add_argument("--threads", type=int, default=None, help="torch threads (default 1 or $ATTNPLUG_THREADS)")
    e.add_argument("--out", default=None, help="results folder (default ./benchmarks/results; --smoke: a temp dir)")
    e.add_argument("--smoke", action="store_true", help="tiny settings: checks that everything runs")
    e.set_defaults(func=run)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise CLIError(f"--{name} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    """Check the inputs and the checkpoints, run the requested parts, write JSON + PNG."""
    from ..world import evaluate as ev
    from ..world.common import setup_threads
    from ..world.models import CLASSIFIERS, T2V_DIR, WorldAssetsMissing, world_dir

    for name in ("prompts", "length_prompts", "steps", "finetune_steps", "threads"):
        _positive(name.replace("_", "-"), getattr(args, name))
    s = ev.EvalSettings(smoke=args.smoke)
    if args.smoke:
        s.prompts, s.steps, s.finetune_steps, s.length_prompts, s.length_factors = 2, 2, 2, 1, (2,)
    if args.prompts:
        s.prompts = min(args.prompts, 72)
    if args.length_prompts:
        s.length_prompts = min(args.length_prompts, 72)
    if args.steps:
        s.steps = args.steps
    if args.finetune_steps:
        s.finetune_steps = args.finetune_steps
    if args.seeds:
        try:
            s.seeds = tuple(int(x) for x in args.seeds.split(","))
        except ValueError:
            raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    known = {c.name: c for c in ev.SUITE}
    cases = tuple(ev.SUITE)
    if args.cases:
        bad = [c for c in args.cases.split(",") if c not in known]
        if bad:
            raise CLIError(f"--cases: unknown {bad}; known: {', '.join(known)}")
        cases = tuple(known[c] for c in args.cases.split(","))
    vision = tuple(ev.VISION_SUITE)
    if args.vision_models:
        bad = [v for v in args.vision_models.split(",") if v not in ev.VISION_SUITE]
        if bad:
            raise CLIError(f"--vision-models: unknown {bad}; known: {', '.join(ev.VISION_SUITE)}")
        vision = tuple(args.vision_models.split(","))
    try:
        root = world_dir()
    except WorldAssetsMissing as e:
        raise CLIError(str(e)) from None
    need = []
    if args.part in ("all", "diffusion", "large"):
        need += [root / T2V_DIR / "model_index.json", root / "classifier" / "model.safetensors"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise CLIError(
            f"the world's trained checkpoints are missing ({', '.join(missing)}): reinstall attnplug with its "
            "package data, or train them (docs/world.md) and set ATTNPLUG_WORLD_DIR"
        )
    results_dir = Path.cwd() / "benchmarks" / "results"  # a source checkout's results, when run from its root
    if args.out:
        out = Path(args.out)
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="attnplug-eval-smoke-"))
    elif results_dir.parent.is_dir():
        out = results_dir
    else:
        raise CLIError(
            f"no benchmarks/ folder here ({results_dir.parent}): `attnplug eval` writes its results to "
            "benchmarks/results of a source checkout; run it from the checkout's root or pass --out"
        )
    if args.smoke and out.resolve() == results_dir.resolve():
        raise CLIError("--smoke results are not results: pick another --out than benchmarks/results")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    threads = setup_threads(args.threads)
    command = "attnplug eval " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if sys.argv[1:2] == ["eval"] else []))
    results: dict[str, Any] = {"command": command.strip(), "smoke": args.smoke, "threads": threads,
                               "settings": {k: v for k, v in vars(s).items() if k != "extra"},
                               "checkpoints": {"t2v": str(root / T2V_DIR), "vision": sorted(CLASSIFIERS)}}  # fmt: skip
    log = lambda msg: print(f"attnplug eval: {msg}", flush=True)  # noqa: E731
    try:
        if args.part == "large":  # its own file: a different grid, prompts and cases
            from ..world import large_grid

            res = large_grid.run_large(s, prompts=min(args.prompts or 8, 72), log=log)
            js, png = large_grid.write(results | res, out)
            print(f"attnplug: wrote {js} and {png}")
            return 0
        if args.part in ("all", "diffusion"):
            results["diffusion"] = ev.run_diffusion(s, cases, log=log)
        if args.part in ("all", "vision"):
            results["vision"] = ev.run_vision(s, vision, log=log)
        js, png = ev.write_results(results, out)
    except OSError as e:
        raise RunError(f"eval failed: {e}") from e
    print(ev.markdown(results))
    print(f"attnplug: wrote {js}, {png} and {js.with_suffix('.md')} (docs/world.md's tables)")
    return 0

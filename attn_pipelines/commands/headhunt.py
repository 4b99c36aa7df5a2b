"""`attnplug headhunt`: HeadHunter's greedy search for the heads SoftPAG should perturb, saved as resumable JSON.

    attnplug headhunt --prompt "a fox" --prompt "a city at night" --rounds 1 --top-k 2 --objective tv
    attnplug headhunt --model stabilityai/stable-diffusion-3.5-large --prompts-file prompts.txt \\
        --rounds 1 --top-k 24 --u 0.25 --scale 3 --steps 20 --objective clip:/models/clip-vit-base-patch16
    attnplug generate --model ... --attn softpag:heads_file=out/headhunt.json,u=0.25

The JSON (`--out`) is rewritten after every evaluation; running the same command again continues the search
(`--restart` starts over). Without --model it searches the CLI's image default, the model `attnplug generate
--out x.png` uses without --model (`attn_pipelines.embedded`), so the two accept each other's heads file: the world's
trained text-to-image model, or the untrained tiny FLUX pipeline (a smoke run) where it is not installed.
Objectives: `clip[:MODEL]` (torchmetrics CLIP score; MODEL a local directory or a cached Hub id, never
downloaded) or `tv` (total variation, model-free; a sanity objective, not a quality score). Bad input fails
before any weight is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import argtypes
from ..errors import CLIError
from ..io import OutputError, OutputTarget

__all__ = ["add_parser", "run", "parse_int_list"]

_DEFAULT_CLIP = "openai/clip-vit-base-patch16"


def parse_int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 0, e.g. 0,1,5."""
    try:
        vals = [int(x, 10) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 (e.g. 0,1,5), got {text!r}")
    return vals


def add_parser(sub: Any) -> None:
    h = sub.add_parser("headhunt", help="search the attention heads SoftPAG should perturb (resumable JSON)")
    h.add_argument(
        "--model",
        help="Hub id or local diffusers pipeline directory (default: the image default of `attnplug generate "
        "--out x.png`: the world's text-to-image model, or the tiny FLUX where it is not installed)",
    )
    h.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable): the M prompt/seed pairs")
    h.add_argument("--prompts-file", help="a text file with one prompt per line")
    h.add_argument("--seeds", type=parse_int_list, default=None, help="a seed per prompt, e.g. 0,1,2 (default 0..M-1)")
    h.add_argument("--rounds", type=argtypes.positive_int, default=1, help="R: greedy rounds")
    h.add_argument("--top-k", type=argtypes.positive_int, default=1, help="k: heads kept per round")
    h.add_argument("--u", type=argtypes.finite_float, default=1.0, help="SoftPAG u in [0, 1] during the search")
    h.add_argument("--scale", type=argtypes.finite_float, default=3.0, help="SoftPAG scale (w_p) during the search")
    h.add_argument("--layers", type=parse_int_list, default=None, help="only heads of these layers, e.g. 0,1,5")
    h.add_argument("--objective", default="tv", help="clip[:MODEL] or tv (default)")
    h.add_argument("--steps", type=argtypes.positive_int, default=None, help="denoising steps per generation")
    h.add_argument("--height", type=argtypes.positive_int, default=None)
    h.add_argument("--width", type=argtypes.positive_int, default=None)
    h.add_argument("--frames", type=argtypes.positive_int, default=None, help="video frames (video pipelines)")
    h.add_argument("--guidance-scale", type=argtypes.finite_float, default=None)
    h.add_argument("--max-evaluations", type=argtypes.positive_int, default=None, help="budget of this run")
    h.add_argument("--max-seconds", type=argtypes.finite_float, default=None, help="time budget of this run")
    h.add_argument("--out", default="out/headhunt.json", help="result JSON (resumed when it exists)")
    h.add_argument("--restart", action="store_true", help="ignore an existing --out and start over")
    h.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    h.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    h.add_argument("--no-progress", action="store_true", help="no progress bar")
    h.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text()
        except OSError as e:
            raise CLIError(f"--prompts-file {args.prompts_file!r}: {e.strerror or e}") from None
        prompts += [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        prompts = ["a red fox running through the snow, cinematic"]
    return prompts


def _objective(spec: str) -> tuple[str, Any]:
    """(name, factory) of --objective; the factory runs after loading (CLIP loads a model)."""
    from diffusion_attn.headhunter import clip_score, total_variation

    name, _, arg = spec.partition(":")
    if name == "tv" and not arg:
        return "total_variation", total_variation
    if name == "clip":
        model = arg or _DEFAULT_CLIP
        return f"clip_score({model})", lambda: clip_score(model)
    raise CLIError(f"--objective {spec!r}: expected clip[:MODEL] or tv")


def run(args: argparse.Namespace) -> int:
    """Check the input, load (or build) the pipeline, search, write the JSON, print the selection."""
    from diffusion_attn.variants.softpag import SoftPAG

    prompts = _prompts(args)
    seeds = args.seeds if args.seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise CLIError(f"--seeds: {len(seeds)} seed(s) for {len(prompts)} prompt(s); give one seed per prompt")
    try:
        SoftPAG(u=args.u, scale=args.scale, layers=(0,))
    except (ValueError, TypeError) as e:
        raise CLIError(f"--u/--scale: {e}") from None
    if args.u == 0 or args.scale == 0:
        raise CLIError("--u and --scale must be > 0 for a search (with 0 every head scores the same)")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise CLIError(f"--max-seconds must be > 0, got {args.max_seconds}")
    obj_name, make_objective = _objective(args.objective)
    target = OutputTarget(args.out, "--out", formats=(".json",))
    try:
        target.check()
    except OutputError as e:
        raise CLIError(str(e)) from None
    from diffusion_attn.headhunter import resume_conflicts, search_settings

    settings = search_settings(zip(prompts, seeds), args.rounds, args.top_k, args.u, args.scale, obj_name, args.layers)
    try:
        diff = [] if args.restart else resume_conflicts(target.path, settings)
    except ValueError as e:
        raise CLIError(f"--out: {' '.join(str(e).split())} (pass --restart to overwrite it)") from None
    if diff:
        raise CLIError(
            f"--out {str(target.path)!r} holds a search with other settings ({', '.join(diff)} differ): "
            "rerun with the same settings to resume it, another --out, or --restart"
        )
    from .generate import resolve_device

    device = resolve_device(args.device, False)

    import torch

    from ..embedded import image_default
    from ..loading import load_pipeline
    from ..tiny import build_tiny_pipeline
    from ..world.t2i import t2i_call_kwargs

    defaults: dict[str, Any] = {}
    model = args.model
    if model is None:  # the CLI's image default, with generate's defaults for it
        image = image_default()
        print(image.notice, file=sys.stderr)
        model = image.model
        defaults = {k: image.defaults[k] for k in ("height", "width", "steps", "guidance_scale", "dtype")}
    dtype = getattr(torch, args.dtype or defaults.get("dtype") or ("bfloat16" if device.type == "cuda" else "float32"))
    if model is None:
        pipe = build_tiny_pipeline(image.tiny)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = load_pipeline(model, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # what the model needs on every call, as generate passes it (the world t2i model's trained zero T5 positions)
    call: dict[str, Any] = dict(t2i_call_kwargs(pipe))
    for key, flag in (("height", "height"), ("width", "width"), ("num_inference_steps", "steps"),
                      ("guidance_scale", "guidance_scale"), ("num_frames", "frames")):  # fmt: skip
        value = getattr(args, flag)
        value = defaults.get(flag) if value is None else value
        if value is not None:
            call[key] = value
    try:
        objective = make_objective()
    except ValueError as e:
        raise CLIError(f"--objective {args.objective!r}: {e}") from None

    from diffusion_attn.headhunter import HeadHunter

    try:
        hunter = HeadHunter(
            pipe, objective, prompts, seeds, rounds=args.rounds, top_k=args.top_k, u=args.u, scale=args.scale,
            layers=args.layers, call_kwargs=call, objective_name=obj_name,
        )  # fmt: skip
        result = hunter.run(
            target.path, restart=args.restart, max_evaluations=args.max_evaluations, max_seconds=args.max_seconds,
            progress=not args.no_progress,
        )  # fmt: skip
    except ValueError as e:
        raise CLIError(" ".join(str(e).split())) from None
    heads = ", ".join(f"({a}, {b})" for a, b in result.selected) or "none yet"
    state = "complete" if result.complete else f"stopped by --{(result.stopped or 'budget').replace('_', '-')}"
    print(
        f"attnplug: headhunt {state} after {result.evaluations} of {hunter.total_evaluations()} evaluations; "
        f"selected heads: {heads} -> {target.path}"
    )
    if result.selected:
        print(f"use: attnplug generate ... --attn softpag:heads_file={target.path},u={args.u}")
    return 0

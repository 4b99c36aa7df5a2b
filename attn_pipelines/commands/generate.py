"""`attnplug generate`: run a diffusers pipeline with attention variants and write PNG / GIF / MP4.

The order of work makes bad input fail in about a second, before any weight is loaded:

1. preset, variant specs (typed, range-checked), `--out` (writable?), `--device`, `--seed`;
2. the pipeline class and model family from the model's `model_index.json` (a local directory or
   the Hub cache; the embedded default is known): its call defaults, the token grid of the
   requested size, sizes and variant options checked against that grid, the preset's family
   against the model's, and a warning when a variant would change nothing (e.g. radial's dense
   warm-up covering every step);
3. load, apply, generate, write through a temporary file renamed into place, one summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attn_spec import parse_spec

from .. import __version__, argtypes
from ..config import DTYPES, Preset, build_variant, fill_layout, layout_specs, load_preset, merge_attn
from ..errors import CLIError, RunError
from ..io import OutputError, OutputTarget
from ..latent import check_family, check_fit, rule_for, token_grid
from ..loading import ModelInfo, describe_model, family_of, load_pipeline
from ..tiny import WORLD_PROMPT

__all__ = ["add_parser", "run", "variant_label", "resolved_options", "resolve_device", "default_fps"]

DEFAULT_PROMPT = "a red fox running through the snow, cinematic"
_EMBEDDED_PIPELINES = {"wan": "WanPipeline", "flux": "FluxPipeline"}
_FP16_CPU = "Pipelines loaded with `dtype=torch.float16` cannot run with `cpu` device"


def add_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="run a diffusers pipeline with attention variants and write PNG/GIF/MP4")
    g.add_argument(
        "--model",
        help="Hub id or local diffusers pipeline directory (default: the embedded world model, text-to-video, or "
        "text-to-image for an image --out, as `attnplug headhunt`; the tiny pipeline where it is not installed)",
    )
    g.add_argument(
        "--config",
        help="preset name (see `attnplug list`), path to a preset YAML, or an attnplug config saved with the weights "
        "(attnplug_config.json or its directory: handle.save_pretrained)",
    )
    g.add_argument("--prompt", default=None, help=f"(default: {DEFAULT_PROMPT!r}; world model: {WORLD_PROMPT!r})")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=argtypes.seed, default=None, help="random seed in [0, 2**64 - 1] (default 0)")
    g.add_argument("--steps", type=argtypes.positive_int, default=None, help="denoising steps")
    g.add_argument("--height", type=argtypes.positive_int, default=None)
    g.add_argument("--width", type=argtypes.positive_int, default=None)
    g.add_argument("--frames", type=argtypes.positive_int, default=None, help="video frames (1 = image)")
    g.add_argument("--guidance-scale", type=argtypes.finite_float, default=None)
    g.add_argument("--fps", type=argtypes.positive_int, default=None, help="frames per second of video outputs")
    g.add_argument(
        "--attn",
        action="append",
        default=[],
        metavar="VARIANT[:k=v,...]",
        help="attention variant with options (Python literals), repeatable, e.g. gna:kernel_size=(1,3,3); "
        "'none' drops preset variants",
    )
    g.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="PROMPT@x0,y0,x1,y1",
        help="regional attention: an entity prompt and its box in fractions of the frame, repeatable, e.g. "
        "'a red circle@0,0,0.5,1' (adds `regional` unless --attn names it)",
    )
    g.add_argument(
        "--boundary",
        action="append",
        default=[],
        metavar="PHRASE@x0,y0,x1,y1",
        help="boundary attention: a phrase of --prompt and its box in fractions of the frame, repeatable "
        "(adds `boundary` unless --attn names it)",
    )
    g.add_argument("--out", default=None, help="output file: .png (image), .gif or .mp4 (video)")
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="weights/compute dtype")
    g.add_argument("--offload", action="store_true", help="accelerate model CPU offload (needs a CUDA GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated blocks")
    g.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str | None, offload: bool) -> Any:
    """A torch device that can run a pipeline here: cpu, cuda[:N] (mps / xpu where available)."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r} is not a torch device: {e}") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "xpu": bool(getattr(torch, "xpu", None) and torch.xpu.is_available()),
    }
    if device.type not in available:
        raise CLIError(f"--device {name!r}: expected cpu, cuda[:N], mps or xpu; a {device.type!r} device cannot run")
    if not available[device.type]:
        raise CLIError(f"--device {name!r}: {device.type} is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name!r}: cuda index must be in [0, {torch.cuda.device_count() - 1}]")
    if offload:
        if not torch.cuda.is_available():
            raise CLIError("--offload (accelerate model CPU offload) needs a CUDA GPU; this machine has none")
        if device.type != "cuda":
            raise CLIError(f"--offload offloads to CPU between uses on a CUDA device; got --device {name!r}")
    return device


def _peak_memory(device: Any) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return float("nan"), "process peak RSS unavailable on this platform"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process peak RSS"


def resolved_options(variant: Any, family: str) -> dict[str, Any]:
    """The variant's options with family-dependent defaults (None) replaced by the values it uses."""
    opts = variant.options() if callable(getattr(variant, "options", None)) else dict(vars(variant))
    resolved = getattr(variant, "resolved", None)
    if family and callable(resolved) and list(inspect.signature(resolved).parameters) == ["family"]:
        for key, value in resolved(family).items():
            if opts.get(key, 0) is None:
                opts[key] = value
    return opts


def variant_label(variant: Any, family: str = "") -> str:
    """`name(option=value, ...)` with the values actually used."""
    body = ", ".join(f"{k}={v}" for k, v in resolved_options(variant, family).items())
    return f"{getattr(variant, 'name', type(variant).__name__)}({body})"


def default_fps(family: str) -> int:
    """Frames per second of a family's videos (its adapter's `default_fps`; 16 when it has none)."""
    from diffusion_attn.adapters import ADAPTERS

    fps = getattr(ADAPTERS.get(family), "default_fps", None)
    return fps if fps is not None else 16


def _pick(cli: Any, preset: dict[str, Any], key: str, fallback: Any) -> Any:
    if cli is not None:
        return cli
    return preset.get(key, fallback)


class _DropMessages(logging.Filter):
    """Drops log records containing any of `needles` (messages the CLI already said once)."""

    def __init__(self, needles: list[str]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


@contextlib.contextmanager
def _quiet(needles: list[str]) -> Iterator[None]:
    """Silence diffusers' (and attnplug's diffusers-logger) repeats of what the CLI already printed."""
    flt = _DropMessages(needles)
    loggers = [logging.getLogger(n) for n in ("diffusers.attnplug", "diffusers.pipelines.pipeline_utils")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def _warn(msg: str) -> None:
    print(f"attnplug: warning: {msg}", file=sys.stderr)


@dataclass
class _Settings:
    """Generation settings resolved from the CLI, the preset and the pipeline's own call defaults."""

    pipeline: str
    family: str
    is_video: bool
    params: dict[str, inspect.Parameter]
    steps: int
    height: int | None
    width: int | None
    frames: int
    guidance: float | None
    negative: str | None
    seed: int
    fps: int
    target: OutputTarget


def _resolve(
    args: argparse.Namespace,
    pcfg: dict[str, Any],
    pipe_cls: type,
    family: str,
    info: ModelInfo,
    preset: Preset | None,
    variants: list[Any],
    where: str,
    warned: list[str],
) -> _Settings:
    """Resolve every setting and check it (sizes, --out, variants against the token grid) before loading."""
    params = dict(inspect.signature(pipe_cls.__call__).parameters)

    def default(name: str, fallback: Any = None) -> Any:
        p = params.get(name)
        return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback

    is_video = "num_frames" in params
    s = _Settings(
        pipeline=pipe_cls.__name__,
        family=family,
        is_video=is_video,
        params=params,
        steps=_pick(args.steps, pcfg, "steps", default("num_inference_steps", 50)),
        height=_pick(args.height, pcfg, "height", default("height")),
        width=_pick(args.width, pcfg, "width", default("width")),
        frames=_pick(args.frames, pcfg, "frames", default("num_frames", 1) if is_video else 1),
        guidance=_pick(args.guidance_scale, pcfg, "guidance_scale", default("guidance_scale")),
        negative=_pick(args.negative_prompt, pcfg, "negative_prompt", None),
        seed=_pick(args.seed, pcfg, "seed", 0),
        fps=_pick(args.fps, pcfg, "fps", default_fps(family)),
        target=OutputTarget("out/attnplug.png"),
    )
    region, boundary = getattr(args, "region", None), getattr(args, "boundary", None)
    if region or boundary:  # entity boxes in pixels of this size, phrases of this prompt
        sized = fill_layout(variants, region, boundary, prompt=args.prompt, size=(s.height, s.width), where=where)
        variants[:] = sized
    if preset is not None and preset.family and family and preset.family != family:
        raise CLIError(
            f"--config {preset.name} is a preset for {preset.family!r} models but --model is a {family!r} pipeline "
            f"({pipe_cls.__name__}); pick a {family} preset (attnplug list) or drop --config"
        )
    if not is_video and s.frames != 1:
        raise CLIError(f"--frames {s.frames}: {pipe_cls.__name__} makes images; use --frames 1 (or omit it)")
    video_out = is_video and s.frames > 1
    out = Path(args.out) if args.out else Path("out") / ("attnplug.mp4" if video_out else "attnplug.png")
    if out.suffix.lower() == ".png" and is_video and s.frames > 1:
        raise CLIError(f"--out {out}: a PNG holds one image; use .mp4 or .gif for {s.frames} frames (or --frames 1)")
    s.target = OutputTarget(out)
    try:
        s.target.check()
    except OutputError as e:
        raise CLIError(str(e)) from None
    if out.suffix.lower() == ".mp4":
        from ..io import require_ffmpeg

        try:
            require_ffmpeg()
        except RuntimeError as e:
            hint = "" if args.out else f" (the default output is {out}; pass --out video.gif)"
            raise CLIError(f"{e}{hint}") from None
    rule = rule_for(family, info.local_dir)
    if rule is not None and s.height is not None and s.width is not None:
        for flag, value in (("--height", s.height), ("--width", s.width)):
            if value % rule.multiple:
                near = max(rule.multiple, value // rule.multiple * rule.multiple)
                raise CLIError(
                    f"{flag} {value}: {family} needs height and width in multiples of {rule.multiple} "
                    f"(VAE {rule.vae_s} x patch {rule.patch}), e.g. {near}"
                )
        grid = token_grid(rule, s.height, s.width, s.frames)
        _check_variants_fit(variants, family, grid, s, where)
    try:
        check_family(variants, family)  # a variant's official defaults exist for this family (or are given)
    except ValueError as e:
        raise CLIError(f"{where}: {' '.join(str(e).split())} ({family} pipeline {pipe_cls.__name__})") from None
    for v in variants:
        reason_of = getattr(v, "inactive_reason", None)
        reason = reason_of(family, s.steps, 0) if callable(reason_of) and family else None
        if reason and reason not in warned:
            warned.append(reason)
            _warn(f"{reason} (--steps {s.steps}); the output is the dense model's")
    return s


def _check_variants_fit(variants: list[Any], family: str, grid: tuple[int, int, int], s: _Settings, where: str) -> None:
    """Variant options that cannot fit the token grid (e.g. a GNA kernel larger than the latent frames)."""
    try:
        check_fit(variants, family, grid)
    except (ValueError, TypeError) as e:
        f, h, w = grid
        raise CLIError(
            f"{where}: {' '.join(str(e).split())} (token grid {f}x{h}x{w} of {s.frames} frame(s) "
            f"{s.width}x{s.height} px on {family})"
        ) from None


def _compile_at_first_call(transformer: Any, handle: Any) -> None:
    """torch.compile `transformer` at its first forward, after `handle.prepare` ran one eager forward
    per variant phase with those inputs: layouts are built then, and compiled code only looks them
    up. Regional compilation of the repeated blocks (diffusers' `compile_repeated_blocks`,
    fullgraph) where the model has it: attnplug's hooks on the transformer stay outside compiled code."""
    hook: Any = None

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        hook.remove()
        if handle is not None and callable(getattr(handle, "prepare", None)):
            handle.prepare(*args, **kwargs)
        if handle is None and getattr(module, "_repeated_blocks", None) and hasattr(module, "compile_repeated_blocks"):
            module.compile_repeated_blocks(fullgraph=True)
        else:  # attnplug's processors know their layer: one graph for the whole model, not one per layer
            module.compile()

    hook = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _load_config(text: str) -> Preset:
    """`--config`: a shipped preset name, a preset YAML, or an attnplug config saved with the weights
    (`attnplug_config.json`, or the directory holding it: `handle.save_pretrained` / `save_pretrained` of a
    pipeline while applied). A saved config names the variants; the directory is the default `--model`
    when it is a pipeline directory."""
    from diffusion_attn.hooks import CONFIG_NAME, load_config

    path = Path(text).expanduser()
    saved = path / CONFIG_NAME if path.is_dir() else path
    if not (saved.name == CONFIG_NAME or saved.suffix.lower() == ".json") or not saved.is_file():
        return load_preset(text)
    try:
        cfg = load_config(saved)
    except ValueError as e:
        raise CLIError(f"--config: {e}") from None
    families = set(cfg.get("families", {}).values()) if isinstance(cfg.get("families"), dict) else set()
    model_dir = saved.parent
    return Preset(
        name=str(path),
        description="attnplug config saved with the weights",
        model=str(model_dir) if (model_dir / "model_index.json").is_file() else "",
        pipeline={},
        attn=tuple(parse_spec(a, where=f"--config {saved}") for a in cfg["attn"]),
        family=families.pop() if len(families) == 1 else None,
        source=str(saved),
    )


_SIZE_FLAGS = (("height", "--height"), ("width", "--width"), ("frames", "--frames"), ("steps", "--steps"))


def _transformer_parameters(model_dir: Path | None) -> int | None:
    """Parameters of a local pipeline's denoiser(s), from the safetensors headers (no weight is read)."""
    if model_dir is None:
        return None
    total = 0
    for sub in ("transformer", "transformer_2", "unet"):
        for f in sorted((Path(model_dir) / sub).glob("*.safetensors")):
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for key, meta in header.items():
                if key != "__metadata__":
                    n = 1
                    for d in meta["shape"]:
                        n *= int(d)
                    total += n
    return total or None


def _cpu_flops() -> float:
    """This CPU's fp32 matmul rate (FLOP/s), measured on a 512 x 512 product (about 0.1 s)."""
    import torch

    a = torch.randn(512, 512)
    a @ a
    t = time.perf_counter()
    for _ in range(8):
        a @ a
    return 8 * 2 * 512**3 / max(time.perf_counter() - t, 1e-9)


def _cost_notice(args: argparse.Namespace, pcfg: dict[str, Any], s: _Settings, info: ModelInfo, device: Any) -> None:
    """On CPU, a --model run without any size flag runs the pipeline's own (large) defaults: say what will
    run and a lower-bound time estimate before loading anything."""
    if device.type != "cpu" or getattr(args, "_cost_noticed", False):
        return
    if any(getattr(args, key) is not None or key in pcfg for key, _ in _SIZE_FLAGS):
        return
    args._cost_noticed = True
    rule = rule_for(s.family, info.local_dir)
    tokens = None
    if rule is not None and s.height is not None and s.width is not None:
        f, h, w = token_grid(rule, s.height, s.width, s.frames)
        tokens = f * h * w
    size = f"{s.width}x{s.height} px, {s.frames} frame(s), {s.steps} steps"
    estimate = "no estimate (the model's size is unknown before loading)"
    params = _transformer_parameters(info.local_dir)
    if params and tokens:
        forwards = 2 if (s.guidance or 0) > 1 else 1  # classifier-free guidance: two transformer calls a step
        rate = _cpu_flops()
        seconds = s.steps * forwards * 2 * params * tokens / rate
        count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
        when = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
        estimate = (
            f"estimate >= {when} ({count} transformer parameters x {tokens} tokens x "
            f"{s.steps} steps x {forwards} call(s) at this CPU's measured {rate / 1e9:.0f} GFLOP/s; attention "
            "and the VAE add more)"
        )
    elif tokens:
        estimate = f"{tokens} visual tokens per transformer call"
    print(
        f"attnplug: notice: no {'/'.join(flag for _, flag in _SIZE_FLAGS)} given: {s.pipeline}'s own defaults will "
        f"run on CPU: {size}; {estimate}. Pass smaller --height/--width/--frames/--steps to run less.",
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Check everything, load (or build) the pipeline, apply variants, generate, write the file."""
    t_start = time.perf_counter()
    import diffusion_attn

    preset = _load_config(args.config) if args.config else None
    pcfg: dict[str, Any] = dict(preset.pipeline) if preset else {}
    model = args.model or (preset.model if preset else None) or None
    where = "--attn" if preset is None else f"--attn/--config {preset.name}"
    specs = merge_attn(preset.attn if preset else (), [parse_spec(s, where="--attn") for s in args.attn])
    specs = layout_specs(specs, args.region, args.boundary)
    variants = fill_layout([build_variant(spec, where=where) for spec in specs], args.region, args.boundary)
    apply = getattr(diffusion_attn, "apply", None)
    if variants and not callable(apply):
        raise CLIError("--attn needs diffusion_attn.apply, which this version of diffusion_attn does not provide")
    if args.out and Path(args.out).suffix.lower() not in (".png", ".gif", ".mp4"):
        raise CLIError(f"--out must end in .png (image), .gif or .mp4 (video), got {args.out!r}")

    embedded = None
    world_label = None
    world_image = None
    if model is None:
        from ..embedded import image_default
        from ..tiny import (
            NO_TRAINED_IMAGE_MODEL,
            TINY_DEFAULTS,
            UNTRAINED_NOTICE,
            WORLD_DEFAULTS,
            WORLD_NOTICE,
            world_t2v_dir,
        )

        png = args.out is not None and Path(args.out).suffix.lower() == ".png"
        embedded = "flux" if args.frames == 1 or (png and args.frames is None) else "wan"
        world = world_t2v_dir() if embedded == "wan" else None
        if embedded == "flux":  # the CLI's image default, which `attnplug headhunt` searches too
            image = image_default()
            pcfg = {**image.defaults, **pcfg}
            print(image.notice, file=sys.stderr)
            if image.model is not None:  # the trained world text-to-image model (StableDiffusion3Pipeline)
                embedded, model, world_label, world_image = None, image.model, image.label, image.model
            else:
                print(NO_TRAINED_IMAGE_MODEL, file=sys.stderr)
        elif world is not None:  # the trained world model: a real pipeline directory, loaded like --model
            embedded, model, world_label = None, str(world), f"<embedded world t2v, trained: {world}>"
            pcfg = {**WORLD_DEFAULTS, **pcfg}
            print(WORLD_NOTICE.format(path=world), file=sys.stderr)
        else:
            pcfg = {**TINY_DEFAULTS[embedded], **pcfg}
            print(UNTRAINED_NOTICE.format(kind=embedded), file=sys.stderr)
        if png and args.frames is None and world_image is None:
            print(
                f"note: --out {args.out} is an image, so the embedded default is the tiny FLUX text-to-image "
                "pipeline instead of the video one (--out .gif/.mp4 for video)",
                file=sys.stderr,
            )
    if args.prompt is None:
        from ..world.t2i import T2I_PROMPT

        args.prompt = (T2I_PROMPT if world_image is not None else WORLD_PROMPT) if world_label else DEFAULT_PROMPT
    if embedded is not None:
        info = ModelInfo(pipeline=_EMBEDDED_PIPELINES[embedded], family=embedded)
    else:
        info = describe_model(model)

    device = resolve_device(args.device, args.offload)
    dtype_name = _pick(args.dtype, pcfg, "dtype", "bfloat16" if device.type == "cuda" else "float32")
    quiet: list[str] = []
    if device.type == "cpu" and dtype_name == "float16":
        print("note: float16 on CPU is slow and some ops lack it; float32 is the CPU default", file=sys.stderr)
        quiet.append(_FP16_CPU)
    import diffusers
    import torch

    warned: list[str] = []
    pipe_cls = getattr(diffusers, info.pipeline, None) if info.pipeline else None
    settings = None
    if isinstance(pipe_cls, type):
        settings = _resolve(args, pcfg, pipe_cls, info.family or "", info, preset, variants, where, warned)
        if embedded is None:
            _cost_notice(args, pcfg, settings, info, device)

    with _quiet(quiet + warned):
        # --- pipeline ----------------------------------------------------------------------------
        torch_dtype = getattr(torch, dtype_name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if embedded is not None:
            from ..tiny import build_tiny_pipeline

            pipe = build_tiny_pipeline(embedded)
            if torch_dtype != torch.float32:
                pipe.to(dtype=torch_dtype)
            model_label = f"<embedded tiny {embedded}, untrained>"
        else:
            pipe = load_pipeline(model, torch_dtype)
            model_label = world_label or model
        family = family_of(pipe)
        if settings is None or settings.pipeline != type(pipe).__name__:
            settings = _resolve(args, pcfg, type(pipe), family, info, preset, variants, where, warned)
            if embedded is None:
                _cost_notice(args, pcfg, settings, info, device)
        return _generate(args, pipe, settings, variants, apply, specs, warned, device, dtype_name, model_label,
                         preset, t_start)  # fmt: skip


def _generate(
    args: argparse.Namespace,
    pipe: Any,
    s: _Settings,
    variants: list[Any],
    apply: Any,
    specs: tuple,
    warned: list[str],
    device: Any,
    dtype_name: str,
    model_label: str,
    preset: Preset | None,
    t_start: float,
) -> int:
    import torch

    from ..callbacks import AttnStepCallback, CallbackList, StepTimer

    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    handle = None
    if variants:
        sig = inspect.signature(apply).parameters
        extra: dict[str, Any] = {"num_steps": s.steps} if "num_steps" in sig else {}
        if args.compile and "step_source" in sig:
            extra["step_source"] = "callback"  # the compiled forward reads no timestep on the host
        try:
            handle = apply(pipe, *variants, **extra)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise CLIError(f"could not apply {', '.join(str(x) for x in specs)} to {type(pipe).__name__}: {e}") from e
        if callable(getattr(handle, "reset", None)):
            handle.reset()
    transformer = getattr(pipe, "transformer", None)
    if args.compile:
        if transformer is None:
            raise CLIError(f"--compile: {type(pipe).__name__} has no `transformer` to compile")
        _compile_at_first_call(transformer, handle)

    timer = StepTimer()
    if transformer is not None:
        timer.attach(transformer)
    callback: Any = timer
    if handle is not None and args.compile and getattr(handle, "step_source", None) == "callback":
        callback = CallbackList(AttnStepCallback(handle), timer)
    guides = [v.callback for v in variants if callable(getattr(v, "callback", None))]  # Boundary's latent updates
    if guides:
        callback = CallbackList(callback, *guides)
    kwargs: dict[str, Any] = {
        "prompt": args.prompt,
        "num_inference_steps": s.steps,
        "generator": torch.Generator("cpu").manual_seed(s.seed),
        "output_type": "np",
        "callback_on_step_end": callback,
    }
    optional = {"height": s.height, "width": s.width, "guidance_scale": s.guidance, "negative_prompt": s.negative}
    if s.is_video:
        optional["num_frames"] = s.frames
    for key, val in optional.items():
        if val is not None:
            if key not in s.params:
                raise CLIError(f"{type(pipe).__name__} does not take {key!r}")
            kwargs[key] = val
    from ..world.t2i import t2i_call_kwargs

    for key, val in t2i_call_kwargs(pipe).items():  # a world t2i model's trained max_sequence_length (its folder)
        if key in s.params:
            kwargs[key] = val
    timer.start()
    try:
        result = pipe(**kwargs)
    except ValueError as e:
        raise CLIError(f"{type(pipe).__name__} stopped: {' '.join(str(e).split())}") from e
    finally:
        timer.detach()
        calls = getattr(handle, "attention_calls", None) if handle is not None else None
        if handle is not None and callable(getattr(handle, "remove", None)):
            handle.remove()
    images = getattr(result, "frames", None)
    if images is None:
        images = result.images
    import numpy as np

    arr = np.asarray(images[0])  # first (only) sample: video [F, H, W, C] or image [H, W, C]
    if arr.ndim == 3:
        arr = arr[None]
    if s.is_video and arr.shape[0] != s.frames:
        print(f"note: {type(pipe).__name__} produced {arr.shape[0]} frames (asked for {s.frames})", file=sys.stderr)

    from ..io import save_output

    family = s.family
    metadata = {
        "attnplug": __version__,
        "model": model_label,
        "pipeline": type(pipe).__name__,
        "family": family,
        "preset": preset.name if preset else None,
        "prompt": args.prompt,
        "negative_prompt": s.negative,
        "seed": s.seed,
        "steps": s.steps,
        "height": int(arr.shape[1]),
        "width": int(arr.shape[2]),
        "frames": int(arr.shape[0]),
        "guidance_scale": s.guidance,
        "dtype": dtype_name,
        "device": str(device),
        "attn": [{v.name: resolved_options(v, family)} for v in variants],
    }
    meta = json.loads(json.dumps(metadata, default=str))
    try:
        s.target.write(lambda p: save_output(arr, p, meta, fps=s.fps))
    except OutputError as e:
        raise RunError(str(e)) from None
    total = time.perf_counter() - t_start
    peak, how = _peak_memory(device)
    n_steps = len(timer.step_times)
    if n_steps > 1:  # steady state: the first step also pays for warm-up (compile, autotune, caches)
        per_step = f"{sum(timer.step_times[1:]) / (n_steps - 1):.3f} s/step (first step {timer.step_times[0]:.3f} s)"
    else:
        per_step = f"{timer.mean_step_s:.3f} s/step"
    attn = "; ".join(variant_label(v, family) for v in variants) if variants else "dense"
    if isinstance(calls, int):
        attn += f" [{calls} attention calls through attnplug]"
        if calls == 0 and not warned:
            _warn("no attention call ran through attnplug (every call was dense); the output is the dense model's")
    print(
        f"attnplug: wrote {s.target.path} ({arr.shape[0]} frame{'s' if arr.shape[0] != 1 else ''}, "
        f"{arr.shape[2]}x{arr.shape[1]}) | total {total:.2f} s | {n_steps} steps, {per_step} | "
        f"peak memory {peak:.1f} MiB ({how}) | attn: {attn}"
    )
    return 0

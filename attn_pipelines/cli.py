"""`attnplug` command line: generate | list | bench | show-mask.

    attnplug generate                                   # embedded tiny default, no download
    attnplug generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a fox" --attn radial --out fox.mp4
    attnplug generate --config wan2.1-t2v-14b-radial --steps 30     # preset + overrides
    attnplug list
    attnplug show-mask --variant radial:decay_factor=1 --grid 8x4x6 --text-len 4 --family wan --out mask.png
    attnplug bench --smoke

User errors (bad flags, unknown variants/options, bad presets, offline + uncached model) print one
`attnplug: error: ...` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    DTYPES,
    KNOWN_VARIANTS,
    AttnSpec,
    ConfigError,
    Preset,
    build_variant,
    field_default,
    iter_presets,
    load_preset,
    merge_attn,
    parse_attn_spec,
    type_name,
    variant_fields,
    variant_registry,
)

__all__ = ["main", "build_parser", "CLIError", "load_pipeline", "FAMILY_OF_TRANSFORMER"]

BENCH_SCRIPTS = ("kernel_bench", "diffusion_bench", "agent_bench", "channel_attn_bench")

#: diffusers transformer class -> adapter family name (for fps defaults, metadata and show-mask).
FAMILY_OF_TRANSFORMER = {
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "CogVideoXTransformer3DModel": "cogvideox",
    "LTXVideoTransformer3DModel": "ltx_video",
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
}
DEFAULT_FPS = {"wan": 16, "hunyuan_video": 24, "cogvideox": 8, "ltx_video": 24}
#: [text, visual] (True) or [visual, text] (False) joint sequences, when the adapter does not say.
TEXT_FIRST = {"cogvideox": True, "flux": True, "hunyuan_video": False, "sd3": False, "wan": False, "ltx_video": False}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _grid(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        vals = tuple(int(p, 10) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected FRAMESxHEIGHTxWIDTH of positive ints (e.g. 8x4x6), got {text!r}")
    return vals  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `attnplug` (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="attnplug", description="Attention variants for diffusers pipelines: generate, list, bench, show-mask."
    )
    p.add_argument("--version", action="version", version=f"attnplug {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="run a diffusers pipeline with attention variants and write PNG/GIF/MP4")
    g.add_argument("--model", help="Hub id or local diffusers pipeline directory (default: embedded tiny pipeline)")
    g.add_argument("--config", help="preset name (see `attnplug list`) or path to a preset YAML")
    g.add_argument("--prompt", default="a red fox running through the snow, cinematic")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=_nonneg_int, default=None, help="random seed (default 0)")
    g.add_argument("--steps", type=_positive_int, default=None, help="denoising steps")
    g.add_argument("--height", type=_positive_int, default=None)
    g.add_argument("--width", type=_positive_int, default=None)
    g.add_argument("--frames", type=_positive_int, default=None, help="video frames (1 = image)")
    g.add_argument("--guidance-scale", type=_float, default=None)
    g.add_argument("--fps", type=_positive_int, default=None, help="frames per second of video outputs")
    g.add_argument(
        "--attn",
        action="append",
        default=[],
        metavar="VARIANT[:k=v,...]",
        help="attention variant with options, repeatable (e.g. radial:dense_steps=12); 'none' drops preset variants",
    )
    g.add_argument("--out", default=None, help="output file: .png (image), .gif or .mp4 (video)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="weights/compute dtype")
    g.add_argument("--offload", action="store_true", help="accelerate model CPU offload (needs a CUDA GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    g.set_defaults(func=cmd_generate)

    ls = sub.add_parser("list", help="variants with options and defaults, model families, presets")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("bench", help="run the benchmark scripts of a source checkout and tabulate results")
    b.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCH_SCRIPTS)})")
    b.add_argument("--smoke", action="store_true", help="tiny sizes: a quick check that each benchmark runs")
    b.add_argument("--table-only", action="store_true", help="do not run anything; print the latest results")
    b.add_argument("--bench-dir", default=None, help="benchmarks folder (default: the source checkout's)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("show-mask", help="draw a variant's attention mask for a token layout as a PNG")
    m.add_argument("--variant", required=True, metavar="VARIANT[:k=v,...]")
    m.add_argument("--grid", required=True, type=_grid, metavar="FxHxW", help="visual tokens after patchify")
    m.add_argument("--text-len", type=_nonneg_int, default=0)
    m.add_argument("--family", default="wan", help="adapter family (layout conventions and family defaults)")
    order = m.add_mutually_exclusive_group()
    order.add_argument("--text-first", dest="text_first", action="store_true", default=None)
    order.add_argument("--text-last", dest="text_first", action="store_false")
    m.add_argument("--step", type=_nonneg_int, default=0)
    m.add_argument("--layer", type=_nonneg_int, default=0)
    m.add_argument("--out", default="mask.png")
    m.set_defaults(func=cmd_show_mask)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attnplug` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError) as e:
        print(f"attnplug: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnplug: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# diffusion_attn access (its API is being written in parallel: fail clearly when absent)
# ---------------------------------------------------------------------------------------------
def _diffusion_attn() -> Any:
    import diffusion_attn

    return diffusion_attn


def _adapters() -> dict[str, Any]:
    reg = getattr(_diffusion_attn(), "ADAPTERS", None)
    return dict(reg) if isinstance(reg, dict) else {}


def _apply_fn() -> Any:
    fn = getattr(_diffusion_attn(), "apply", None)
    if not callable(fn):
        raise CLIError("--attn needs diffusion_attn.apply, which this version of diffusion_attn does not provide")
    return fn


# ---------------------------------------------------------------------------------------------
# model loading
# ---------------------------------------------------------------------------------------------
def _offline_message(model: str) -> str:
    return (
        f"model {model!r} is not in the local cache and this machine is offline; pass a local directory "
        f"(--model /path/to/pipeline) or pre-download it on a machine with network access with "
        f"`hf download {model}` (or `huggingface-cli download {model}`) and copy the cache (HF_HOME)"
    )


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the Hub endpoint cannot be reached within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            return True
        endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return True
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=3):
            return False
    except OSError:
        return True


def _is_cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except Exception:
        return False


def load_pipeline(model: str, torch_dtype: Any) -> Any:
    """`DiffusionPipeline.from_pretrained` for a local directory or a Hub id, with clear errors.

    Offline (HF_HUB_OFFLINE set or the Hub unreachable) it loads with `local_files_only=True` and
    raises CLIError when the id is not cached.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        from diffusers import DiffusionPipeline

        if not (path / "model_index.json").is_file():
            raise CLIError(f"--model {model!r} is a directory but not a diffusers pipeline (no model_index.json)")
        try:
            return DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype)
        except OSError as e:
            raise CLIError(f"--model {model!r}: could not load the pipeline directory: {e}") from None
    if path.exists() or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or os.sep + os.sep in model:
        raise CLIError(f"--model {model!r}: no such directory (and not a Hub id of the form owner/name)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError as e:
        raise CLIError(f"--model {model!r} is neither a local directory nor a valid Hub id: {e}") from None
    offline = _hub_offline()
    if offline and not _is_cached(model):
        raise CLIError(_offline_message(model))
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype, local_files_only=offline)
    except OSError as e:
        if offline:
            raise CLIError(_offline_message(model) + f" (loader said: {e})") from None
        raise CLIError(f"could not load {model!r} from the Hub: {e}") from None


def _family_of(pipe: Any) -> str:
    model = getattr(pipe, "transformer", None)
    return FAMILY_OF_TRANSFORMER.get(type(model).__name__, "") if model is not None else ""


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def _resolve_device(name: str | None, offload: bool) -> Any:
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine (use --device cpu)")
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
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return mib, "process peak RSS"


def _call_params(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def _pick(cli: Any, preset: dict[str, Any], key: str, fallback: Any) -> Any:
    if cli is not None:
        return cli
    if key in preset:
        return preset[key]
    return fallback


def _variant_label(v: Any) -> str:
    opts = v.options() if callable(getattr(v, "options", None)) else {}
    body = ", ".join(f"{k}={val}" for k, val in opts.items())
    return f"{getattr(v, 'name', type(v).__name__)}({body})"


def cmd_generate(args: argparse.Namespace) -> int:
    """`attnplug generate`: load (or build) a pipeline, apply variants, generate, write the file."""
    t_start = time.perf_counter()
    preset: Preset | None = load_preset(args.config) if args.config else None
    pcfg: dict[str, Any] = dict(preset.pipeline) if preset else {}
    model = args.model or (preset.model if preset else None)

    # --- variants: validated before anything heavy is loaded ------------------------------
    specs = merge_attn(preset.attn if preset else (), [parse_attn_spec(s) for s in args.attn])
    registry = variant_registry()
    for spec in specs:
        build_variant(spec, where="--attn" if preset is None else f"--attn/--config {preset.name}", registry=registry)
    if specs:
        _apply_fn()

    # --- output format -------------------------------------------------------------------
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".png", ".gif", ".mp4"):
        raise CLIError(f"--out must end in .png (image), .gif or .mp4 (video), got {args.out!r}")

    embedded_kind = None
    if model is None:
        from .tiny import TINY_DEFAULTS, UNTRAINED_NOTICE

        want_image = args.frames == 1 or (out is not None and out.suffix.lower() == ".png" and args.frames is None)
        embedded_kind = "flux" if want_image else "wan"
        pcfg = {**TINY_DEFAULTS[embedded_kind], **pcfg}
        print(UNTRAINED_NOTICE.format(kind=embedded_kind), file=sys.stderr)

    device = _resolve_device(args.device, args.offload)
    dtype_name = _pick(args.dtype, pcfg, "dtype", "bfloat16" if device.type == "cuda" else "float32")
    if out is not None and out.suffix.lower() == ".mp4":
        from .io import require_ffmpeg

        try:
            require_ffmpeg()
        except RuntimeError as e:
            raise CLIError(str(e)) from None

    import torch

    torch_dtype = getattr(torch, dtype_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # --- pipeline ----------------------------------------------------------------------------
    if embedded_kind is not None:
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(embedded_kind)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
        model_label = f"<embedded tiny {embedded_kind}, untrained>"
    else:
        pipe = load_pipeline(model, torch_dtype)
        model_label = model
    family = _family_of(pipe)
    params = _call_params(pipe)
    is_video = "num_frames" in params

    def default(param: str, fallback: Any = None) -> Any:  # the pipeline's own default
        p = params.get(param)
        return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback

    steps = _pick(args.steps, pcfg, "steps", default("num_inference_steps", 50))
    height = _pick(args.height, pcfg, "height", default("height"))
    width = _pick(args.width, pcfg, "width", default("width"))
    frames = _pick(args.frames, pcfg, "frames", default("num_frames", 1) if is_video else 1)
    guidance = _pick(args.guidance_scale, pcfg, "guidance_scale", default("guidance_scale"))
    negative = _pick(args.negative_prompt, pcfg, "negative_prompt", None)
    seed = _pick(args.seed, pcfg, "seed", 0)
    fps = _pick(args.fps, pcfg, "fps", DEFAULT_FPS.get(family, 16))
    if not is_video and frames != 1:
        raise CLIError(f"--frames {frames}: {type(pipe).__name__} makes images; use --frames 1 (or omit it)")
    if out is None:
        out = Path("out") / ("attnplug.mp4" if is_video and frames > 1 else "attnplug.png")
        if out.suffix == ".mp4":
            from .io import require_ffmpeg

            try:
                require_ffmpeg()
            except RuntimeError as e:
                raise CLIError(f"{e} (the default output is {out}; pass --out video.gif)") from None
    if out.suffix.lower() == ".png" and is_video and frames > 1:
        raise CLIError(f"--out {out}: a PNG holds one image; use .mp4 or .gif for {frames} frames (or --frames 1)")

    # --- device placement, variants, compile ---------------------------------------------
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    variants = []
    for spec in specs:
        opts = dict(spec.options)
        cls = registry[spec.name]
        if "num_steps" in variant_fields(cls) and "num_steps" not in opts:
            opts["num_steps"] = str(steps)  # step-scheduled variants learn the generation length
        variants.append(build_variant(AttnSpec(spec.name, opts), registry=registry))
    handle = None
    if variants:
        apply = _apply_fn()
        extra = {"num_steps": steps} if "num_steps" in inspect.signature(apply).parameters else {}
        try:
            handle = apply(pipe, *variants, **extra)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise CLIError(f"could not apply {', '.join(str(s) for s in specs)} to {type(pipe).__name__}: {e}") from e
        if callable(getattr(handle, "reset", None)):
            handle.reset()
    if args.compile:
        if getattr(pipe, "transformer", None) is None:
            raise CLIError(f"--compile: {type(pipe).__name__} has no `transformer` to compile")
        pipe.transformer.compile()

    # --- run ---------------------------------------------------------------------------------
    from .callbacks import StepTimer

    timer = StepTimer()
    if getattr(pipe, "transformer", None) is not None:
        timer.attach(pipe.transformer)
    kwargs: dict[str, Any] = {
        "prompt": args.prompt,
        "num_inference_steps": steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np",
        "callback_on_step_end": timer,
    }
    optional = {"height": height, "width": width, "guidance_scale": guidance, "negative_prompt": negative}
    if is_video:
        optional["num_frames"] = frames
    for key, val in optional.items():
        if val is not None:
            if key not in params:
                raise CLIError(f"{type(pipe).__name__} does not take {key!r}")
            kwargs[key] = val
    timer.start()
    try:
        result = pipe(**kwargs)
    except ValueError as e:
        raise CLIError(f"{type(pipe).__name__} rejected the settings: {e}") from e
    finally:
        timer.detach()
        if handle is not None and callable(getattr(handle, "remove", None)):
            handle.remove()
    images = getattr(result, "frames", None)
    if images is None:
        images = result.images
    import numpy as np

    arr = np.asarray(images[0])  # first (only) sample: video [F, H, W, C] or image [H, W, C]
    if arr.ndim == 3:
        arr = arr[None]
    if is_video and arr.shape[0] != frames:
        print(f"note: {type(pipe).__name__} produced {arr.shape[0]} frames (asked for {frames})", file=sys.stderr)

    from .io import save_output

    applied = [_variant_label(v) for v in variants]
    metadata = {
        "attnplug": __version__,
        "model": model_label,
        "pipeline": type(pipe).__name__,
        "family": family,
        "preset": preset.name if preset else None,
        "prompt": args.prompt,
        "negative_prompt": negative,
        "seed": seed,
        "steps": steps,
        "height": int(arr.shape[1]),
        "width": int(arr.shape[2]),
        "frames": int(arr.shape[0]),
        "guidance_scale": guidance,
        "dtype": dtype_name,
        "device": str(device),
        "attn": [{v.name: v.options()} for v in variants],
    }
    try:
        save_output(arr, out, json.loads(json.dumps(metadata, default=str)), fps=fps)
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"--out {out}: {e}") from None
    total = time.perf_counter() - t_start
    peak, how = _peak_memory(device)
    n_steps = len(timer.step_times)
    if n_steps > 1:  # steady state: the first step also pays for warm-up (compile, autotune, caches)
        per_step = f"{sum(timer.step_times[1:]) / (n_steps - 1):.3f} s/step (first step {timer.step_times[0]:.3f} s)"
    else:
        per_step = f"{timer.mean_step_s:.3f} s/step"
    attn = "; ".join(applied) if applied else "dense"
    calls = getattr(handle, "attention_calls", None)
    if isinstance(calls, int):
        attn += f" [{calls} attention calls through attnplug]"
    print(
        f"attnplug: wrote {out} ({arr.shape[0]} frame{'s' if arr.shape[0] != 1 else ''}, "
        f"{arr.shape[2]}x{arr.shape[1]}) | total {total:.2f} s | {n_steps} steps, {per_step} | "
        f"peak memory {peak:.1f} MiB ({how}) | attn: {attn}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    """`attnplug list`: variants (options, defaults), model families, presets."""
    registry = variant_registry()
    print("Variants (use with --attn NAME:option=value,...):")
    first_name: dict[type, str] = {}
    for name in dict.fromkeys([*KNOWN_VARIANTS, *registry]):
        cls = registry.get(name)
        if cls is None:
            print(f"  {name:<10} (not implemented in this version of diffusion_attn)")
            continue
        if cls in first_name:
            print(f"  {name:<10} alias of {first_name[cls]}")
            continue
        first_name[cls] = name
        doc = (inspect.getdoc(cls) or "").split("\n")[0]
        role = getattr(cls, "role", "")
        print(f"  {name:<10} {cls.__name__} [{role}] {doc}")
        hints = {}
        try:
            import typing

            hints = typing.get_type_hints(cls)
        except Exception:
            pass
        for fname, f in variant_fields(cls).items():
            tp = type_name(hints.get(fname, f.type))
            print(f"      {fname}: {tp} = {field_default(f)!r}")
    adapters = _adapters()
    print("\nModel families (diffusion_attn adapters):")
    print("  " + (", ".join(adapters) if adapters else "(none registered in this version of diffusion_attn)"))
    print("\nPresets (attnplug generate --config NAME):")
    presets = list(iter_presets())
    w = max((len(p.name) for p in presets), default=4)
    mw = max((len(p.model) for p in presets), default=5)
    for p in presets:
        print(f"  {p.name:<{w}}  {p.model:<{mw}}  {', '.join(str(s) for s in p.attn) or 'dense'}")
    return 0


# ---------------------------------------------------------------------------------------------
# show-mask
# ---------------------------------------------------------------------------------------------
def cmd_show_mask(args: argparse.Namespace) -> int:
    """`attnplug show-mask`: render a variant's attention mask for a token layout as a PNG."""
    variant = build_variant(parse_attn_spec(args.variant), where="--variant")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must end in .png, got {args.out!r}")
    try:
        from diffusion_attn.variants import draw
        from diffusion_attn.variants.base import TokenLayout
    except ImportError as e:
        raise CLIError(f"show-mask needs diffusion_attn.variants.draw, not available in this version: {e}") from None
    render = getattr(draw, "render_variant_mask", None)
    if not callable(render):
        raise CLIError("show-mask needs diffusion_attn.variants.draw.render_variant_mask, which is missing")
    adapters = _adapters()
    if adapters and args.family not in adapters:
        raise CLIError(f"--family {args.family!r} is not one of {', '.join(adapters)}")
    if not adapters and args.family not in TEXT_FIRST:
        raise CLIError(f"--family {args.family!r} is not one of {', '.join(TEXT_FIRST)}")
    text_first = args.text_first
    if text_first is None:
        text_first = getattr(adapters.get(args.family), "text_first", TEXT_FIRST.get(args.family, False))
    try:
        layout = TokenLayout(grid=args.grid, text_len=args.text_len, text_first=bool(text_first), family=args.family)
        image = render(variant, layout, step=args.step, layer=args.layer)
    except (ValueError, TypeError) as e:
        raise CLIError(f"show-mask: {e}") from None
    except ImportError as e:
        raise CLIError(f"show-mask: a part of attnplug it needs is missing in this version: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"attnplug: wrote {out} ({image.width}x{image.height}) for {_variant_label(variant)} on {layout}")
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
def _bench_dir(arg: str | None) -> Path:
    if arg:
        d = Path(arg)
        if not d.is_dir():
            raise CLIError(f"--bench-dir {arg!r} is not a directory")
        return d
    d = Path(__file__).resolve().parents[1] / "benchmarks"
    if not d.is_dir():
        raise CLIError(
            "the benchmarks/ folder is not here: `attnplug bench` runs the scripts of a source checkout "
            "(git clone + pip install -e .), they are not part of the installed wheel; or pass --bench-dir"
        )
    return d


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


_SKIP_SUBTREES = ("versions", "device", "config")


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts as (dotted.path, value); short scalar lists are kept as one value."""
    out: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if not prefix and k in _SKIP_SUBTREES:
                continue
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        if len(data) <= 4 and all(_scalar(x) for x in data):
            out.append((prefix, data))
    elif _scalar(data):
        out.append((prefix, data))
    return out


def _rows(data: Any) -> list[dict[str, Any]]:
    """Table rows of a results JSON: its list of records, or one (metric, value) row per nested leaf."""
    if isinstance(data, dict):
        for key in ("results", "rows", "records"):
            if isinstance(data.get(key), list):
                return [r for r in data[key] if isinstance(r, dict)]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return list(data)
    return [{"metric": k, "value": v} for k, v in _flatten(data)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_results_table(results_dir: Path, names: Sequence[str]) -> int:
    """Print the newest results JSON of each benchmark name as a table; returns how many were found."""
    found = 0
    for name in names:
        files = sorted(results_dir.glob(f"{name}*.json"), key=lambda p: p.stat().st_mtime)
        if not files:
            print(f"\n== {name}: no results in {results_dir}")
            continue
        latest = files[-1]
        try:
            data = json.loads(latest.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"\n== {name}: {latest.name} is not valid JSON ({e})")
            continue
        found += 1
        device = data.get("device") if isinstance(data, dict) else None
        if isinstance(device, dict):
            device = device.get("name") or device.get("type") or json.dumps(device, default=str)
        print(f"\n== {name}: {latest.name}" + (f" (device: {device})" if device else ""))
        rows = _rows(data)
        cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if _scalar(v)))
        if not rows or not cols:
            print("  (no tabular rows)")
            continue
        widths = {c: min(48, max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows))) for c in cols}
        print(("  " + "  ".join(c[: widths[c]].ljust(widths[c]) for c in cols)).rstrip())
        for r in rows:
            print(("  " + "  ".join(_fmt(r.get(c, ""))[: widths[c]].ljust(widths[c]) for c in cols)).rstrip())
    return found


def cmd_bench(args: argparse.Namespace) -> int:
    """`attnplug bench`: run benchmarks/<name>.py [--smoke], then print the latest results."""
    bdir = _bench_dir(args.bench_dir)
    names = list(args.names) or list(BENCH_SCRIPTS)
    unknown = [n for n in names if n not in BENCH_SCRIPTS]
    if unknown:
        raise CLIError(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCH_SCRIPTS)}")
    status = 0
    if not args.table_only:
        missing = [n for n in names if not (bdir / f"{n}.py").is_file()]
        if missing:
            present = sorted(p.stem for p in bdir.glob("*.py"))
            raise CLIError(f"benchmark script(s) missing in {bdir}: {missing}; present: {present or 'none'}")
        for n in names:
            cmd = [sys.executable, str(bdir / f"{n}.py")] + (["--smoke"] if args.smoke else [])
            print(f"attnplug: running {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.run(cmd, cwd=bdir.parent).returncode
            if rc != 0:
                print(f"attnplug: {n} failed with exit status {rc}", file=sys.stderr)
                status = 1
    found = print_results_table(bdir / "results", names)
    if args.table_only and found == 0:
        raise CLIError(f"no results JSON in {bdir / 'results'} for {', '.join(names)}")
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

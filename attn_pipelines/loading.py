"""Find and load a diffusers pipeline: local directory or Hub id, offline-aware, with one-line errors.

`describe_model` reads only `model_index.json` (local, or the Hub cache) so the CLI knows the
pipeline class and model family before loading any weight.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import CLIError
from .latent import FAMILY_OF_TRANSFORMER, read_model_index

__all__ = ["ModelInfo", "describe_model", "load_pipeline", "family_of", "dtype_kwarg"]


@dataclass(frozen=True)
class ModelInfo:
    """What is known about `--model` before loading: the pipeline class name, family, local directory."""

    pipeline: str | None = None
    family: str | None = None
    local_dir: Path | None = None


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
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return True
    url = urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=3):
            return False
    except OSError:
        return True


def _cached_index(model: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # invalid ids, unreadable cache: treated as not cached
        return None
    return Path(found) if isinstance(found, str) else None


def _is_cached(model: str) -> bool:
    return _cached_index(model) is not None


def _from_index(index: dict[str, Any] | None, local_dir: Path | None) -> ModelInfo:
    if not index:
        return ModelInfo(local_dir=local_dir)
    entry = index.get("transformer") or index.get("unet") or [None, None]
    family = FAMILY_OF_TRANSFORMER.get(entry[1]) if isinstance(entry, list) and len(entry) == 2 else None
    return ModelInfo(pipeline=index.get("_class_name"), family=family, local_dir=local_dir)


def _check_id(model: str) -> Path | None:
    """The local directory `model` names, or None for a valid Hub id; CLIError otherwise."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CLIError(f"--model {model!r} is a directory but not a diffusers pipeline (no model_index.json)")
        return path
    if path.exists() or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or os.sep * 2 in model:
        raise CLIError(f"--model {model!r}: no such directory (and not a Hub id of the form owner/name)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError as e:
        raise CLIError(f"--model {model!r} is neither a local directory nor a valid Hub id: {e}") from None
    return None


def describe_model(model: str) -> ModelInfo:
    """Pipeline class and family of `model` from its model_index.json (local or cached), without loading."""
    local = _check_id(model)
    if local is not None:
        return _from_index(read_model_index(local), local)
    cached = _cached_index(model)
    return _from_index(read_model_index(cached.parent), None) if cached is not None else ModelInfo()


def dtype_kwarg() -> str:
    """`dtype` where diffusers takes it (it deprecates `torch_dtype`), else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _absent_components(local: Path) -> dict[str, None]:
    """Components a local `model_index.json` records as absent (`[null, null]`, e.g. an SD3 pipeline saved with
    `text_encoder_3=None`), passed as None: diffusers refuses to load such a folder unless they are passed."""
    index = read_model_index(local) or {}
    return {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], (None, None))}


def load_pipeline(model: str, torch_dtype: Any) -> Any:
    """`DiffusionPipeline.from_pretrained` for a local directory or a Hub id, with clear errors.

    Offline (HF_HUB_OFFLINE set or the Hub unreachable) it loads with `local_files_only=True` and
    raises CLIError when the id is not cached.
    """
    from diffusers import DiffusionPipeline

    kw = {dtype_kwarg(): torch_dtype}
    local = _check_id(model)
    if local is not None:
        kw.update(_absent_components(local))
        try:
            return DiffusionPipeline.from_pretrained(str(local), **kw)
        except OSError as e:
            raise CLIError(f"--model {model!r}: could not load the pipeline directory: {e}") from None
    offline = _hub_offline()
    if offline and not _is_cached(model):
        raise CLIError(_offline_message(model))
    try:
        return DiffusionPipeline.from_pretrained(model, local_files_only=offline, **kw)
    except OSError as e:
        if offline:
            raise CLIError(_offline_message(model) + f" (loader said: {e})") from None
        raise CLIError(f"could not load {model!r} from the Hub: {e}") from None


def family_of(pipe: Any) -> str:
    """Adapter family of a loaded pipeline ('' when its transformer is not one attnplug knows)."""
    model = getattr(pipe, "transformer", None)
    return FAMILY_OF_TRANSFORMER.get(type(model).__name__, "") if model is not None else ""

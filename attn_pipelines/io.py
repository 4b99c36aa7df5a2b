"""Write generated images/videos with the run's settings embedded, and read them back.

PNG: a tEXt chunk "attnplug" holding JSON. GIF: the comment extension (JSON). MP4: the
container's `comment` tag, written by ffmpeg through imageio-ffmpeg (the `video` extra).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OUTPUT_FORMATS", "METADATA_KEY", "to_uint8_frames", "save_output", "read_metadata", "require_ffmpeg"]

OUTPUT_FORMATS = (".png", ".gif", ".mp4")
METADATA_KEY = "attnplug"


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Frames as uint8 [F, H, W, 3] from float [0, 1] or uint8 arrays ([H, W, 3] = one frame)."""
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must be [F, H, W, C] with C in (1, 3, 4), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise ValueError("frames contain NaN or inf; refusing to write them")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def require_ffmpeg() -> Any:
    """The `imageio_ffmpeg` module, or a RuntimeError telling how to install it."""
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise RuntimeError(
            "writing MP4 needs imageio-ffmpeg: install the video extra (`pip install 'attnplug[video]'`) "
            "or write a .gif / .png instead"
        ) from e
    return imageio_ffmpeg


def save_output(frames: Any, path: str | Path, metadata: dict[str, Any], fps: int = 16) -> Path:
    """Write `frames` to `path` (format from the extension) with `metadata` embedded as JSON."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in OUTPUT_FORMATS:
        raise ValueError(f"--out must end in one of {', '.join(OUTPUT_FORMATS)}, got {str(path)!r}")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an int >= 1, got {fps!r}")
    arr = to_uint8_frames(frames)
    text = json.dumps(metadata, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image, PngImagePlugin

    if ext == ".png":
        if arr.shape[0] != 1:
            raise ValueError(f"a PNG holds one image but the output has {arr.shape[0]} frames; use .mp4 or .gif")
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, text)
        Image.fromarray(arr[0]).save(path, pnginfo=info)
    elif ext == ".gif":
        images = [Image.fromarray(f) for f in arr]
        images[0].save(
            path,
            save_all=True,
            append_images=images[1:],
            duration=max(1, round(1000 / fps)),
            loop=0,
            comment=text.encode("utf-8"),
        )
    else:
        ffmpeg = require_ffmpeg()
        h, w = arr.shape[1:3]
        if h % 2 or w % 2:
            raise ValueError(f"MP4 (H.264, yuv420p) needs even height and width, got {h}x{w}; use .gif")
        writer = ffmpeg.write_frames(
            str(path),
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=8,
            macro_block_size=1,
            output_params=["-metadata", f"comment={text}"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for f in arr:
            writer.send(np.ascontiguousarray(f))
        writer.close()
    return path


def _parse_ffmetadata(text: str) -> dict[str, str]:
    """Parse ffmpeg's FFMETADATA1 output (backslash escapes for = ; # \\ and newline)."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line or line.startswith(";") or line.startswith("["):
            continue
        # join escaped newlines
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):
            line = line[:-1] + "\n" + lines[i]
            i += 1
        key, val, esc, cur, seen_eq = "", [], False, [], False
        for ch in line:
            if esc:
                cur.append(ch)
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == "=" and not seen_eq:
                key, cur, seen_eq = "".join(cur), [], True
            else:
                cur.append(ch)
        val = "".join(cur)
        if seen_eq:
            out[key] = val
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The settings JSON embedded by `save_output` (KeyError when the file carries none)."""
    path = Path(path)
    ext = path.suffix.lower()
    from PIL import Image

    if ext == ".png":
        with Image.open(path) as im:
            text = im.text.get(METADATA_KEY)  # type: ignore[attr-defined]
    elif ext == ".gif":
        with Image.open(path) as im:
            raw = im.info.get("comment")
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    elif ext == ".mp4":
        exe = require_ffmpeg().get_ffmpeg_exe()
        res = subprocess.run(
            [exe, "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
            capture_output=True,
            text=True,
            check=True,
        )
        text = _parse_ffmetadata(res.stdout).get("comment")
    else:
        raise ValueError(f"path must end in one of {', '.join(OUTPUT_FORMATS)}, got {str(path)!r}")
    if not text:
        raise KeyError(f"{path} carries no attnplug metadata")
    return json.loads(text)

"""Write generated images/videos with the run's settings embedded, and read them back.

PNG: a tEXt chunk "attnplug" holding JSON. GIF: the comment extension (JSON). MP4: the
container's `comment` tag, written through imageio-ffmpeg's `write_frames` (the `video` extra) and
read back with its ffmpeg binary, bit-exact flags on so the same frames give the same bytes.
`OutputTarget` checks a destination before any work and writes through a temporary file renamed
into place.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OUTPUT_FORMATS", "METADATA_KEY", "OutputError", "OutputTarget", "to_uint8_frames", "save_output"]
__all__ += ["read_metadata", "require_ffmpeg"]

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


class OutputError(Exception):
    """An output path that cannot be written, or a write that failed; the message names the option."""


class OutputTarget:
    """An output file checked before any work and written atomically.

    `check()` refuses a bad extension, an existing directory, a parent that is a file and a folder
    where no file can be created (it creates and deletes a probe file). `write(fn)` calls
    `fn(temp_path)` on a temporary file next to the target (same extension), then renames it onto
    the target: a failed or interrupted write (full disk, ffmpeg error) leaves no partial file.
    """

    def __init__(self, path: str | Path, option: str = "--out", formats: tuple[str, ...] = OUTPUT_FORMATS) -> None:
        self.path = Path(path)
        self.option = option
        self.formats = formats

    def _fail(self, why: str) -> OutputError:
        return OutputError(f"{self.option} {str(self.path)!r}: {why}")

    def _existing_ancestor(self) -> Path:
        parent = self.path.parent if str(self.path.parent) else Path(".")
        while not parent.exists() and not parent.is_symlink():
            parent = parent.parent
        return parent

    def check(self) -> None:
        """Raise OutputError when the target cannot be written (nothing is left behind)."""
        if self.path.suffix.lower() not in self.formats:
            raise self._fail(f"must end in {' or '.join(self.formats)}")
        if self.path.is_dir():
            raise self._fail("is an existing directory; give a file name")
        ancestor = self._existing_ancestor()
        if not ancestor.is_dir():
            raise self._fail(f"{str(ancestor)!r} is a file, not a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=".attnplug-probe-", dir=ancestor)
        except OSError as e:
            raise self._fail(f"cannot create files in {str(ancestor)!r}: {e.strerror or e}") from None
        os.close(fd)
        os.unlink(probe)

    def write(self, fn: Callable[[Path], None]) -> Path:
        """Write through `fn(temp_path)`, then rename onto the target; OutputError on any failure."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=self.path.suffix, dir=self.path.parent)
        except OSError as e:
            raise self._fail(f"cannot create the file: {e.strerror or e}") from None
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            fn(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if tmp.stat().st_size == 0:
                raise OSError("the writer produced an empty file")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(tmp, self.path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, (OSError, RuntimeError, ValueError)):
                why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
                raise self._fail(f"writing failed, nothing was written: {why}") from None
            raise
        return self.path


def _write_mp4(arr: np.ndarray, path: Path, text: str, fps: int) -> None:
    """H.264 MP4 through `imageio_ffmpeg.write_frames`, then read back: RuntimeError unless the file holds every
    frame (write_frames does not look at ffmpeg's exit status, so a truncated file is caught here)."""
    iio = require_ffmpeg()
    h, w = arr.shape[1:3]
    params = ["-crf", "10", "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
              "-metadata", f"comment={text}", "-f", "mp4"]  # fmt: skip
    writer = iio.write_frames(str(path), (w, h), fps=fps, codec="libx264", quality=None, macro_block_size=1,
                              ffmpeg_log_level="error", output_params=params)  # fmt: skip
    try:
        writer.send(None)
        for frame in arr:
            writer.send(np.ascontiguousarray(frame))
    except OSError as e:  # ffmpeg stopped reading: its own message went to stderr
        raise RuntimeError(f"ffmpeg stopped reading frames ({str(e).splitlines()[0]})") from None
    finally:
        writer.close()
    try:
        frames = iio.count_frames_and_secs(str(path))[0]
    except RuntimeError as e:
        raise RuntimeError(f"ffmpeg wrote no readable MP4 ({str(e).strip().splitlines()[-1]})") from None
    if frames != len(arr):
        raise RuntimeError(f"ffmpeg wrote {frames} of {len(arr)} frames")


def save_output(frames: Any, path: str | Path, metadata: dict[str, Any], fps: int = 16) -> Path:
    """Write `frames` to `path` (format from the extension) with `metadata` embedded as JSON.

    Writes the file in place; the CLI wraps this in `OutputTarget.write` for atomic writes.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in OUTPUT_FORMATS:
        raise ValueError(f"--out must end in one of {', '.join(OUTPUT_FORMATS)}, got {str(path)!r}")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an int >= 1, got {fps!r}")
    arr = to_uint8_frames(frames)
    text = json.dumps(metadata, sort_keys=True, default=str)
    from PIL import Image, PngImagePlugin

    if ext == ".png":
        if arr.shape[0] != 1:
            raise ValueError(f"a PNG holds one image but the output has {arr.shape[0]} frames; use .mp4 or .gif")
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, text)
        Image.fromarray(arr[0]).save(path, format="PNG", pnginfo=info)
    elif ext == ".gif":
        images = [Image.fromarray(f) for f in arr]
        images[0].save(
            path,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(1, round(1000 / fps)),
            loop=0,
            comment=text.encode("utf-8"),
        )
    else:
        h, w = arr.shape[1:3]
        if h % 2 or w % 2:
            raise ValueError(f"MP4 (H.264, yuv420p) needs even height and width, got {h}x{w}; use .gif")
        _write_mp4(arr, path, text, fps)
    return path


def _ffmetadata_comment(text: str) -> str | None:
    """The `comment` entry of ffmpeg's FFMETADATA1 output: one line (our JSON holds no newline), with a
    backslash before each = ; # \\ it contains."""
    for line in text.splitlines():
        if line.startswith("comment="):
            return re.sub(r"\\(.)", r"\1", line[len("comment=") :])
    return None


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
        text = _ffmetadata_comment(res.stdout)
    else:
        raise ValueError(f"path must end in one of {', '.join(OUTPUT_FORMATS)}, got {str(path)!r}")
    if not text:
        raise KeyError(f"{path} carries no attnplug metadata")
    return json.loads(text)

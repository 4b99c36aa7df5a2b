"""MP4 output through imageio-ffmpeg's `write_frames`: every frame written, the settings JSON read back intact
(ffmpeg's FFMETADATA escapes = ; # and backslashes), and a truncated file is an error, not a success."""

from __future__ import annotations

import numpy as np
import pytest

from attn_pipelines import io

iio = pytest.importorskip("imageio_ffmpeg")


def _frames(n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 48, 3), dtype=np.uint8)


def test_mp4_round_trip_keeps_every_frame_and_awkward_metadata(tmp_path):
    meta = {"prompt": 'a=b; c#d \\ "quoted" \u00e9\nnext', "attn": [{"radial": {"decay": 0.5}}], "seed": 7}
    out = io.save_output(_frames(), tmp_path / "v.mp4", meta, fps=8)
    assert io.read_metadata(out) == meta
    n, secs = iio.count_frames_and_secs(str(out))
    assert n == 4 and secs == pytest.approx(0.5)
    first = next(f for i, f in enumerate(iio.read_frames(str(out))) if i == 1)  # frame 0 of the video
    assert len(first) == 32 * 48 * 3


def test_same_frames_give_the_same_bytes(tmp_path):
    a = io.save_output(_frames(), tmp_path / "a.mp4", {"k": 1}).read_bytes()
    b = io.save_output(_frames(), tmp_path / "b.mp4", {"k": 1}).read_bytes()
    assert a == b


def test_ffmetadata_comment_unescapes_and_ignores_other_keys():
    text = ';FFMETADATA1\nmajor_brand=isom\ncomment={"a\\=b\\;c\\#\\\\": 1}\nencoder=Lavf\n'
    assert io._ffmetadata_comment(text) == '{"a=b;c#\\": 1}'
    assert io._ffmetadata_comment(";FFMETADATA1\nencoder=Lavf\n") is None


def test_a_short_or_unreadable_mp4_is_an_error(tmp_path, monkeypatch):
    """write_frames ignores ffmpeg's exit status: the read-back check reports what it left."""
    real = iio.write_frames

    def first_two(*args, **kwargs):  # an ffmpeg that stops taking frames after two
        gen = real(*args, **kwargs)
        gen.send(None)
        for _ in range(2):
            gen.send((yield))
        try:
            while True:
                yield
        finally:
            gen.close()

    monkeypatch.setattr(iio, "write_frames", first_two)
    with pytest.raises(RuntimeError, match="ffmpeg wrote 2 of 4 frames"):
        io.save_output(_frames(), tmp_path / "t.mp4", {"k": 1})

    def garbage(path, *args, **kwargs):  # an ffmpeg that exits having written junk
        with open(path, "wb") as f:
            f.write(b"not a video")
        while True:
            yield

    monkeypatch.setattr(iio, "write_frames", garbage)
    with pytest.raises(RuntimeError, match="ffmpeg wrote no readable MP4"):
        io.save_output(_frames(), tmp_path / "g.mp4", {"k": 1})

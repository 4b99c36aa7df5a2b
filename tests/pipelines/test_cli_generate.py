"""`attnplug generate` end to end on tiny real pipelines saved to a temp dir and loaded back."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion_attn
from attn_pipelines.cli import main
from attn_pipelines.io import read_metadata
from diffusion_attn.variants.base import Variant

SUMMARY = re.compile(
    r"attnplug: wrote (?P<out>\S+) \((?P<frames>\d+) frames?, (?P<w>\d+)x(?P<h>\d+)\) \| total [\d.]+ s \| "
    r"(?P<steps>\d+) steps, [\d.]+ s/step( \(first step [\d.]+ s\))? \| "
    r"peak memory [\d.]+ MiB \((?P<mem>[^)]+)\) \| attn: (?P<attn>.+)"
)


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------------------------
# real subprocesses (the console entry as a user runs it)
# ----------------------------------------------------------------------------------------------
def test_subprocess_video_mp4_from_saved_pipeline(cli, tiny_wan_dir, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    out = tmp_path / "v.mp4"
    r = cli(
        "generate", "--model", str(tiny_wan_dir), "--prompt", "a fox in the snow", "--seed", "3",
        "--steps", "2", "--frames", "5", "--height", "32", "--width", "48", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = SUMMARY.search(r.stdout)
    assert m, r.stdout
    assert (m["frames"], m["w"], m["h"], m["steps"], m["attn"]) == ("5", "48", "32", "2", "dense")
    assert m["mem"] in ("process peak RSS", "CUDA max_memory_allocated")
    video = iio.imread(out)
    assert video.shape == (5, 32, 48, 3)
    meta = read_metadata(out)
    assert meta["prompt"] == "a fox in the snow" and meta["seed"] == 3 and meta["steps"] == 2
    assert meta["pipeline"] == "WanPipeline" and meta["family"] == "wan" and meta["attn"] == []
    assert "EMBEDDED DEFAULT" not in r.stderr


def test_subprocess_image_png_via_dunder_main(tiny_flux_dir, tmp_path, make_env):
    import subprocess
    import sys

    out = tmp_path / "img.png"
    r = subprocess.run(
        [sys.executable, "-m", "attn_pipelines", "generate", "--model", str(tiny_flux_dir), "--steps", "2",
         "--height", "48", "--width", "32", "--out", str(out), "--guidance-scale", "2.5"],
        env=make_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.size == (32, 48)
    meta = read_metadata(out)
    assert meta["pipeline"] == "FluxPipeline" and meta["guidance_scale"] == 2.5 and meta["frames"] == 1


def test_subprocess_offline_uncached_hub_id_is_a_clear_error(cli, make_env, tmp_path):
    env = make_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = cli("generate", "--model", "attnplug-tests/not-a-cached-model", "--out", str(tmp_path / "x.png"), env=env)
    assert r.returncode == 2
    assert "not in the local cache and this machine is offline" in r.stderr
    assert "pass a local directory" in r.stderr and "download" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# in-process runs through main(argv)
# ----------------------------------------------------------------------------------------------
def test_gif_output_has_frames_size_and_metadata(tiny_wan_dir, tmp_path, capsys):
    out = tmp_path / "v.gif"
    rc = main(["generate", "--model", str(tiny_wan_dir), "--steps", "2", "--frames", "5", "--height", "32",
               "--width", "32", "--out", str(out), "--negative-prompt", "blurry", "--fps", "10"])  # fmt: skip
    assert rc == 0
    with Image.open(out) as im:
        assert im.n_frames == 5 and im.size == (32, 32)
        assert im.info["duration"] == 100  # 10 fps
    meta = read_metadata(out)
    assert meta["negative_prompt"] == "blurry" and meta["frames"] == 5 and meta["dtype"] == "float32"


def test_embedded_default_says_it_is_untrained(tmp_path, capsys):
    out = tmp_path / "default.png"
    assert main(["generate", "--frames", "1", "--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "EMBEDDED DEFAULT" in err and "untrained" in err and "noise" in err
    meta = read_metadata(out)
    assert meta["model"].startswith("<embedded tiny flux")
    assert _png(out).shape == (64, 64, 3)


def test_embedded_default_video(tmp_path, capsys):
    out = tmp_path / "default.gif"
    assert main(["generate", "--steps", "2", "--out", str(out)]) == 0
    assert "tiny wan" in capsys.readouterr().err
    with Image.open(out) as im:
        assert im.n_frames == 9


def test_same_seed_reproduces_and_seed_changes_output(tiny_wan_dir, tmp_path):
    args = ["generate", "--model", str(tiny_wan_dir), "--steps", "2", "--frames", "1", "--height", "32",
            "--width", "32"]  # fmt: skip
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main([*args, "--seed", seed, "--out", str(tmp_path / f"{name}.png")]) == 0
    a, b, c = (_png(tmp_path / f"{n}.png") for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------------------------
# --attn plumbing, independent of the real variants: a registered stand-in variant
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Scale(Variant):
    """Test stand-in: scales the transformer output."""

    name: ClassVar[str] = "scale"
    role: ClassVar[str] = "modifier"
    factor: float = 1.0
    repeats: int = 1
    axes: tuple[int, ...] = ()


class _Handle:
    def __init__(self, pipe, variants):
        self.variants = variants
        self.removed = False
        self.resets = 0
        factor = float(np.prod([v.factor for v in variants]))

        def hook(mod, args, kwargs, out):
            return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out

        self._h = pipe.transformer.register_forward_hook(hook, with_kwargs=True)

    def remove(self):
        self._h.remove()
        self.removed = True

    def reset(self):
        self.resets += 1

    def set_step(self, i):
        pass


@pytest.fixture
def fake_registry(monkeypatch):
    handles = []

    def apply(pipe, *variants):
        h = _Handle(pipe, variants)
        handles.append(h)
        return h

    monkeypatch.setattr(diffusion_attn, "VARIANTS", {"scale": _Scale}, raising=False)
    monkeypatch.setattr(diffusion_attn, "apply", apply, raising=False)
    return handles


def test_attn_options_are_typed_applied_and_removed(fake_registry, tiny_wan_dir, tmp_path, capsys):
    base = ["generate", "--model", str(tiny_wan_dir), "--steps", "2", "--frames", "1", "--height", "32",
            "--width", "32", "--seed", "5"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "dense.png")]) == 0
    assert main([*base, "--attn", "scale:factor=0.25,repeats=3,axes=(1,2)", "--out", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "attn: scale(factor=0.25, repeats=3, axes=(1, 2))" in out
    (h,) = fake_registry
    (v,) = h.variants
    assert v == _Scale(factor=0.25, repeats=3, axes=(1, 2)) and isinstance(v.factor, float)
    assert h.removed and h.resets == 1
    assert not np.array_equal(_png(tmp_path / "dense.png"), _png(tmp_path / "s.png"))
    assert read_metadata(tmp_path / "s.png")["attn"] == [{"scale": {"factor": 0.25, "repeats": 3, "axes": [1, 2]}}]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nosuch", "unknown variant 'nosuch'; valid variants: radial, gna, lite, ultravico, softpag, regional"),
        ("scale:power=2", "unknown option 'power' for variant 'scale'; valid options: factor, repeats, axes"),
        ("scale:factor=big", "scale.factor: expected float, got 'big'"),
        ("scale:repeats=1.5", "scale.repeats: expected int"),
        ("scale:factor", "is not key=value"),
        ("ultravico:alpha=0.9", "not implemented in this version of diffusion_attn (implemented: scale)"),
    ],
)
def test_bad_attn_specs_fail_clearly(fake_registry, spec, needle, tmp_path, capsys):
    rc = main(["generate", "--attn", spec, "--out", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not fake_registry  # nothing was applied (failed before loading anything)


# ----------------------------------------------------------------------------------------------
# --attn with the real diffusion_attn variants (skipped until they are registered)
# ----------------------------------------------------------------------------------------------
def test_real_gna_changes_the_wan_output(tiny_wan_dir, tmp_path, capsys):
    reg = getattr(diffusion_attn, "VARIANTS", {})
    if "gna" not in reg or not callable(getattr(diffusion_attn, "apply", None)):
        pytest.skip("diffusion_attn.apply / VARIANTS['gna'] not available yet")
    base = ["generate", "--model", str(tiny_wan_dir), "--steps", "2", "--frames", "5", "--height", "64",
            "--width", "64", "--seed", "1"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "dense.gif")]) == 0
    assert main([*base, "--attn", "gna:kernel_size=(1,1,1),block_size=16", "--out", str(tmp_path / "g.gif")]) == 0
    m = re.search(r"attn: gna\(.*\) \[(\d+) attention calls through attnplug\]", capsys.readouterr().out)
    assert m and int(m[1]) >= 2 * 2 * 2  # 2 steps x CFG (2 passes) x 2 layers, at least
    import imageio.v3 as iio

    assert not np.array_equal(iio.imread(tmp_path / "dense.gif"), iio.imread(tmp_path / "g.gif"))
    meta = read_metadata(tmp_path / "g.gif")
    assert meta["attn"][0]["gna"]["kernel_size"] in ([1, 1, 1], 1)


# ----------------------------------------------------------------------------------------------
# other bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--out", "x.bmp"], "--out must end in .png (image), .gif or .mp4 (video)"),
        (["--config", "no-such-preset"], "unknown preset 'no-such-preset'; shipped presets:"),
        (["--frames", "5", "--out", "v.png"], "a PNG holds one image"),
        (["--device", "warp9"], "--device 'warp9' is not a torch device"),
        (["--model", "/definitely/not/here"], "no such directory"),
        (["--model", "not a valid id!"], "neither a local directory nor a valid Hub id"),
    ],
)
def test_bad_generate_input_fails_clearly(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--steps", "1", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_image_pipeline_rejects_frames(tiny_flux_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_flux_dir), "--frames", "3", "--out", str(tmp_path / "x.gif")]) == 2
    assert "FluxPipeline makes images; use --frames 1" in capsys.readouterr().err


def test_directory_without_model_index_is_rejected(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a diffusers pipeline (no model_index.json)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--height", "-4"], ["--guidance-scale", "nan"], ["--bogus"]])
def test_argparse_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", *argv])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_offload_without_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--offload", "--out", str(tmp_path / "x.png")]) == 2
    assert "--offload (accelerate model CPU offload) needs a CUDA GPU" in capsys.readouterr().err


def test_bad_yaml_key_names_key_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndescription: d\nmodel: a/b\nattn: []\n"
        "pipeline: {height: 32, width: 32, frames: 1, steps: 2, guidance_scale: 1.0, dtype: float32, hieght: 3}\n"
    )
    assert main(["generate", "--config", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'pipeline.hieght'" in err and str(bad) in err


def test_preset_values_with_cli_overrides(tiny_wan_dir, tmp_path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        f"name: mine\ndescription: tiny\nmodel: {tiny_wan_dir}\nattn: []\n"
        "pipeline: {height: 32, width: 48, frames: 5, steps: 3, guidance_scale: 4.0, dtype: float32, fps: 4}\n"
    )
    out = tmp_path / "p.gif"
    assert main(["generate", "--config", str(preset), "--steps", "2", "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert (meta["steps"], meta["height"], meta["width"], meta["frames"]) == (2, 32, 48, 5)
    assert meta["guidance_scale"] == 4.0 and meta["preset"] == "mine"
    assert " 2 steps," in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.info["duration"] == 250  # fps 4 from the preset


def test_preset_variants_merge_with_cli_and_none_drops_them(fake_registry, tiny_wan_dir, tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        f"name: p\ndescription: tiny\nmodel: {tiny_wan_dir}\nattn: [{{scale: {{factor: 0.5}}}}]\n"
        "pipeline: {height: 32, width: 32, frames: 1, steps: 2, guidance_scale: 4.0, dtype: float32}\n"
    )
    assert (
        main(["generate", "--config", str(preset), "--attn", "scale:repeats=2", "--out", str(tmp_path / "a.png")]) == 0
    )
    (h,) = fake_registry
    assert h.variants == (_Scale(factor=0.5, repeats=2),)
    assert main(["generate", "--config", str(preset), "--attn", "none", "--out", str(tmp_path / "b.png")]) == 0
    assert len(fake_registry) == 1  # nothing applied the second time
    assert read_metadata(tmp_path / "b.png")["attn"] == []
    assert capsys.readouterr().out.rstrip().endswith("attn: dense")


def test_wan_frame_count_rounding_is_reported(tiny_wan_dir, tmp_path, capsys):
    out = tmp_path / "r.gif"
    args = [
        "generate",
        "--model",
        str(tiny_wan_dir),
        "--steps",
        "1",
        "--frames",
        "6",
        "--height",
        "32",
        "--width",
        "32",
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert "produced 5 frames (asked for 6)" in capsys.readouterr().err
    assert read_metadata(out)["frames"] == 5


def test_mp4_without_imageio_ffmpeg_says_install_the_video_extra(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import now raises ImportError
    assert main(["generate", "--steps", "1", "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert "writing MP4 needs imageio-ffmpeg" in err and "attnplug[video]" in err
    assert not (tmp_path / "v.mp4").exists()


def test_attn_without_apply_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delattr(diffusion_attn, "apply", raising=False)
    assert main(["generate", "--attn", "radial", "--out", str(tmp_path / "x.png")]) == 2
    assert "--attn needs diffusion_attn.apply" in capsys.readouterr().err


def test_shipped_preset_resolves_its_hub_model_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(diffusion_attn, "apply", lambda pipe, *v: None, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import attn_pipelines.cli as cli_mod

    monkeypatch.setattr(cli_mod, "_is_cached", lambda model: False)  # never load a real cached checkpoint here
    rc = main(["generate", "--config", "wan2.1-t2v-1.3b-radial", "--steps", "2", "--out", str(tmp_path / "x.mp4")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers' is not in the local cache and this machine is offline" in err


def test_readme_main_job_writes_the_default_mp4(monkeypatch, tmp_path, capsys):
    """`attnplug generate` with no flags (the README's main command): embedded default -> out/attnplug.mp4."""
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--steps", "2"]) == 0
    out = tmp_path / "out" / "attnplug.mp4"
    assert iio.imread(out).shape == (9, 64, 64, 3)
    assert read_metadata(out)["model"] == "<embedded tiny wan, untrained>"
    assert "wrote out/attnplug.mp4" in capsys.readouterr().out

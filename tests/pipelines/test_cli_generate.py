"""`attnplug generate` end to end on tiny real pipelines saved to a temp dir and loaded back."""

from __future__ import annotations

import dataclasses
import re
import resource
import shutil
import subprocess
import sys
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
        "--steps", "2", "--frames", "5", "--height", "32", "--width", "48", "--out", str(out), "--dtype", "float16",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # no warning floods: diffusers' torch_dtype deprecation and its fp16-on-CPU warning (x3) are not printed
    assert "torch_dtype" not in r.stderr and "cannot run with `cpu`" not in r.stderr
    assert r.stderr.count("float16 on CPU is slow") == 1
    m = SUMMARY.search(r.stdout)
    assert m, r.stdout
    assert (m["frames"], m["w"], m["h"], m["steps"], m["attn"]) == ("5", "48", "32", "2", "dense")
    assert m["mem"] in ("process peak RSS", "CUDA max_memory_allocated")
    video = iio.imread(out)
    assert video.shape == (5, 32, 48, 3)
    meta = read_metadata(out)
    assert meta["prompt"] == "a fox in the snow" and meta["seed"] == 3 and meta["steps"] == 2
    assert meta["pipeline"] == "WanPipeline" and meta["family"] == "wan" and meta["attn"] == []
    assert meta["dtype"] == "float16"
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


def test_embedded_default_says_it_is_untrained(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNPLUG_WORLD_DIR", str(tmp_path / "no_world"))  # no trained model: the tiny FLUX fallback
    out = tmp_path / "default.png"
    assert main(["generate", "--frames", "1", "--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "EMBEDDED DEFAULT" in err and "untrained" in err and "noise" in err
    meta = read_metadata(out)
    assert meta["model"].startswith("<embedded tiny flux")
    assert _png(out).shape == (64, 64, 3)


def test_embedded_default_image_is_the_world_t2i_model(tmp_path, capsys):
    """An image without --model: the world's TRAINED text-to-image model (assets/world/t2i), said so; it draws
    in the default prompt's colour (red: more red pixels than of any other world colour). Where and what it
    draws is scored in tests/world/test_t2i.py (against benchmarks/results/world_t2i_accuracy.json)."""
    out = tmp_path / "default.png"
    assert main(["generate", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "EMBEDDED DEFAULT is attnplug's world text-to-image model" in err and "untrained" not in err
    meta = read_metadata(out)
    assert meta["model"].startswith("<embedded world t2i, trained") and meta["prompt"] == "a red circle at the top left"
    img = _png(out).astype(np.float32) / 255
    assert img.shape == (32, 32, 3)
    from attn_pipelines.world.data import COLORS

    counts = {c: int((np.linalg.norm(img - np.array(rgb), axis=-1) < 0.3).sum()) for c, rgb in COLORS.items()}
    assert counts["red"] >= 20 and counts["red"] == max(counts.values()), counts


def test_embedded_default_video(tmp_path, capsys):
    """Video without --model: the world's TRAINED text-to-video model (assets/world/t2v), said so."""
    out = tmp_path / "default.gif"
    assert main(["generate", "--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "EMBEDDED DEFAULT: attnplug's world text-to-video model" in err and "untrained" not in err
    with Image.open(out) as im:
        assert im.n_frames == 9 and im.size == (32, 32)
    meta = read_metadata(out)
    assert meta["model"].startswith("<embedded world t2v, trained") and meta["prompt"] == "a red circle moving right"


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
        ("nosuch", "unknown variant 'nosuch'; valid variants: scale (planned, not implemented yet: ultravico, softpag"),
        ("scale:power=2", "unknown option 'power' for variant 'scale'; valid options: factor, repeats, axes"),
        ("scale:factor=big", "--attn scale.factor: expected float, got 'big'"),
        ("scale:repeats=1.5", "--attn scale.repeats: expected int, got 1.5"),
        ("scale:axes=(1,x)", "--attn scale.axes[1]: expected int, got 'x'"),
        ("scale:factor", "is not key=value"),
        ("ultravico:alpha=0.9", "variant 'ultravico' is planned but not implemented in this version (implemented: "),
    ],
)
def test_bad_attn_specs_fail_clearly(fake_registry, spec, needle, tmp_path, capsys):
    rc = main(["generate", "--attn", spec, "--out", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not fake_registry  # nothing was applied (failed before loading anything)


# ----------------------------------------------------------------------------------------------
# --attn with the real diffusion_attn variants: prove they ran, not only the exit code
# ----------------------------------------------------------------------------------------------
def _calls(out: str) -> int:
    m = re.search(r"\[(\d+) attention calls through attnplug\]", out)
    assert m, out
    return int(m[1])


def test_real_gna_runs_every_call_through_attnplug(tiny_wan_dir, tmp_path, capsys):
    base = ["generate", "--model", str(tiny_wan_dir), "--steps", "2", "--frames", "5", "--height", "64",
            "--width", "64", "--seed", "1"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "dense.gif")]) == 0
    assert main([*base, "--attn", "gna:kernel_size=(1,1,1),block_size=16", "--out", str(tmp_path / "g.gif")]) == 0
    out = capsys.readouterr().out
    assert _calls(out) == 2 * 2 * 2  # 2 steps x CFG (2 passes) x 2 layers: every self-attention call
    import imageio.v3 as iio

    assert not np.array_equal(iio.imread(tmp_path / "dense.gif"), iio.imread(tmp_path / "g.gif"))
    assert read_metadata(tmp_path / "g.gif")["attn"][0]["gna"]["kernel_size"] == [1, 1, 1]


def test_real_radial_sparse_phase_ran_and_the_summary_shows_resolved_values(tiny_wan_dir, tmp_path, capsys):
    # 21 frames -> 6 latent frames of 4x4 tokens: frame pairs 3 apart are dropped (density 0.83 at blocks of 16)
    base = ["generate", "--model", str(tiny_wan_dir), "--steps", "3", "--frames", "21", "--height", "64",
            "--width", "64", "--seed", "1"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "dense.gif")]) == 0
    spec = "radial:dense_steps=1,dense_layers=0,block_size=16"
    assert main([*base, "--attn", spec, "--out", str(tmp_path / "r.gif")]) == 0
    out = capsys.readouterr().out
    assert _calls(out) == 2 * 2 * 2  # steps 1 and 2 sparse x CFG x 2 layers; step 0 dense (model's processor)
    assert "radial(decay_factor=0.2, dense_steps=1, dense_layers=0," in out and "attention_sink=True" in out
    assert "None" not in out.split("attn: ")[-1].split("num_steps")[0]  # family defaults resolved
    meta = read_metadata(tmp_path / "r.gif")["attn"][0]["radial"]
    assert meta["decay_factor"] == 0.2 and meta["attention_sink"] is True
    import imageio.v3 as iio

    assert not np.array_equal(iio.imread(tmp_path / "dense.gif"), iio.imread(tmp_path / "r.gif"))


def test_radial_inside_its_dense_warm_up_warns_once(cli, tiny_wan_dir, tmp_path):
    """Every step inside radial's 12 dense warm-up steps: said once (the CLI), not again by diffusers' logger."""
    r = cli("generate", "--model", str(tiny_wan_dir), "--attn", "radial", "--steps", "2", "--frames", "5",
            "--height", "32", "--width", "32", "--out", str(tmp_path / "r.gif"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Radial does nothing") == 1, r.stderr
    assert "attnplug: warning: Radial: dense_steps=12" in r.stderr and "(--steps 2)" in r.stderr
    assert "[0 attention calls through attnplug]" in r.stdout


# ----------------------------------------------------------------------------------------------
# same seed -> same bytes
# ----------------------------------------------------------------------------------------------
def test_readme_main_command_twice_gives_byte_identical_files(cli, tmp_path):
    """The README's main job (embedded tiny Wan, MP4) run twice with one seed: identical bytes; GIF too."""
    pytest.importorskip("imageio_ffmpeg")
    outs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        d.mkdir()
        r = cli("generate", "--steps", "2", "--seed", "7", cwd=d)
        assert r.returncode == 0, r.stderr
        outs.append((d / "out" / "attnplug.mp4").read_bytes())
    assert outs[0] == outs[1]
    gifs = []
    for i in range(2):
        assert main(["generate", "--steps", "2", "--seed", "7", "--out", str(tmp_path / f"{i}.gif")]) == 0
        gifs.append((tmp_path / f"{i}.gif").read_bytes())
    assert gifs[0] == gifs[1]


# ----------------------------------------------------------------------------------------------
# checks before loading: a pipeline directory whose weights are gone fails only if it is loaded
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def weightless_wan(tiny_wan_dir, tmp_path):
    """A copy of the tiny Wan pipeline without its weights: loading it fails, reading its config works."""
    d = shutil.copytree(tiny_wan_dir, tmp_path / "weightless")
    for f in d.rglob("*.safetensors"):
        f.unlink()
    return d


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--out", "/proc/x.gif"], "--out '/proc/x.gif': cannot create files in '/proc'"),
        (["--out", "{tmp}/file/x.gif"], "'{tmp}/file' is a file, not a directory"),
        (["--out", "{tmp}/x.gif"], "--out '{tmp}/x.gif': is an existing directory"),
        (
            ["--attn", "gna"],
            "--attn: gna: Neighborhood.kernel_size[0] (frames, extent 3) must be in [1, 3], got 7 "
            "(token grid 3x4x4 of 9 frame(s) 64x64 px on wan)",
        ),
        (["--attn", "gna:kernel_size=(1,3,3),dilation=(1,2,2)"], "Neighborhood.dilation[1] (height, extent 4)"),
        (["--height", "40"], "--height 40: wan needs height and width in multiples of 16 (VAE 8 x patch 2), e.g. 32"),
        (["--frames", "5", "--out", "{tmp}/v.png"], "a PNG holds one image"),
        (
            ["--config", "flux.1-dev-gna"],
            "--config flux.1-dev-gna is a preset for 'flux' models but --model is a 'wan' pipeline (WanPipeline)",
        ),
    ],
)
def test_bad_settings_fail_before_loading_weights(argv, needle, weightless_wan, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "x.gif").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base = ["generate", "--model", str(weightless_wan), "--steps", "2", "--frames", "9", "--height", "64",
            "--width", "64"]  # fmt: skip
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert needle.replace("{tmp}", str(tmp_path)) in err and err.count("attnplug: error:") == 1, err


def test_weightless_fixture_really_fails_to_load(weightless_wan, tmp_path, capsys):
    assert main(["generate", "--model", str(weightless_wan), "--steps", "1", "--out", str(tmp_path / "x.gif")]) != 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--seed", "99999999999999999999"], "argument --seed: expected an integer in [0, 18446744073709551615]"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, "),
        (["--device", "meta"], "--device 'meta': expected cpu, cuda[:N], mps or xpu"),
        (["--out", "/proc/x.png"], "--out '/proc/x.png': cannot create files in '/proc'"),
    ],
)
def test_one_line_errors_in_a_subprocess(argv, needle, cli, tmp_path):
    r = cli("generate", *argv, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and needle in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error:" in ln]) == 1 and "usage:" not in r.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# failed writes: nothing left behind, never reported as written
# ----------------------------------------------------------------------------------------------
def _limit_file_size():  # a "full disk" for this process: writes past 4 KiB fail (EFBIG / SIGXFSZ for ffmpeg)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("ext", ["gif", "mp4"])
def test_a_failed_write_leaves_no_file_and_exits_1(ext, tiny_wan_dir, tmp_path, make_env):
    if ext == "mp4":
        pytest.importorskip("imageio_ffmpeg")
    d = tmp_path / "outdir"
    d.mkdir()
    out = d / f"v.{ext}"
    r = subprocess.run(
        [sys.executable, "-m", "attn_pipelines.cli", "generate", "--model", str(tiny_wan_dir), "--steps", "1",
         "--frames", "5", "--height", "64", "--width", "64", "--out", str(out)],
        env=make_env(), capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"attnplug: error: --out '{out}': writing failed, nothing was written" in r.stderr
    assert "Traceback" not in r.stderr and "wrote" not in r.stdout
    assert list(d.iterdir()) == []  # no partial file, no temporary file


def test_png_out_switching_the_embedded_default_to_flux_is_said(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNPLUG_WORLD_DIR", str(tmp_path / "no_world"))  # no trained model: the tiny FLUX fallback
    assert main(["generate", "--steps", "1", "--out", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert "--out " in err and "is an image, so the embedded default is the tiny FLUX text-to-image pipeline" in err
    assert read_metadata(tmp_path / "x.png")["model"] == "<embedded tiny flux, untrained>"


def test_compile_has_no_graph_break(tiny_wan_dir, tmp_path, monkeypatch, capsys):
    """--compile with a sparse variant: attnplug's hooks (step timer, layouts built before tracing) leave
    Dynamo nothing to break on. Traced with the eager backend (no C++ compile in CI)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "eager"}))
    torch._dynamo.reset()
    counters.clear()
    argv = ["generate", "--model", str(tiny_wan_dir), "--steps", "3", "--frames", "5", "--height", "32", "--width",
            "32", "--compile", "--attn", "radial:dense_steps=1,dense_layers=0,block_size=16", "--out",
            str(tmp_path / "c.gif")]  # fmt: skip
    assert main(argv) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert dict(counters["graph_break"]) == {}
    assert _calls(capsys.readouterr().out) > 0
    torch._dynamo.reset()


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
    from attn_pipelines import loading

    monkeypatch.setattr(loading, "_cached_index", lambda model: None)  # never load a real cached checkpoint here
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
    assert iio.imread(out).shape == (9, 32, 32, 3)
    assert read_metadata(out)["model"].startswith("<embedded world t2v, trained")
    assert "wrote out/attnplug.mp4" in capsys.readouterr().out

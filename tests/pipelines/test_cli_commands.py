"""`attnplug list`, `bench`, `show-mask`, and the built wheel shipping the presets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attn_pipelines.cli import main
from attn_pipelines.commands.bench import BENCH_SCRIPTS, print_results_table
from attn_pipelines.config import PLANNED_VARIANTS, preset_names, variant_registry

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(r) -> str:
    """stderr of a failed CLI subprocess: exactly one `attnplug: error:` line, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert len([ln for ln in lines if "error" in ln]) == 1, r.stderr
    return r.stderr


# ----------------------------------------------------------------------------------------------
# list
# ----------------------------------------------------------------------------------------------
def test_list_prints_both_sides_options_models_and_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in variant_registry():
        assert f"  {name} " in out
    assert "decay_factor: float | None = None" in out and "kernel_size: int | tuple[int, int, int] = 7" in out
    planned = [n for n in PLANNED_VARIANTS if n not in variant_registry()]
    assert f"planned, not implemented yet: {', '.join(planned)}" in out or not planned
    vision = out[out.index("Vision variants") : out.index("Registered timm models")]
    for name, option in (("agent", "num_agents: int = 49"), ("coord", "reduction: int = 32"), ("eca", "kernel_size")):
        assert f"  {name} " in vision and option in vision
    import vision_attn.models

    for name in vision_attn.models.registered_names():
        assert name in out
    assert "agent_deit_tiny_patch16_224" in out
    presets = out[out.index("Presets") :]
    for name in preset_names():
        assert name in presets
    usable = re.search(r"wan2\.1-t2v-14b-radial .*\n", presets)[0]
    assert "radial:decay_factor=0.2,dense_steps=12,dense_layers=1" in usable and "NOT USABLE" not in usable
    from attn_pipelines.config import ConfigError, load_preset

    for name in preset_names():
        try:
            usable = load_preset(name).usable
        except ConfigError:
            continue  # listed as INVALID (test_list_shows_an_invalid_preset_without_hiding_the_others)
        line = next(ln for ln in presets.splitlines() if ln.startswith(f"  {name} "))
        assert ("NOT USABLE: needs" in line) != usable, line


def test_list_shows_an_invalid_preset_without_hiding_the_others(monkeypatch, capsys):
    from attn_pipelines.commands import listing
    from attn_pipelines.config import ConfigError, load_preset

    def load(name):
        if name == "ltx-video-lite":
            raise ConfigError("preset ltx-video-lite: attn[0] lite: LiteAttention.threshold must be in ...")
        return load_preset(name)

    monkeypatch.setattr(listing, "load_preset", load)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ltx-video-lite  [INVALID: preset ltx-video-lite: attn[0] lite:" in out
    assert "wan2.1-t2v-14b-radial" in out and "cogvideox-5b-lite" in out


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------
_SCRIPT = """
import argparse, json, pathlib, sys
ap = argparse.ArgumentParser()
ap.add_argument("--smoke", action="store_true")
ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
a = ap.parse_args()
out = pathlib.Path(a.out)
rows = [{"shape": "B1H2N256", "ms": 1.25, "smoke": a.smoke}, {"shape": "B1H2N512", "ms": 3.5, "smoke": a.smoke}]
(out / "{stem}_new.json").write_text(json.dumps({"device": "cpu", "results": rows}))
sys.exit({rc})
"""


def _fake_bench(tmp_path: Path, scripts: dict[str, int] | None = None) -> Path:
    """A benchmarks/ folder with scripts that honour --smoke/--out and exit with the given status."""
    bdir = tmp_path / "benchmarks"
    (bdir / "results").mkdir(parents=True)
    for name, rc in (scripts or {"kernel_bench": 0}).items():
        (bdir / f"{name}.py").write_text(
            textwrap.dedent(_SCRIPT.replace("{stem}", BENCH_SCRIPTS[name]).replace("{rc}", str(rc)))
        )
    old = bdir / "results" / "kernel_bench_old.json"
    old.write_text(json.dumps({"device": "cpu", "results": [{"shape": "OLD", "ms": 9.0}]}))
    t = time.time() - 100
    os.utime(old, (t, t))
    return bdir


def test_bench_full_run_writes_results_and_tabulates_the_latest(tmp_path, capsys):
    bdir = _fake_bench(tmp_path)
    assert main(["bench", "kernel_bench", "--bench-dir", str(bdir)]) == 0
    out = capsys.readouterr().out
    assert (bdir / "results" / "kernel_bench_new.json").is_file()
    assert "kernel_bench_new.json (device: cpu)" in out and "B1H2N512" in out and "3.5" in out and "OLD" not in out


def test_bench_smoke_writes_to_a_temp_dir_never_the_source_tree(tmp_path, capsys, monkeypatch):
    bdir = _fake_bench(tmp_path)
    before = sorted(p.name for p in (bdir / "results").iterdir())
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert main(["bench", "kernel_bench", "--smoke", "--bench-dir", str(bdir)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (bdir / "results").iterdir()) == before
    (smoke_dir,) = (tmp_path / "tmp").iterdir()
    assert (smoke_dir / "kernel_bench_new.json").is_file() and f"smoke results are in {smoke_dir}" in out
    assert "True" in out  # --smoke reached the script
    assert main(["bench", "--smoke", "--out", str(bdir / "results"), "--bench-dir", str(bdir)]) == 2
    assert "smoke numbers are not results" in capsys.readouterr().err


def test_bench_lists_every_script_and_fails_when_one_fails(tmp_path, capsys):
    assert {"cpu_reference_bench", "hopper_features"} <= set(BENCH_SCRIPTS)
    bdir = _fake_bench(tmp_path, {"kernel_bench": 0, "cpu_reference_bench": 3, "hopper_features": 0})
    rc = main(["bench", "kernel_bench", "cpu_reference_bench", "hopper_features", "--bench-dir", str(bdir),
               "--out", str(tmp_path / "o")])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1
    assert "cpu_reference_bench failed with exit status 3" in captured.err
    assert "attnplug: error: 1 of 3 benchmark(s) failed: cpu_reference_bench (exit status 3)" in captured.err
    assert "hopper_features_new.json" in captured.out  # the others still ran and were tabulated
    assert "cpu_reference_new.json" in captured.out  # results file stem differs from the script name


def test_bench_failure_exit_status_through_a_subprocess(tmp_path, cli):
    bdir = _fake_bench(tmp_path, {"agent_bench": 1})
    r = cli("bench", "agent_bench", "--bench-dir", str(bdir), "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert _one_line_error(r).count("attnplug: error: 1 of 1 benchmark(s) failed: agent_bench (exit status 1)") == 1


def test_bench_table_flattens_nested_results(tmp_path, capsys):
    res = tmp_path / "results"
    res.mkdir()
    data = {
        "device": {"name": "NVIDIA H100"},
        "versions": {"torch": "x"},
        "op": {"ms": {"sdpa": 283.0, "gna": 29.1}, "speedup": {"gna": 9.725}},
    }
    (res / "diffusion_bench.json").write_text(json.dumps(data))
    assert print_results_table(res, ["diffusion_bench", "agent_bench"]) == 1
    out = capsys.readouterr().out
    assert "diffusion_bench.json (device: NVIDIA H100)" in out
    assert re.search(r"op\.speedup\.gna\s+9\.725", out) and re.search(r"op\.ms\.sdpa\s+283", out)
    assert "versions" not in out and "agent_bench: no results" in out


def test_bench_errors(tmp_path, capsys):
    bdir = _fake_bench(tmp_path)
    assert main(["bench", "agent_bench", "--bench-dir", str(bdir)]) == 2
    assert "benchmark script(s) missing" in capsys.readouterr().err
    assert main(["bench", "nope", "--bench-dir", str(bdir)]) == 2
    assert "unknown benchmark(s) ['nope']; valid: kernel_bench" in capsys.readouterr().err
    assert main(["bench", "--bench-dir", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["bench", "agent_bench", "--table-only", "--bench-dir", str(bdir)]) == 2
    assert "no results JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# show-mask
# ----------------------------------------------------------------------------------------------
def _drawn(path: Path, n: int) -> np.ndarray:
    """The mask read back from a show-mask PNG: one sample per token pair, True = visited (dark)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    top, cell = arr.shape[0] - arr.shape[1], arr.shape[1] / n
    centers = ((np.arange(n) + 0.5) * cell).astype(int)
    return arr[top + centers][:, centers].astype(int).sum(-1) < 384


def test_show_mask_draws_the_exact_neighborhood(tmp_path, capsys):
    out = tmp_path / "mask.png"
    rc = main(["show-mask", "--variant", "gna:kernel_size=3,block_size=16", "--grid", "4x6x6", "--text-len", "4",
               "--family", "wan", "--step", "2", "--layer", "1", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    n = 4 * 36 + 4
    drawn = _drawn(out, n)
    # independent oracle: 3x3x3 clamped neighborhood on the 4x6x6 grid, text tokens (last 4) dense
    f, h, w = np.meshgrid(np.arange(4), np.arange(6), np.arange(6), indexing="ij")
    coords = np.stack([f.ravel(), h.ravel(), w.ravel()], 1)
    ext = np.array([4, 6, 6])
    start = np.clip(coords - 1, 0, ext - 3)  # NATTEN window: centred, shifted inside the extent
    inside = (coords[None, :, :] >= start[:, None, :]) & (coords[None, :, :] < start[:, None, :] + 3)
    ref = np.ones((n, n), dtype=bool)
    ref[:144, :144] = inside.all(-1)
    assert np.array_equal(drawn, ref), f"{(drawn != ref).sum()} token pairs differ"
    assert "gna(kernel_size=3," in captured.out and "step 2, layer 1" in captured.out
    assert f"density {ref.mean():.3f}" in captured.out


def test_show_mask_radial_draws_the_sparse_phase_by_default(tmp_path, capsys):
    out = tmp_path / "r.png"
    assert main(["show-mask", "--variant", "radial:block_size=16", "--grid", "8x4x8", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "step 12, layer 1" in said  # Wan: 12 dense warm-up steps, 1 dense layer
    drawn = _drawn(out, 256)
    assert 0.05 < drawn.mean() < 0.95  # sparse, not the dense warm-up
    assert main(["show-mask", "--variant", "radial", "--grid", "8x4x8", "--step", "0", "--out", str(out)]) == 0
    assert "(dense at every step and layer tried)" in capsys.readouterr().out
    assert _drawn(out, 256).all()


def test_show_mask_matches_the_variants_token_mask_with_permutation(tmp_path, capsys):
    """Text first (CogVideoX) is permuted behind the video by radial; the picture is in original order."""
    import torch

    import diffusion_attn as da
    from attn_pipelines.maskdraw import variant_token_mask
    from diffusion_attn.variants.base import TokenLayout

    out = tmp_path / "c.png"
    opts = "block_size=16,dense_steps=0,dense_layers=0,decay_factor=0.95,attention_sink=False"  # no CogVideoX defaults
    argv = ["show-mask", "--variant", f"radial:{opts}", "--grid", "6x4x4", "--text-len", "5",
            "--family", "cogvideox", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    layout = TokenLayout(grid=(6, 4, 4), text_len=5, text_first=True, family="cogvideox")
    radial = da.Radial(block_size=16, dense_steps=0, dense_layers=0, decay_factor=0.95, attention_sink=False)
    ref = variant_token_mask(radial, layout, step=0, layer=0).numpy()
    assert not ref.all() and np.array_equal(_drawn(out, 101), ref)
    assert torch.is_tensor(torch.from_numpy(ref))


def test_show_mask_wan_480p_grid_in_bounded_memory(tmp_path):
    """21x30x52 tokens (Wan 480p, 81 frames): the token mask would be 1 GB of bools (the issue saw a
    10 GB peak); drawn from the block layout it stays near the interpreter's own footprint."""
    from tests.pipelines.conftest import cli_env

    out = tmp_path / "w.png"
    code = (
        "import json, resource, subprocess, sys; "
        "r = subprocess.run([sys.executable, '-m', 'attn_pipelines.cli', 'show-mask', '--variant', 'radial', "
        f"'--grid', '21x30x52', '--out', {str(out)!r}], capture_output=True, text=True); "
        "print(json.dumps([r.returncode, r.stdout, r.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    rc, stdout, stderr, peak_kib = json.loads(r.stdout)
    assert rc == 0, stderr
    assert peak_kib < 1600 * 1024, peak_kib // 1024  # python + torch + diffusers alone is ~800 MB
    assert "step 12, layer 1" in stdout and "(sampled, 4x4 token pairs per pixel)" in stdout
    with Image.open(out) as im:
        assert max(im.size) <= 800


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--variant", "nosuch", "--grid", "2x2x2"], "unknown variant 'nosuch'"),
        (["--variant", "gna", "--grid", "2x2x2", "--out", "m.jpg"], "--out 'm.jpg': must end in .png"),
        (["--variant", "gna", "--grid", "2x2x2", "--family", "nope"], "--family 'nope' is not one of"),
        (["--variant", "lite:threshold=nan", "--grid", "2x2x2"], "LiteAttention.threshold must be in"),
        (["--variant", "gna", "--grid", "2x2x2"], "--variant gna on --grid 2x2x2: Neighborhood.kernel_size[0]"),
        (["--variant", "radial", "--grid", "200x200x200"], "8,000,000 tokens; show-mask draws layouts of up to"),
        (["--variant", "radial", "--grid", "2x2x2", "--out", "/proc/x.png"], "cannot create files in '/proc'"),
        (["--variant", "radial", "--grid", "2x2x2", "--out", "f/x.png"], "'f' is a file, not a directory"),
    ],
)
def test_show_mask_errors(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    assert main(["show-mask", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_show_mask_huge_grid_and_bad_out_are_one_line_errors_in_a_subprocess(cli, tmp_path):
    for argv in (["--grid", "200x200x200"], ["--grid", "2x2x2", "--out", "/proc/x.png"]):
        r = cli("show-mask", "--variant", "radial", *argv, cwd=tmp_path)
        assert r.returncode == 2
        _one_line_error(r)
    assert not list(tmp_path.iterdir())


def test_show_mask_bad_grid_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["show-mask", "--variant", "gna", "--grid", "8x4"])
    assert "FRAMESxHEIGHTxWIDTH" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the built wheel ships the presets and the world's checkpoints as package data
# ----------------------------------------------------------------------------------------------
def test_built_wheel_lists_and_loads_presets(tmp_path):
    """Presets and the embedded world model come from the installed wheel (a folder that is not the checkout)."""
    pytest.importorskip("setuptools", reason="--no-build-isolation builds with the environment's setuptools")
    # Build from a clean copy: an in-tree setuptools build would leave build/ and *.egg-info in the repo,
    # and a stale build/lib could hide files that no longer exist.
    import shutil

    src = tmp_path / "src"
    junk = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "results", "out")
    shutil.copytree(ROOT, src, ignore=junk)
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("attnplug-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("attn_pipelines/configs/") and n.endswith(".yaml"))
    assert [Path(n).stem for n in shipped] == preset_names()
    assert "attn_spec/__init__.py" in names and "attn_pipelines/commands/generate.py" in names
    world = "attn_pipelines/assets/world/t2v/"
    for part in ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json"):
        assert world + part in names, f"the wheel lacks {world + part}: `attnplug generate` needs it"
    assert any(n.startswith(world + "transformer/") and n.endswith(".safetensors") for n in names)
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    code = (
        "import attn_pipelines.config as c, sys; "
        "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
        "print(c.load_preset('wan2.1-t2v-14b-radial').model)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(site)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    code = (
        "import sys; from attn_pipelines.tiny import world_t2v_dir; d = world_t2v_dir(); "
        "assert d is not None and str(d).startswith(sys.argv[1]), d; print(d)"
    )  # no ATTNPLUG_WORLD_DIR in env: the wheel's package data
    r = subprocess.run([sys.executable, "-c", code, str(site)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "attn_pipelines.cli", "list"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in preset_names():
        assert name in r.stdout
    r = subprocess.run([sys.executable, "-m", "attn_pipelines.cli", "bench", "--smoke"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "benchmarks/ folder is not here" in r.stderr


# ----------------------------------------------------------------------------------------------
# maskdraw: the plan evaluated pair by pair equals the variant's own token mask
# ----------------------------------------------------------------------------------------------
def test_pair_mask_reads_multi_word_element_masks():
    """Blocks of 64 keys: element-mask bits in the second 32-bit word are read at the right place."""
    import torch

    import diffusion_attn as da
    from attn_pipelines.maskdraw import PairMask, plan_call, variant_token_mask
    from diffusion_attn.variants.base import TokenLayout

    for v in (da.Neighborhood(kernel_size=3, block_size=64, permute=False), da.Neighborhood(kernel_size=(1, 3, 5))):
        layout = TokenLayout(grid=(4, 8, 10), text_len=3, family="wan")
        plan = plan_call(v, layout, 0, 0)
        assert plan.layout.has_element_mask
        n = layout.seq_len
        ref = variant_token_mask(v, layout)
        assert torch.equal(PairMask(plan, n)(torch.arange(n), torch.arange(n)), ref)


def test_render_averages_every_pair_of_a_pixel():
    """1,601 tokens at 768 px: 3 tokens per pixel, every pair evaluated, the pixel = the mean."""
    import torch

    import diffusion_attn as da
    from attn_pipelines.maskdraw import _OFF, _ON, plan_call, render_plan, variant_token_mask
    from diffusion_attn.variants.base import TokenLayout

    v = da.Radial(block_size=16, dense_steps=0, dense_layers=0)
    layout = TokenLayout(grid=(16, 10, 10), text_len=1, family="hunyuan_video")  # text: no frame lines drawn
    img, density, exact = render_plan(plan_call(v, layout, 0, 0), layout)
    ref = variant_token_mask(v, layout, step=0, layer=0).float()
    assert exact and abs(density - ref.mean().item()) < 1e-6
    pooled = torch.nn.functional.avg_pool2d(ref[None, None], 3, ceil_mode=True)[0, 0].numpy()
    frac = ((_OFF - np.asarray(img).astype(np.float32)) / (_OFF - _ON)).mean(-1)
    assert frac.shape == pooled.shape and np.abs(frac - pooled).max() < 0.01
    assert (np.abs(pooled - np.round(pooled)) > 0.05).mean() > 0.02  # partly visited pixels exist to compare

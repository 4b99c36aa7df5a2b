"""`attnplug headhunt` (issue 11): search on the CLI's image default (the world's text-to-image model, the tiny FLUX
without it), resume from --out, feed the result to generate."""

from __future__ import annotations

import json

import pytest

from attn_pipelines.cli import main

SMALL = ["--steps", "1", "--height", "32", "--width", "32", "--no-progress"]


@pytest.fixture
def tiny_default(tmp_path, monkeypatch):
    """The CLI's image default without the world's text-to-image model: the tiny FLUX (the world points at an
    empty folder)."""
    (tmp_path / "no_world").mkdir()
    monkeypatch.setenv("ATTNPLUG_WORLD_DIR", str(tmp_path / "no_world"))


def test_headhunt_resumes_and_its_result_drives_generate(tmp_path, capsys, tiny_default):
    # without the world's text-to-image model both commands fall back to the tiny FLUX: `tiny_default` runs that
    # fallback (the installed model: test_headhunt_default_is_generates_image_default)
    out = tmp_path / "hh.json"
    args = ["headhunt", "--prompt", "a fox", "--prompt", "a cat", "--out", str(out), *SMALL]
    assert main([*args, "--max-evaluations", "2"]) == 0
    std = capsys.readouterr()
    assert "headhunt stopped by --max-evaluations after 2 of 4 evaluations; selected heads: none yet" in std.out
    assert "EMBEDDED DEFAULT" in std.err
    state = json.loads(out.read_text())
    assert state["evaluations"] == 2 and state["settings"]["pairs"] == [["a fox", 0], ["a cat", 1]]
    assert state["settings"]["objective"] == "total_variation" and state["model"]["family"] == "flux"
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "headhunt complete after 4 of 4 evaluations; selected heads: (" in text
    assert f"--attn softpag:heads_file={out},u=1.0" in text
    png = tmp_path / "x.png"
    assert main(["generate", "--attn", f"softpag:heads_file={out},u=0.5", "--steps", "1", "--height", "32",
                 "--width", "32", "--out", str(png)]) == 0  # fmt: skip
    assert "attention calls through attnplug]" in capsys.readouterr().out and png.is_file()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--u", "2"], "--u/--scale: SoftPAG.u must be in [0.0, 1.0], got 2.0"),
        (["--scale", "0"], "--u and --scale must be > 0 for a search"),
        (["--objective", "lpips"], "--objective 'lpips': expected clip[:MODEL] or tv"),
        (["--seeds", "1,2"], "--seeds: 2 seed(s) for 1 prompt(s); give one seed per prompt"),
        (["--prompts-file", "/nonexistent/p.txt"], "--prompts-file '/nonexistent/p.txt': No such file"),
        (["--objective", "clip:nobody/no-such-clip"], "CLIP model 'nobody/no-such-clip' is not available locally"),
        (["--layers", "5"], "HeadHunter.layers must be layer indices in [0, 1], got [5]"),
    ],
)
def test_headhunt_bad_input_is_one_line(extra, needle, tmp_path, capsys, tiny_default):  # --layers: tiny FLUX's 2
    assert main(["headhunt", "--prompt", "a fox", "--out", str(tmp_path / "h.json"), *SMALL, *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    assert needle in err[-1] and err[-1].startswith("attnplug: error: ")
    assert not (tmp_path / "h.json").exists()


def test_headhunt_refuses_an_out_of_other_settings_before_loading(tmp_path, capsys, monkeypatch):
    out = tmp_path / "hh.json"
    assert main(["headhunt", "--prompt", "a fox", "--out", str(out), "--max-evaluations", "1", *SMALL]) == 0
    import attn_pipelines.loading
    import attn_pipelines.tiny

    def no_load(*a, **k):
        raise AssertionError("loaded a pipeline")

    monkeypatch.setattr(attn_pipelines.tiny, "build_tiny_pipeline", no_load)  # either image default
    monkeypatch.setattr(attn_pipelines.loading, "load_pipeline", no_load)
    assert main(["headhunt", "--prompt", "a fox", "--top-k", "2", "--out", str(out), *SMALL]) == 2
    assert "holds a search with other settings (top_k differ)" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[]")
    assert main(["headhunt", "--out", str(tmp_path / "x.json"), *SMALL]) == 2
    assert "is not a HeadHunter file" in capsys.readouterr().err
    assert main(["headhunt", "--out", str(tmp_path / "x.txt"), *SMALL]) == 2
    assert "--out" in capsys.readouterr().err


def test_headhunt_default_is_generates_image_default(tmp_path, capsys):
    """Without --model, headhunt searches the model `attnplug generate --out x.png` uses without --model (the
    world's text-to-image model when installed), so generate accepts the heads file it writes."""
    from attn_pipelines.world.t2i import world_t2i_dir

    if world_t2i_dir() is None:
        pytest.skip("the world's text-to-image model is not installed (assets/world/t2i)")
    out = tmp_path / "hh.json"
    prompt = ["--prompt", "a red circle at the top left"]
    assert main(["headhunt", *prompt, "--layers", "0", "--out", str(out), *SMALL]) == 0
    std = capsys.readouterr()
    assert "EMBEDDED DEFAULT is attnplug's world text-to-image model" in std.err
    assert "headhunt complete after" in std.out
    state = json.loads(out.read_text())
    assert state["model"]["class"] == "SD3Transformer2DModel" and state["selected"]
    png = tmp_path / "x.png"
    assert main(["generate", *prompt, "--attn", f"softpag:heads_file={out},u=0.5", *SMALL[:-1], "--out", str(png)]) == 0
    std = capsys.readouterr()
    assert "EMBEDDED DEFAULT is attnplug's world text-to-image model" in std.err
    assert "attention calls through attnplug]" in std.out and png.is_file()


def test_headhunt_calls_the_model_as_generate_does(tmp_path, capsys, monkeypatch):
    """A world text-to-image model trained with N zero T5 positions is searched with max_sequence_length=N, the
    value `attnplug generate` passes (t2i_settings.json beside the model): heads found under another conditioning
    would be the heads of another model."""
    import shutil

    import diffusion_attn.headhunter
    from attn_pipelines.world.t2i import T2I_SETTINGS_FILE, world_t2i_dir

    if world_t2i_dir() is None:
        pytest.skip("the world's text-to-image model is not installed (assets/world/t2i)")
    world = tmp_path / "world"
    shutil.copytree(world_t2i_dir(), world / "t2i")
    (world / "t2i" / T2I_SETTINGS_FILE).write_text(json.dumps({"max_sequence_length": 3}))
    monkeypatch.setenv("ATTNPLUG_WORLD_DIR", str(world))
    seen = {}

    class Recorder:
        def __init__(self, pipe, *args, call_kwargs=None, **kwargs):
            seen.update(call_kwargs)
            raise ValueError("recorded")

    monkeypatch.setattr(diffusion_attn.headhunter, "HeadHunter", Recorder)
    out = tmp_path / "hh.json"
    assert main(["headhunt", "--prompt", "a red circle at the top left", "--out", str(out), *SMALL]) == 2
    assert "recorded" in capsys.readouterr().err
    assert seen["max_sequence_length"] == 3 and seen["num_inference_steps"] >= 1

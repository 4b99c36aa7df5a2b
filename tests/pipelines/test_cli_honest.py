"""The CLI says what it does (issue 20): every command in --help, whole descriptions in `list`, a cost
notice before a CPU run of a model's own defaults, and `--config` reading the attnplug config saved with
the weights."""

from __future__ import annotations

import json

import pytest

from attn_pipelines.cli import build_parser, main
from attn_pipelines.commands import COMMANDS


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = [c.__name__.rsplit(".", 1)[-1].replace("listing", "list").replace("_", "-") for c in COMMANDS]
    assert {"generate", "list", "bench", "show-mask", "headhunt", "eval"} <= set(names)
    description = build_parser().description
    for name in names:
        assert name in description, name
        assert f" {name} " in text  # the sub-command listing


def test_list_prints_whole_first_paragraphs(capsys):
    import inspect

    import vision_attn

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("agent ") and "Agent" in x)
    paragraph = " ".join(inspect.getdoc(vision_attn.Agent).split("\n\n")[0].split())
    assert line.rstrip().endswith(paragraph) and paragraph.endswith(".")


def test_cpu_run_of_the_models_own_defaults_gets_a_notice_first(tiny_wan_dir, tmp_path, capsys, monkeypatch):
    """No size flag on CPU: the notice names size, frames, steps and a lower-bound estimate before loading."""
    from attn_pipelines.commands import generate

    loaded: list = []
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(
        KeyboardInterrupt()))  # fmt: skip
    rc = main(["generate", "--model", str(tiny_wan_dir), "--device", "cpu", "--out", str(tmp_path / "v.gif")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 130 and loaded  # stopped right at loading: the notice came before
    assert "notice: no --height/--width/--frames/--steps given: WanPipeline's own defaults will run on CPU" in err
    assert "832x480 px, 81 frame(s), 50 steps" in err and "estimate >= " in err and "GFLOP/s" in err
    rc = main(["generate", "--model", str(tiny_wan_dir), "--device", "cpu", "--steps", "2",
               "--out", str(tmp_path / "v.gif")])  # fmt: skip
    assert "notice: no" not in capsys.readouterr().err  # any size flag: the user chose


def test_config_takes_the_file_saved_with_the_weights(tmp_path, capsys):
    """A pipeline saved while applied: `--config <dir>` runs its variants (and the directory is the model)."""
    import diffusion_attn as da
    from attn_pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan")
    with da.apply(pipe, da.Radial(dense_steps=0, dense_layers=0, decay_factor=1.0, block_size=16)):
        pipe.save_pretrained(tmp_path / "p")
    out = tmp_path / "v.gif"
    rc = main(["generate", "--config", str(tmp_path / "p"), "--steps", "2", "--frames", "5", "--height", "32",
               "--width", "32", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "attn: radial(" in captured.out and "attention calls through attnplug" in captured.out
    assert " 0 attention calls" not in captured.out
    (tmp_path / "bad.json").write_text(json.dumps({"format": "attnplug-config", "version": 1, "attn": ["nope"]}))
    rc = main(["generate", "--config", str(tmp_path / "bad.json"), "--out", str(out)])
    assert rc == 2 and "nope" in capsys.readouterr().err

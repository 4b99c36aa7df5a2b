"""benchmarks/world_t2v_sweeps.py: every run gets the same budget, varies one setting of the centre, and runs the
trainer with exactly those settings; an unknown run is refused by name before anything trains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from attn_pipelines.world.train_t2v import parser as t2v_parser

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "world_t2v_sweeps.py"
_spec = importlib.util.spec_from_file_location("world_t2v_sweeps", _PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


@pytest.mark.parametrize("run", list(sweep.RUNS))
def test_each_run_varies_one_setting_at_an_equal_budget(run, tmp_path):
    s = sweep.settings(run)
    assert s["steps"] * s["batch_size"] == sweep.BUDGET_SAMPLES
    changed = {k for k in sweep.CENTRE if s[k] != sweep.CENTRE[k]}
    key, value = sweep.RUNS[run]
    assert changed == ({key} if key else set()) and (key is None or s[key] == value)
    # the trainer parses the command to exactly these settings, from the shared init and VAE
    a = t2v_parser().parse_args(sweep.command(tmp_path, run, Path("V"), Path("I"))[3:])
    assert (a.lr, a.batch_size, a.caption_dropout, a.steps) == (s["lr"], s["batch_size"], s["caption_dropout"],
                                                                 s["steps"])  # fmt: skip
    assert a.vae == "V" and a.init_pipeline == Path("I") and a.out == str(tmp_path / run)
    assert a.eval_every * sweep.BUDGET_EVALS == a.steps and a.clips == sweep.CLIPS


def test_unknown_run_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match="unknown run 'lr_9'; known: centre"):
        sweep.main(["--work", str(tmp_path), "--vae", "V", "train", "lr_9"])
    assert not any(tmp_path.iterdir())

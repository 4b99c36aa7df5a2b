"""benchmarks/world_t2v_guidance.py: bad settings are refused by name before any model loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "world_t2v_guidance.py"
_spec = importlib.util.spec_from_file_location("world_t2v_guidance", _PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--scales", "0.5,5"], "--scales must be >= 1"),
        (["--scales", "a,b"], "comma-separated numbers"),
        (["--prompts", "73"], "--prompts must be in 1..72"),
        (["--two-object", "-1"], "--two-object >= 0"),
    ],
)
def test_bad_settings_are_refused_by_name(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_defaults_are_the_cli_scale_and_its_neighbours():
    a = sweep.parse_args([])
    assert a.scales == (1.0, 3.0, 5.0, 8.0) and a.prompts == 72 and a.steps == 20 and a.seeds == (0,)


def _scale(g, attr, direction, videos=72):
    return {
        "guidance": g,
        "one_object": {"attr_acc": attr / videos, "direction_acc": direction / videos, "videos": videos},
    }


def test_best_scale_counts_videos_and_a_tie_keeps_the_cli_default():
    # 64 + 61 and 65 + 60 videos: a tie, whatever the float sums say; the default (5) stays
    tied = [_scale(1.0, 54, 59), _scale(3.0, 64, 61), _scale(5.0, 65, 60), _scale(8.0, 55, 59)]
    assert sweep.best_scale(tied) == (5.0, [3.0, 5.0])
    # a strict win changes it
    assert sweep.best_scale([_scale(3.0, 64, 62), _scale(5.0, 65, 60)]) == (3.0, [3.0])
    # without the default among the tied, the first tied scale
    assert sweep.best_scale([_scale(2.0, 60, 60), _scale(4.0, 60, 60)]) == (2.0, [2.0, 4.0])

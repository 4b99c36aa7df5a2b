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

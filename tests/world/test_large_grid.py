"""The world at 2,112 tokens (`attn_pipelines.world.large_grid`): the grid it claims, sparse layouts that really
run sparse against the dense video of the same prompt, and its command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attn_pipelines.world import large_grid as lg
from attn_pipelines.world.evaluate import EvalSettings
from attn_pipelines.world.models import T2V_DIR, world_dir

ROOT = world_dir()
pytestmark = pytest.mark.skipif(
    not (ROOT / T2V_DIR / "model_index.json").is_file(), reason=f"no trained world checkpoints in {ROOT}"
)


def test_radial_at_2112_tokens_runs_sparse_against_the_dense_video(monkeypatch):
    from diffusion_attn.runtime import planner

    monkeypatch.setattr(planner, "DENSE_ENGINE_BLOCK_DENSITY", 0.78)  # the package's crossover (tests turn it off)
    res = lg.run_large(EvalSettings(steps=6), prompts=1, cases=("radial", "gna_time"), log=lambda m: None)
    assert res["tokens"] == 2112 and res["frames"] == 129 // 2 + 1  # 33 latent frames: 65 pixel frames
    radial = res["cases"]["radial"]["summary"]
    assert radial["sparse_density"] <= 0.5 < radial["density"] < 1  # steps 0-4 dense (count 1), step 5 sparse
    assert np.isfinite(radial["psnr"]) and 10 < radial["psnr"] < 100  # a different video, not the dense one
    assert res["cases"]["gna_time"]["summary"]["density"] == 1.0  # every block kept: the router runs it dense
    assert set(res["cases"]) == {"dense", "radial", "gna_time"}


def test_main_writes_under_its_stem_and_refuses_unknown_cases(tmp_path, capsys):
    argv = ["--prompts", "1", "--steps", "1", "--cases", "radial_b32", "--out", str(tmp_path), "--stem", "x"]
    assert lg.main(argv) == 0
    res = json.loads((tmp_path / "x.json").read_text())
    assert (tmp_path / "x.png").stat().st_size > 0 and "--stem x" in res["command"]
    assert set(res["cases"]) == {"dense", "radial_b32"}
    with pytest.raises(SystemExit):
        lg.main(["--cases", "nope", "--out", str(tmp_path)])
    assert "--cases: unknown ['nope']" in capsys.readouterr().err

"""docs/world.md shows what the committed results say: its eval tables are `markdown()` of world_eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from attn_pipelines.world.evaluate import markdown

ROOT = Path(__file__).resolve().parents[2]


def test_world_docs_tables_are_the_committed_eval_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "world_eval.json").read_text())
    md = markdown(results)
    assert md == (ROOT / "benchmarks" / "results" / "world_eval.md").read_text()
    assert md.strip() in (ROOT / "docs" / "world.md").read_text()
    assert results["settings"]["prompts"] == 72 and not results["smoke"]  # all one-object prompts, not a smoke run
    assert results["diffusion"]["dense_engine_block_density"] > 1

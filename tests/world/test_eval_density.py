"""The eval's density recorder: right densities, and no layout kept alive by it (LiteAttention builds one per call)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import torch

from attn_kernels import BlockLayout
from attn_pipelines.world.evaluate import _Density


class _Runtime:
    """Plans like a runtime whose variant builds a fresh layout every call (LiteAttention), or runs dense."""

    def __init__(self) -> None:
        self.dense_next = False

    def plan(self, layer: int, layout: object) -> SimpleNamespace:
        if self.dense_next:
            return SimpleNamespace(is_dense=True, layout=None)
        mask = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2)
        return SimpleNamespace(is_dense=False, layout=BlockLayout.from_device_block_mask(mask, 32, 32, 16, 16))


def _live_layouts() -> int:
    gc.collect()
    return sum(isinstance(o, BlockLayout) for o in gc.get_objects())


def test_density_recorder_keeps_no_layout_alive_and_reports_sparse_calls_apart():
    rt = _Runtime()
    rec = _Density(SimpleNamespace(runtimes=[rt]))
    before = _live_layouts()
    token_layout = SimpleNamespace(cross_len=0)
    for _ in range(20):
        rt.plan(0, token_layout)
    rt.dense_next = True
    rt.plan(0, token_layout)
    assert _live_layouts() == before  # every per-call layout freed once its call is over
    assert len(rec.values) == 21 and len(rec.sparse_values) == 20
    assert rec.sparse_values[0] == 0.75 and rec.values[-1] == 1.0  # 3 of 4 blocks; the dense call counts 1
    assert abs(rec.mean - (20 * 0.75 + 1.0) / 21) < 1e-12 and rec.sparse_mean == 0.75


def test_the_eval_runs_nearly_dense_layouts_sparse_and_restores_the_crossover(monkeypatch):
    """Radial keeps 92% of the world's 320-token pairs: above the planner's dense-engine crossover, so without
    `layouts_always_sparse` the eval would measure the dense processor and call it radial."""
    import diffusion_attn as da
    from attn_pipelines.world.evaluate import EVAL_DENSE_ENGINE_BLOCK_DENSITY, layouts_always_sparse
    from diffusion_attn.runtime import planner
    from diffusion_attn.variants.base import AttnPlan

    monkeypatch.setattr(planner, "DENSE_ENGINE_BLOCK_DENSITY", 0.78)
    bm = torch.ones(1, 1, 10, 10, dtype=torch.bool)
    bm.view(-1)[:8] = False  # 92 of 100 blocks
    plan = AttnPlan(layout=BlockLayout.from_block_mask(bm, 160, 160, 16, 16))
    assert planner.dense_engine_if_nearly_dense(plan, [da.Radial()]).is_dense  # the default routes it dense
    with layouts_always_sparse():
        assert planner.DENSE_ENGINE_BLOCK_DENSITY == EVAL_DENSE_ENGINE_BLOCK_DENSITY > 1
        assert planner.dense_engine_if_nearly_dense(plan, [da.Radial()]) is plan
    assert planner.DENSE_ENGINE_BLOCK_DENSITY == 0.78
    try:
        with layouts_always_sparse():
            raise RuntimeError("a failing case")
    except RuntimeError:
        pass
    assert planner.DENSE_ENGINE_BLOCK_DENSITY == 0.78

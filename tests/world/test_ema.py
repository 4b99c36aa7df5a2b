"""`ModuleEMA` (diffusers' EMAModel behind the world's training scripts): the same decays and averages as the
hand-written EMA it replaced, and a `state.pt` EMA entry written by the old code resumes on the same path."""

from __future__ import annotations

import copy

import pytest
import torch

from attn_pipelines.world.common import ModuleEMA


def _old_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, cap: float) -> float:
    """The hand-written update train_t2v / train_t2i used before."""
    decay = min(cap, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
    return decay


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def _train_step(model: torch.nn.Module, step: int) -> None:
    """A deterministic parameter change standing in for an optimizer step."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype).view_as(p) + step + i) * 0.1)


@pytest.mark.parametrize("cap", [0.995, 0.7])
def test_decays_and_averages_equal_the_hand_written_ema(cap):
    model = _net()
    old = copy.deepcopy(model)
    new = ModuleEMA(copy.deepcopy(model), cap)
    for step in range(40):
        _train_step(model, step)
        decay = _old_update(old, model, step, cap)
        new.update(model)
        assert new.ema.cur_decay_value == decay, step
    for a, b in zip(old.parameters(), new.current.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(model.parameters(), new.current.parameters()))


def test_old_state_entry_resumes_on_the_same_path(tmp_path):
    """An `ema_transformer`-style module state dict saved by the old code after 6 steps, loaded with the step
    count, continues exactly as the uninterrupted old EMA (the decay warm-up goes on from step 6)."""
    cap, split, total = 0.995, 6, 15
    model, ref = _net(), None
    ref = copy.deepcopy(model)
    old = copy.deepcopy(model)
    for step in range(split):
        _train_step(model, step)
        _old_update(old, model, step, cap)
    torch.save({"ema_transformer": old.state_dict(), "step": split}, tmp_path / "state.pt")
    snapshot = copy.deepcopy(model)

    st = torch.load(tmp_path / "state.pt")
    new = ModuleEMA(copy.deepcopy(ref), cap)
    new.load_state_dict(st["ema_transformer"], st["step"])
    for step in range(split, total):
        _train_step(model, step)
        _old_update(old, model, step, cap)
        new.update(model)
    for a, b in zip(old.parameters(), new.current.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert new.ema.cur_decay_value == min(cap, total / (total + 9))
    # what is saved again is the same module state-dict format, and it loads into the old kind of copy
    again = copy.deepcopy(snapshot)
    again.load_state_dict(new.state_dict())
    for a, b in zip(again.parameters(), old.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

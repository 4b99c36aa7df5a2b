"""The cosine-with-warmup schedule (`vision_attn.finetune.cosine_multiplier`, diffusers' schedule shifted by one
step with a floor): its rates equal the hand-written formula every run before it used, so resumed runs keep
their curve."""

from __future__ import annotations

import math

import pytest
import torch

from attn_pipelines.world.common import cosine_lr, cosine_schedule
from vision_attn.finetune import cosine_multiplier
from vision_attn.finetune import cosine_schedule as finetune_schedule


def _old(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The formula the world scripts and finetune wrote by hand before."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = min(step - warmup, max(1, total - warmup)) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


SETTINGS = [(100, 10, 0.05), (1000, 100, 0.05), (37, 0, 0.0), (5, 4, 0.05), (3, 5, 0.05), (1, 0, 0.1), (60, 59, 0.0)]


@pytest.mark.parametrize(("total", "warmup", "min_ratio"), SETTINGS)
def test_rates_equal_the_old_formula(total, warmup, min_ratio):
    """Every step, past the end included (held at the floor), warm-up longer than the run included."""
    for step in range(total + 5):
        assert cosine_multiplier(step, total, warmup, min_ratio) == pytest.approx(
            _old(step, total, warmup, min_ratio), abs=1e-12
        ), step


def test_world_default_floor_is_five_percent():
    assert cosine_lr(200, 200, 10) == pytest.approx(0.05)
    assert cosine_lr(0, 200, 10) == pytest.approx(1 / 11)
    assert cosine_lr(10, 200, 10) == pytest.approx(1.0)


def test_schedule_drives_the_optimizer_and_resumes_from_an_old_state():
    """The LambdaLR sets the optimizer's rates to base * multiplier, and a state_dict saved by the old
    hand-written LambdaLR (a lambda: no lr_lambdas state) loads and continues on the same curve."""
    total, warmup = 30, 4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    old_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _old(s, total, warmup, 0.05))
    for _ in range(7):
        opt.step()
        old_sched.step()
    state = old_sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_schedule(opt2, total, warmup)
    sched.load_state_dict(state)
    rates = []
    for _ in range(total - 7):
        opt2.step()
        sched.step()
        rates.append(opt2.param_groups[0]["lr"])
    assert rates == pytest.approx([2.0 * _old(s, total, warmup, 0.05) for s in range(8, total + 1)], abs=1e-12)
    fresh = finetune_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total, warmup, 0.0)
    assert fresh.get_last_lr() == [pytest.approx(1 / (warmup + 1))]

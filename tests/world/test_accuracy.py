"""The accuracy measures of the world's text-to-video model read real clips right and cannot pass blank ones."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from attn_pipelines.world.accuracy import TRAIN_EVAL_PROMPTS, colour_check, selection_score, two_object_prompts
from attn_pipelines.world.data import BACKGROUND, COLORS, DIRECTIONS, SHAPES, parse_caption, video_sample
from attn_pipelines.world.train_vae import clips, foreground_weight


def test_training_prompts_cover_every_colour_shape_and_direction():
    objs = [parse_caption(p)[0] for p in TRAIN_EVAL_PROMPTS]
    assert len(set(TRAIN_EVAL_PROMPTS)) == 24
    assert Counter(o["color"] for o in objs) == {c: 4 for c in COLORS}
    assert Counter(o["direction"] for o in objs) == {d: 6 for d in DIRECTIONS}
    assert Counter(o["shape"] for o in objs) == {s: 8 for s in SHAPES}


def test_two_object_prompts_name_two_different_objects():
    prompts = two_object_prompts(24)
    assert len(set(prompts)) == 24
    for p in prompts:
        a, b = parse_caption(p)
        assert a["color"] != b["color"] and a["shape"] != b["shape"]


def test_colour_check_reads_real_clips_and_not_blank_or_wrong_ones():
    for i in range(8):
        s = video_sample(3, i, two_object_prob=0.0)
        o = s.objects[0]
        got = colour_check(s.video, o["color"], o["direction"])
        assert got["present"] and got["moves"], (s.caption, got)
        other = next(
            c for c in COLORS if c != o["color"] and np.linalg.norm(np.subtract(COLORS[c], COLORS[o["color"]])) > 0.5
        )
        assert not colour_check(s.video, other, o["direction"])["present"]
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[o["direction"]]
        assert not colour_check(s.video, o["color"], opposite)["moves"]
    blank = np.broadcast_to(np.asarray(BACKGROUND, dtype=np.float32), (9, 32, 32, 3))
    assert colour_check(blank, "red", "left") == {"present_frac": 0.0, "present": False, "colour_direction": "none",
                                                   "moves": False}  # fmt: skip


def test_selection_score_needs_attributes_and_direction():
    assert selection_score({"attr_acc": 0.9, "direction_acc": 0.1}) < selection_score(
        {"attr_acc": 0.6, "direction_acc": 0.6}
    )


def test_foreground_weight_puts_the_extra_weight_on_the_shape():
    x = clips(0, 0, 2)
    w = foreground_weight(x, 4.0)
    assert w.shape == (2, 1, *x.shape[2:]) and torch.isclose(w.mean(), torch.tensor(1.0))
    fg = ((x + 1) / 2 - torch.tensor(BACKGROUND).view(1, 3, 1, 1, 1)).norm(dim=1, keepdim=True) > 0.05
    assert 0 < fg.float().mean() < 0.2  # the shape is a small part of the frame
    assert torch.allclose(w[fg] / w[~fg].mean(), torch.tensor(5.0))
    assert torch.equal(foreground_weight(x, 0.0), torch.ones_like(w))

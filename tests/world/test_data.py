"""The world's procedural data: deterministic by (seed, index), ground truth consistent with the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from attn_pipelines.world.data import (
    BACKGROUND,
    CLASSES,
    COLORS,
    DIRECTIONS,
    SHAPES,
    class_sample,
    parse_caption,
    scene_sample,
    single_prompts,
    video_sample,
)
from attn_pipelines.world.score import direction_of, iou_by_color, track


def test_video_samples_are_a_function_of_seed_and_index():
    a, b = video_sample(3, 17), video_sample(3, 17)
    assert np.array_equal(a.video, b.video) and a.caption == b.caption
    assert not np.array_equal(a.video, video_sample(4, 17).video)
    assert not np.array_equal(a.video, video_sample(3, 18).video)
    assert a.video.shape == (9, 32, 32, 3) and a.video.dtype == np.float32
    assert 0.0 <= a.video.min() and a.video.max() <= 1.0


@pytest.mark.parametrize("index", range(12))
def test_caption_direction_and_track_agree(index):
    s = video_sample(0, index, two_object_prob=0.0)
    (obj,) = parse_caption(s.caption)
    truth = s.objects[0]
    assert (obj["color"], obj["shape"], obj["direction"]) == (truth["color"], truth["shape"], truth["direction"])
    centers = track(s.video)
    assert np.abs(centers - truth["centers"]).max() < 0.6  # the tracked centroid is the drawn centre
    assert direction_of(centers) == truth["direction"]
    r = truth["radius"]  # the whole path stays inside the frame
    assert (truth["centers"] >= r).all() and (truth["centers"] <= 32 - r).all()


def test_two_object_captions_name_both_objects():
    two = next(s for i in range(50) if len((s := video_sample(1, i, two_object_prob=0.5)).objects) == 2)
    objs = parse_caption(two.caption)
    assert " and " in two.caption and len(objs) == 2
    assert objs[0]["color"] != objs[1]["color"] and objs[0]["shape"] != objs[1]["shape"]


def test_prompts_and_caption_parser():
    prompts = single_prompts()
    assert len(prompts) == len(COLORS) * len(SHAPES) * len(DIRECTIONS) == len(set(prompts))
    assert parse_caption("A Red circle moving right") == [{"color": "red", "shape": "circle", "direction": "right"}]
    with pytest.raises(ValueError, match="not a world caption"):
        parse_caption("a red fox running through the snow")


def test_class_samples_are_labelled_by_their_pixels():
    for i in range(40):
        img, label = class_sample(0, i)
        color, _ = CLASSES[label].split("_")
        fg = np.linalg.norm(img - np.asarray(BACKGROUND), axis=-1) > 0.35
        mean = img[fg].mean(0)
        nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - np.asarray(COLORS[c])))
        assert nearest == color
    assert np.array_equal(class_sample(5, 9)[0], class_sample(5, 9)[0])


def test_scene_boxes_hold_their_shapes():
    for i in range(10):
        s = scene_sample(0, i)
        assert len(parse_caption(s.caption)) == len(s.objects)
        for o in s.objects:
            assert iou_by_color(s.image, o["color"], o["box"]) > 0.4  # a triangle fills half its box
            assert iou_by_color(s.image, o["color"], o["mask"]) > 0.7  # edge pixels are blended

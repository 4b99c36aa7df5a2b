"""The length-extension LoRA benchmark (`benchmarks/world_lora_length.py`, issue 22) on the shipped world model:
its whole pipeline runs at tiny sizes, the radial-trained LoRA differs from the dense-trained one, a published LoRA
loads with `load_lora_weights` and changes the output, a rerun skips finished stages; the length metric it adds
(lost while the path is still in the frame) tells a shape that left the frame from one that vanished."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from attn_pipelines.world import lora_length as ll
from attn_pipelines.world.data import COLORS, DIRECTIONS, parse_caption, video_sample
from attn_pipelines.world.evaluate import _length_metrics
from attn_pipelines.world.models import T2V_DIR, world_dir

ROOT = world_dir()
needs_world = pytest.mark.skipif(
    not (ROOT / T2V_DIR / "model_index.json").is_file(), reason=f"no trained world checkpoints in {ROOT}"
)


def test_lost_inside_counts_only_frames_where_the_path_is_still_in_the_frame():
    clip = video_sample(5, 0, frames=33, two_object_prob=0.0, speed=(2.0, 2.0))  # leaves the frame mid-clip
    m = _length_metrics(clip.video, clip.caption, 9)
    assert m["lost_frac"] > 0.2 and m["lost_inside_frac"] == 0.0  # the true clip: lost only after leaving
    centers = clip.objects[0]["centers"]
    inside = [k for k in range(9, 33) if ((centers[k] >= 2) & (centers[k] <= 30)).all()]
    assert len(inside) >= 3 and inside[:2] == [9, 10]
    blank = clip.video.copy()
    blank[9:11] = blank[-1]  # the shape vanishes for 2 frames while its path is inside (then comes back)
    assert _length_metrics(blank, clip.caption, 9)["lost_inside_frac"] == pytest.approx(2 / 24)


def test_eval_prompts_cover_every_direction_and_colour():
    prompts = ll.eval_prompts(12)
    objs = [parse_caption(p)[0] for p in prompts]
    assert len(set(prompts)) == 12
    assert Counter(o["direction"] for o in objs) == {d: 3 for d in DIRECTIONS}
    assert Counter(o["color"] for o in objs) == {c: 2 for c in COLORS}


@pytest.mark.parametrize(
    "kw,needle",
    [({"frames": (19,)}, "frames"), ({"cases": ("nope",)}, "cases"), ({"lr": 0.0}, "lr"), ({"steps": 0}, "steps")],
)
def test_bad_settings_are_refused_by_name(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ll.LengthSettings(**kw).check()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_length")
    s = ll.LengthSettings(work=str(root / "work"), results=str(root / "results"), assets=str(root / "assets"),
                          frames=(17,), clips=2, steps=2, lr=1e-3, warmup=0, prompts=1, inference_steps=2,
                          reference_clips=2, cases=("plain", "radial+radial_lora", "dense+dense_lora"))  # fmt: skip
    return s, ll.run(s)


@needs_world
def test_pipeline_runs_end_to_end_and_the_two_loras_differ(tiny_run):
    from safetensors.torch import load_file

    s, res = tiny_run
    saved = json.loads((ll.Path(s.results) / "world_lora_length.json").read_text())
    assert saved["t2v_checkpoint"]["path"] and "versions" in saved and "device" in saved
    assert set(saved["cases"]) == {"reference", "plain", "radial+radial_lora", "dense+dense_lora"}
    for case in saved["cases"].values():
        summary = case["lengths"]["17"]["summary"]
        assert summary["videos"] >= 1 and summary["centroid_error"] is not None
    assert (ll.Path(s.results) / "world_lora_length.png").stat().st_size > 0
    radial, dense = (load_file(ll.Path(s.assets) / n / "pytorch_lora_weights.safetensors") for n in ("radial", "dense"))
    assert radial.keys() == dense.keys() and any("lora_B" in k for k in radial)
    # same seed, steps and clips: only the attention in training differs, and so do the weights
    diff = max(float((radial[k] - dense[k]).abs().max()) for k in radial if "lora_B" in k)
    assert diff > 1e-6 and all(float(radial[k].abs().max()) > 0 for k in radial if "lora_B" in k)
    card = (ll.Path(s.assets) / "radial" / "README.md").read_text()
    assert "Radial(" in card and "Training time" in card and "world_lora_length.py" in card
    assert "none (dense attention)" in (ll.Path(s.assets) / "dense" / "README.md").read_text()


@needs_world
def test_published_lora_loads_and_changes_the_output(tiny_run):
    s, _ = tiny_run

    def latents(lora: bool) -> torch.Tensor:
        pipe = ll._load_pipe(s)
        if lora:
            pipe.load_lora_weights(str(ll.Path(s.assets) / "radial"))
        return pipe("a red circle moving right", num_frames=17, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames  # fmt: skip

    base, tuned = latents(False), latents(True)
    assert torch.isfinite(tuned).all() and float((tuned - base).abs().max()) > 1e-4


@needs_world
def test_rerun_skips_finished_stages(tiny_run, capsys):
    s, first = tiny_run
    work = ll.Path(s.work)
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [*(work / "eval").glob("*.json"), work / "lora_radial" / "attnplug_record.json"]
    }
    again = ll.run(s)
    out = capsys.readouterr().out
    assert "done already" in out and "evaluated already" in out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert again["cases"]["plain"] == first["cases"]["plain"]


@pytest.mark.slow
@needs_world
def test_radial_lora_lowers_the_radial_loss_on_held_out_long_clips(tmp_path):
    """40 steps at 17 frames, radial attention: the flow-matching loss on 8 held-out 17-frame clips (same noise
    draws) under radial attention falls below the base model's."""
    import diffusion_attn as da
    from diffusion_attn.lora import encode_clip, lora_loss, read_video

    s = ll.LengthSettings(work=str(tmp_path / "w"), results=str(tmp_path / "r"), assets="", frames=(17,), clips=16,
                          steps=40, lr=1e-3, warmup=5, prompts=1, inference_steps=2, reference_clips=1,
                          cases=("radial+radial_lora",))  # fmt: skip
    data = tmp_path / "w" / "data"
    ll.render_clips(data, s)
    ll.train("radial", s, data, ll.t2v_checkpoint(ROOT / T2V_DIR))
    held = ll.LengthSettings(clips=8, frames=(17,), data_seed=99)
    ll.render_clips(tmp_path / "held", held)
    pipe = ll._load_pipe(s)
    batches = []
    for f in sorted((tmp_path / "held").glob("*.mp4")):
        enc = encode_clip(pipe, "wan", read_video(f, None, None, None), f.with_suffix(".txt").read_text(), 512)
        batches.append({k: v[None] for k, v in enc.items()})

    @torch.no_grad()
    def loss(p) -> float:
        with da.apply(p.transformer, *ll._variants(ll.RADIAL, "radial"), step_source="callback") as h:
            h.set_step(10**6)
            return float(np.mean([float(lora_loss(p, p.transformer, "wan", b, torch.Generator().manual_seed(i), 3.0))
                                  for i, b in enumerate(batches)]))  # fmt: skip

    base = loss(pipe)
    tuned_pipe = ll._load_pipe(s)
    tuned_pipe.load_lora_weights(str(tmp_path / "w" / "lora_radial"))
    assert loss(tuned_pipe) < base

"""HeadHunter (issue 11): greedy head search on a tiny real transformer, resumable JSON, objectives."""

from __future__ import annotations

import json

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.headhunter import (
    HeadHunter,
    clip_score,
    model_signature,
    reference_similarity,
    total_variation,
)

PAIRS = [("a fox", 0), ("a cat", 1)]


@pytest.fixture(scope="module")
def model():
    """A tiny Wan transformer with 3 layers x 4 heads: 12 candidate heads."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=64,
    ).eval()  # fmt: skip


def generate(pipe, prompt, seed):
    """One transformer forward on seeded inputs: an 'image' [C, H, W] in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 7, 24, generator=g)
    with torch.no_grad():
        out = pipe(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500.0]), return_dict=False)[0]
    return out[0, :3, 0].sigmoid()


def hunter(model, objective, **kw):
    kw = {"rounds": 2, "top_k": 1, "u": 1.0, "scale": 3.0, **kw}
    return HeadHunter(model, objective, [p for p, _ in PAIRS], [s for _, s in PAIRS], generate=generate, **kw)


def planted_objective(model, planted):
    with da.apply(model, da.SoftPAG(heads=tuple(planted), u=1.0, scale=3.0)):
        refs = [generate(model, p, s) for p, s in PAIRS]
    return reference_similarity(refs, "mse")


def test_finds_the_planted_heads(model):
    """Synthetic objective: closeness to the outputs of SoftPAG on two planted heads. Two rounds of k = 1 find
    them (the second round scores each head together with the first round's pick), so does one round of k = 2."""
    planted = [(0, 1), (2, 3)]
    objective = planted_objective(model, planted)
    result = hunter(model, objective).run(progress=False)
    assert sorted(result.selected) == planted and result.complete and result.evaluations == 12 + 11
    assert max(result.rounds[1]["scores"].values()) == 0.0  # the planted pair reproduces the reference exactly
    assert sorted(hunter(model, objective, rounds=1, top_k=2).run(progress=False).selected) == planted


def test_greedy_rounds_score_each_head_with_the_selection_so_far(model):
    """A synthetic objective of the active head set: round 2 must score S + {h} (the pair bonus), not h alone."""
    weights = {(layer, head): 0.1 * (4 * layer + head) for layer in range(3) for head in range(4)}
    bonus = {(0, 0), (1, 1)}

    def gen(pipe, prompt, seed):
        heads = pipe._attnplug_handle.variants[0]._pairs
        return torch.tensor(sum(weights[h] for h in heads) + (5.0 if bonus <= heads else 0.0))

    def objective(outputs, pairs):
        assert len(outputs) == len(pairs) and all(isinstance(p, str) and isinstance(s, int) for p, s in pairs)
        return float(sum(outputs)) / len(outputs)

    result = HeadHunter(model, objective, ["a fox", "a cat"], [0, 1], rounds=3, top_k=1, generate=gen).run(
        progress=False
    )
    assert result.selected[0] == (2, 3)  # the best single head
    assert result.selected[1] == (2, 2)  # no bonus yet: the next best weight
    result = HeadHunter(model, objective, ["a fox", "a cat"], [0, 1], rounds=2, top_k=1, generate=gen,
                        layers=[0, 1]).run(progress=False)  # fmt: skip
    assert result.selected == [(1, 3), (1, 2)]
    top = HeadHunter(model, objective, ["x"], [0], rounds=1, top_k=3, generate=gen).run(progress=False)
    assert top.selected == [(2, 3), (2, 2), (2, 1)]
    weights[(0, 0)] = 10.0  # round 1 picks (0, 0); round 2 then prefers (1, 1) for the bonus over the best weight
    r = HeadHunter(model, objective, ["x"], [0], rounds=2, top_k=1, generate=gen).run(progress=False)
    assert r.selected == [(0, 0), (1, 1)]


def test_resumes_from_its_json(model, tmp_path, capsys):
    """A budget stops the search mid-round; the JSON holds every evaluation so far; running again continues with
    the remaining evaluations only and ends exactly where an uninterrupted search ends."""
    planted = [(1, 2), (2, 0)]
    objective = planted_objective(model, planted)
    calls = []

    def counting(outputs, pairs):
        calls.append(1)
        return objective(outputs, pairs)

    counting.__name__ = "planted"
    path = tmp_path / "hh.json"
    first = hunter(model, counting).run(path, max_evaluations=5)
    assert not first.complete and first.stopped == "max_evaluations" and first.evaluations == 5 and not first.selected
    state = json.loads(path.read_text())
    assert state["evaluations"] == 5 and len(state["rounds"][0]["scores"]) == 5 and not state["complete"]
    assert "HeadHunter" in capsys.readouterr().err  # the progress bar
    with pytest.raises(ValueError, match="the search selected no head yet"):
        da.SoftPAG(heads_file=str(path))
    calls.clear()
    second = hunter(model, counting).run(path, progress=False)
    assert len(calls) == 12 + 11 - 5 and second.complete and sorted(second.selected) == planted
    again = hunter(model, counting).run(path, progress=False)  # complete: nothing left
    assert again.selected == second.selected and len(calls) == 12 + 11 - 5
    whole = hunter(model, counting).run(tmp_path / "whole.json", progress=False)
    assert whole.selected == second.selected and whole.rounds == second.rounds
    # the result drives SoftPAG, checked against the model it was searched on
    v = da.SoftPAG(heads_file=str(path), u=0.5)
    assert v._pairs == set(planted)
    with da.apply(model, v) as handle:
        generate(model, "a fox", 0)
        assert handle.attention_calls == 2
    from .tiny import tiny_wan

    other, _ = tiny_wan()
    with pytest.raises(ValueError, match=r"heads_file .* was searched on a 'wan' model with 3 attention layers"):
        da.apply(other, v)


def test_json_is_saved_after_every_evaluation(model, tmp_path):
    """A search killed in its fourth evaluation leaves the first three on disk, and resumes from them."""
    path = tmp_path / "hh.json"
    objective = total_variation()
    calls = []

    def dying(outputs, pairs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return objective(outputs, pairs)

    dying.__name__ = "tv"
    with pytest.raises(KeyboardInterrupt):
        hunter(model, dying).run(path, progress=False)
    state = json.loads(path.read_text())
    assert state["evaluations"] == 3 and len(state["rounds"][0]["scores"]) == 3
    done = hunter(model, objective, objective_name="tv").run(path, progress=False)
    assert done.complete and done.evaluations == 12 + 11


def test_resume_refuses_other_settings_or_model(model, tmp_path):
    path = tmp_path / "hh.json"
    objective = total_variation()
    hunter(model, objective).run(path, max_evaluations=1, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(top_k differ\)"):
        hunter(model, objective, top_k=2).run(path, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(u, objective differ\)"):
        hunter(model, reference_similarity([torch.zeros(3, 4, 4)] * 2), u=0.5).run(path, progress=False)
    from .tiny import tiny_wan

    other, _ = tiny_wan()
    sig = model_signature(other)
    assert sig["heads"] == [2, 2] and sig["layers"] == ["blocks.0.attn1", "blocks.1.attn1"]
    with pytest.raises(ValueError, match="was searched on another model"):
        HeadHunter(other, objective, ["a fox", "a cat"], [0, 1], rounds=2, generate=generate, u=1.0).run(path)
    r = hunter(model, objective, top_k=2).run(path, restart=True, max_evaluations=2, progress=False)
    assert r.evaluations == 2 and json.loads(path.read_text())["settings"]["top_k"] == 2
    with pytest.raises(ValueError, match="not a HeadHunter file"):
        (tmp_path / "x.json").write_text("{}")
        hunter(model, objective).run(tmp_path / "x.json")


def test_bad_settings_are_refused(model):
    obj = total_variation()
    for kw, needle in (
        ({"rounds": 0}, r"HeadHunter.rounds must be an int >= 1, got 0"),
        ({"top_k": 1.5}, r"HeadHunter.top_k must be an int >= 1"),
        ({"u": 1.5}, r"SoftPAG.u must be in \[0.0, 1.0\], got 1.5"),
        ({"u": 0.0}, r"u and scale must be > 0"),
        ({"layers": [3]}, r"HeadHunter.layers must be layer indices in \[0, 2\], got \[3\]"),
    ):
        with pytest.raises(ValueError, match=needle):
            hunter(model, obj, **kw)
    with pytest.raises(ValueError, match="one int per prompt"):
        HeadHunter(model, obj, ["a", "b"], [0])
    with pytest.raises(ValueError, match=r"max_evaluations=...\) must be > 0"):
        hunter(model, obj).run(max_evaluations=0)


def test_time_budget(model):
    r = hunter(model, total_variation()).run(max_seconds=1e-9, progress=False)
    assert r.stopped == "max_seconds" and r.evaluations == 0


# -- objectives ----------------------------------------------------------------------------------------------------
def test_model_free_objectives_are_exact():
    img = torch.zeros(3, 4, 4)
    img[:, :, 2:] = 1.0  # one vertical edge: 4 rows x 1 jump x 3 channels
    assert total_variation()([img, torch.zeros(3, 4, 4)], PAIRS) == pytest.approx((12 / 48 + 0) / 2)
    assert total_variation()([img.permute(1, 2, 0)], PAIRS[:1]) == pytest.approx(12 / 48)  # [H, W, C] too
    assert total_variation()([torch.stack([img, img, img])], PAIRS[:1]) == pytest.approx(12 / 48)  # a video: per pixel
    ref = torch.full((3, 8, 8), 0.5)
    out = ref + 0.1
    mse = reference_similarity([ref], "mse")([out], PAIRS[:1])
    assert mse == pytest.approx(-0.01)
    assert reference_similarity([ref], "psnr")([out], PAIRS[:1]) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1/.01)
    assert reference_similarity([ref], "ssim")([ref], PAIRS[:1]) == pytest.approx(1.0)
    video = torch.rand(2, 3, 8, 8)
    assert reference_similarity([video], "mse")([video], PAIRS[:1]) == 0.0
    with pytest.raises(ValueError, match="metric must be 'psnr', 'ssim' or 'mse'"):
        reference_similarity([ref], "lpips")


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab |= {f"{c}</w>": 26 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    proc = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}), tok)
    torch.manual_seed(0)
    text = dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    with torch.no_grad():  # seed 0 gives negative image-text cosines, which CLIP score clamps to 0: flip them
        model.visual_projection.weight.neg_()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model, proc


def test_clip_score_from_a_local_model_only(tmp_path):
    """torchmetrics' CLIP score from a local CLIP (a tiny random one here), frames averaged; an id that is not
    on this machine is refused, nothing is downloaded."""
    model, proc = _tiny_clip(tmp_path)
    objective = clip_score(str(tmp_path))
    imgs = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    got = objective([imgs[0], torch.stack(imgs[1:])], [("a fox", 0), ("a cat", 1)])

    def manual(img, prompt):
        x = (img * 255).round().to(torch.uint8)
        with torch.no_grad():
            i = model.get_image_features(**proc(images=[x], return_tensors="pt")).pooler_output
            t = model.get_text_features(**proc(text=[prompt], return_tensors="pt", padding=True)).pooler_output
        return max(100 * torch.nn.functional.cosine_similarity(i, t).item(), 0.0)

    per_frame = [manual(imgs[1], "a cat"), manual(imgs[2], "a cat")]
    assert min(per_frame) > 0 and abs(per_frame[0] - per_frame[1]) > 0.1  # every frame counts, none clamped
    want = (manual(imgs[0], "a fox") + sum(per_frame) / 2) / 2
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="CLIP model 'nobody/no-such-clip' is not available locally"):
        clip_score("nobody/no-such-clip")

"""The world's training code computes what the shipped pipeline computes (prompt embeddings, cross-attention)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from attn_pipelines.world import models
from attn_pipelines.world.data import VOCABULARY
from attn_pipelines.world.train_t2v import check_pad_weighting, encode_captions


def _fresh_pipe():
    tok = models.world_tokenizer()
    te = models.build_text_encoder(len(tok))
    return models.build_pipeline(models.build_vae(), models.build_transformer(), te, tok)


def test_world_words_are_single_tokens():
    tok = models.world_tokenizer()
    for w in VOCABULARY:
        ids = tok(w).input_ids
        assert len(ids) == 2 and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids, w


def test_training_embeddings_equal_the_pipelines():
    pipe = _fresh_pipe()
    caps = ["a red circle moving right", "", "a blue square moving down and a green triangle moving left"]
    with torch.no_grad():
        mine = encode_captions(pipe.tokenizer, pipe.text_encoder, caps)
        ref, _ = pipe.encode_prompt(caps, do_classifier_free_guidance=False, max_sequence_length=512)
    assert mine.shape == ref.shape == (3, 512, models.TEXT_ENCODER_CONFIG["d_model"])
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_pad_weighted_cross_attention_equals_diffusers_on_512_positions():
    pipe = _fresh_pipe()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero biases, so the padded positions' key and value are not trivial
        for p in pipe.transformer.condition_embedder.text_embedder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    lat = torch.randn(3, 4, 5, 16, 16, generator=g)
    diff = check_pad_weighting(pipe.transformer, pipe.tokenizer, pipe.text_encoder, lat,
                               ["a red circle moving right", "a white square moving up", ""], 16)  # fmt: skip
    assert diff < 1e-5


def _t2v_argv(root):
    return ["--vae", str(root / "vae" / "vae"), "--out", str(root / "t2v"), "--steps", "2", "--clips", "4",
            "--batch-size", "2", "--eval-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A VAE and a text-to-video run of 2 steps each (train_vae, then train_t2v on its latents)."""
    from attn_pipelines.world import train_t2v, train_vae

    root = tmp_path_factory.mktemp("smoke_run")
    assert train_vae.main(["--out", str(root / "vae"), "--steps", "2", "--batch-size", "1", "--smoke"]) == 0
    assert train_t2v.main(_t2v_argv(root)) == 0
    return root


def test_train_scripts_smoke_to_a_loadable_pipeline(smoke_run):
    from diffusers import DiffusionPipeline

    from attn_pipelines.world import train_t2v

    tmp_path, argv = smoke_run, _t2v_argv(smoke_run)
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "t2v" / "pipeline"))
    assert type(pipe).__name__ == "WanPipeline" and pipe.vae_scale_factor_spatial == 2
    assert json.loads((tmp_path / "t2v" / "metrics.json").read_text())["steps"] == 2
    assert train_t2v.main(argv) == 0  # resumes from state.pt: nothing left to do
    m = json.loads((tmp_path / "t2v" / "metrics.json").read_text())
    assert m["steps"] == 2 and m["loss_avg_last"] is not None  # the final loss survives the empty resume


@pytest.mark.slow
def test_train_t2v_logs_accuracy_and_keeps_the_best(tmp_path):
    """The accuracy curve is logged during training, survives a resume, and best/ is a loadable pipeline."""
    from diffusers import DiffusionPipeline

    from attn_pipelines.world import train_t2v, train_vae

    assert train_vae.main(["--out", str(tmp_path / "vae"), "--steps", "1", "--batch-size", "1", "--smoke"]) == 0
    argv = ["--vae", str(tmp_path / "vae" / "vae"), "--out", str(tmp_path / "t2v"), "--steps", "2", "--clips", "4",
            "--batch-size", "2", "--eval-every", "1", "--eval-prompts", "1", "--eval-steps", "2"]  # fmt: skip
    assert train_t2v.main(argv) == 0
    m = json.loads((tmp_path / "t2v" / "metrics.json").read_text())
    assert [e["step"] for e in m["evals"]] == [1, 2]
    assert {"color_acc", "shape_acc", "attr_acc", "direction_acc", "score"} <= set(m["evals"][0])
    assert m["best"]["score"] == max(e["score"] for e in m["evals"]) and m["best"]["step"] in (1, 2)
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "t2v" / "best"))).__name__ == "WanPipeline"
    assert train_t2v.main([*argv[:5], "3", *argv[6:]]) == 0  # resume to step 3: the curve goes on
    assert [e["step"] for e in json.loads((tmp_path / "t2v" / "metrics.json").read_text())["evals"]] == [1, 2, 3]


def test_train_t2v_refuses_bad_eval_prompts(tmp_path):
    from attn_pipelines.world import train_t2v

    with pytest.raises(SystemExit, match="--eval-prompts must be in 0..24"):
        train_t2v.main(["--vae", str(tmp_path), "--out", str(tmp_path / "t"), "--eval-prompts", "25"])
    assert not (tmp_path / "t").exists()  # refused before anything is written


def test_a_decoder_vae_must_encode_like_the_training_vae():
    """`--decoder-vae` swaps in a retrained decoder only: a changed encoder (or latent statistics) is refused."""
    from attn_pipelines.world.train_t2v import same_encoder

    torch.manual_seed(0)
    a = models.build_vae(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])
    b = copy.deepcopy(a)
    with torch.no_grad():
        next(b.decoder.parameters()).add_(1.0)
    assert same_encoder(a, b)
    with torch.no_grad():
        next(b.encoder.parameters()).add_(1e-3)
    assert not same_encoder(a, b)
    c = copy.deepcopy(a)
    c.register_to_config(latents_std=[1.0, 2.0, 3.0, 4.5])
    assert not same_encoder(a, c)


def test_run_records_resume_a_state_file_written_before_them(tmp_path):
    """`common.RunRecords` (train_t2i and train_t2v's state.pt, curve and records) reads a state.pt as the
    scripts wrote it before it existed (their own torch.save of the same keys), and writes the same keys."""
    from attn_pipelines.world.common import RunRecords, Timer

    torch.manual_seed(3)
    rng = torch.get_rng_state()
    best = {"step": 5, "score": 0.25}
    old = {"transformer": {"w": torch.ones(2)}, "opt": {}, "step": 7, "history": [{"step": 0, "loss_avg": 0.5}],
           "rng": rng, "seconds": 12.5, "evals": [dict(best)], "best": dict(best)}  # fmt: skip
    torch.save(old, tmp_path / "state.pt")
    torch.manual_seed(99)
    rec = RunRecords(tmp_path, Timer(), ["a red circle"])
    st = rec.load()
    assert torch.equal(st["transformer"]["w"], torch.ones(2)) and rec.step == 7 and rec.before == 12.5
    assert rec.history == old["history"] and rec.best == {"step": 5, "score": 0.25}
    assert torch.equal(torch.get_rng_state(), rng)  # the RNG is restored
    assert not rec.add_eval({"step": 7, "score": 0.2}) and rec.add_eval({"step": 8, "score": 0.3})
    assert rec.evaluated(8) and rec.best["step"] == 8
    rec.save(8, {"transformer": {"w": torch.zeros(2)}})
    again = torch.load(tmp_path / "state.pt", weights_only=False)
    assert set(old) - {"opt"} <= set(again) and again["step"] == 8 and again["seconds"] >= 12.5
    assert not (tmp_path / "state.tmp").exists()
    rec.write(8, {"args": {}})
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["steps"] == 8 and [e["step"] for e in m["evals"]] == [5, 7, 8] and m["eval_prompts"] == ["a red circle"]


def test_channel_noise_reads_every_channel_at_one_signal_to_noise():
    """`--latent noisy`: the noise follows each channel's spread, so scaling a channel up buys it no clean signal,
    and the gradient reaches the spread (it is not detached)."""
    from attn_pipelines.world.train_vae import channel_noise

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 4, 5, 16, 16, generator=g) * torch.tensor([3.0, 1.0, 0.1, 0.01]).view(1, 4, 1, 1, 1)
    noise = channel_noise(mu, 0.25, generator=torch.Generator().manual_seed(1)) - mu
    ratio = noise.std(dim=(0, 2, 3, 4)) / mu.std(dim=(0, 2, 3, 4))
    torch.testing.assert_close(ratio, torch.full((4,), 0.25), atol=0.01, rtol=0)
    mu.requires_grad_(True)
    channel_noise(mu, 0.25).pow(2).sum().backward()
    assert not torch.allclose(mu.grad, 2 * mu.detach())  # d/dmu includes the spread's term


def test_noisy_posterior_samples_what_the_decoder_was_trained_on():
    from attn_pipelines.world.train_vae import noisy_posterior

    vae = models.build_vae().eval()
    std = [2.0, 1.0, 0.5, 0.25]
    noisy_posterior(vae, std, 0.25)
    g = torch.Generator().manual_seed(0)
    for x in (torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1, -torch.ones(2, 3, 9, 32, 32)):
        with torch.no_grad():
            post = vae.encode(x).latent_dist
        want = (0.25 * torch.tensor(std)).view(1, 4, 1, 1, 1).expand_as(post.std)
        torch.testing.assert_close(post.std, want, rtol=1e-5, atol=0)


def test_train_vae_noisy_smoke_and_bad_noise(tmp_path):
    import json as _json

    from attn_pipelines.world import train_vae

    with pytest.raises(SystemExit, match=r"--latent-noise must be in \(0, 1\], got 0.0"):
        train_vae.main(["--out", str(tmp_path / "bad"), "--latent", "noisy", "--latent-noise", "0", "--smoke"])
    assert not (tmp_path / "bad").exists()
    argv = ["--out", str(tmp_path / "vae"), "--steps", "2", "--batch-size", "1", "--smoke", "--latent", "noisy"]
    assert train_vae.main(argv) == 0
    m = _json.loads((tmp_path / "vae" / "metrics.json").read_text())
    # the saved posterior's std is the trained noise: 0.25 x the latent std, so every channel's SNR is near 4
    assert all(2.5 < v < 6 for v in m["report"]["snr"]), m["report"]["snr"]


def test_publish_a_candidate_elsewhere_leaves_the_shipped_model_and_samples(smoke_run, tmp_path, monkeypatch):
    """`publish --dest`: the pipeline, its training records and card go to the candidate folder; the shipped
    folder and the samples (which show the shipped model) are not touched."""
    from diffusers import DiffusionPipeline

    from attn_pipelines.world import publish

    world = tmp_path / "world"  # the shipped folders, as publish sees them
    monkeypatch.setenv("ATTNPLUG_WORLD_DIR", str(world))
    dest = tmp_path / "candidate"
    argv = ["--vae-run", str(smoke_run / "vae"), "--t2v-run", str(smoke_run / "t2v"), "--which", "final"]
    assert publish.main([*argv, "--dest", str(dest)]) == 0
    assert type(DiffusionPipeline.from_pretrained(str(dest))).__name__ == "WanPipeline"
    card = (dest / "MODEL_CARD.md").read_text()
    assert "VAE stage 1" in card and "python -m attn_pipelines.world.train_t2v" in card
    assert not world.exists()  # neither world/t2v nor world/samples
    with pytest.raises(SystemExit, match="--dest publishes a candidate without samples"):
        publish.main([*argv, "--dest", str(dest), "--samples-only"])


def test_cached_latents_encode_once_then_read(tmp_path):
    """train_t2v and the t2v sweep share one cache: encoded (atomically) on the first call, read on the next
    without loading the VAE (a folder that does not exist is never opened)."""
    from attn_pipelines.world.train_t2v import cached_latents, latent_cache

    cache = latent_cache(tmp_path / "run", 0, 2, 0.0)
    first = cached_latents(cache, models.build_vae().eval(), 0, 2, 0.0)
    assert cache.is_file() and not cache.with_suffix(".tmp").exists()
    again = cached_latents(cache, tmp_path / "no_such_vae", 0, 2, 0.0)
    torch.testing.assert_close(again["latents"], first["latents"])
    assert again["captions"] == first["captions"] and first["latents"].shape == (2, 4, 5, 16, 16)


def test_run_sweep_runs_what_is_unfinished_and_reads_what_is_done(tmp_path):
    import sys

    from attn_pipelines.world.common import run_sweep

    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text(json.dumps({"steps": 10}))
    prepared = []

    def prepare(run):
        prepared.append(run)
        (tmp_path / run).mkdir(exist_ok=True)

    def command(run):
        return [sys.executable, "-c", f"print('trained {run}')"]

    run_sweep(tmp_path, [], ["done", "todo"], lambda run: 10, prepare, command, tmp_path)
    assert prepared == ["todo"] and (tmp_path / "todo" / "log.txt").read_text() == "trained todo\n"
    with pytest.raises(SystemExit, match="unknown run 'nope'; known: done, todo"):
        run_sweep(tmp_path, ["todo", "nope"], ["done", "todo"], lambda run: 10, prepare, command, tmp_path)
    assert prepared == ["todo"]  # refused before anything ran

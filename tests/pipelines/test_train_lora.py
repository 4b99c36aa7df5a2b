"""LoRA training with attnplug variants (issue 22): gradients through the sparse kernel equal those through dense
attention under the same mask; `attnplug train-lora` on a tiny real Wan pipeline writes a LoRA that diffusers'
`load_lora_weights` loads and that changes the output; a resumed run equals an uninterrupted one; bad input is
refused before anything loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_attn as da
from attn_pipelines.cli import main
from diffusion_attn.adapters.base import AttnRuntime

from ..diffusion.tiny import tiny_wan


def _dense_kernel(self, plan, q, k, v, key_mask, gather, *, run_after=True):
    """AttnRuntime._kernel replaced by dense SDPA under the plan's token mask (same permutation)."""
    self.calls += 1
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if plan.perm is not None:
        qh, kh, vh = (t[:, :, plan.perm] for t in (qh, kh, vh))
    lay = plan.layout
    B, H = qh.shape[:2]
    mask = torch.stack(
        [torch.stack([lay.to_token_mask(b, h) for h in range(H)]) for b in range(B)]
    )  # [B, H, N, N] on the permuted order
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    if plan.perm is not None:
        out = out[:, :, torch.argsort(plan.perm)]
    return out.transpose(1, 2)


def _grads(backend: str, dense: bool, monkeypatch) -> tuple[dict, float]:
    model, inputs = tiny_wan(frames=8, height=8, width=8)  # 8 frames x 16 tokens: radial keeps 66% of the pairs
    model.train()
    variant = da.Radial(decay_factor=0.3, dense_steps=0, dense_layers=0, attention_sink=False, block_size=16)
    with monkeypatch.context() as m:
        if dense:
            m.setattr(AttnRuntime, "_kernel", _dense_kernel)
        with da.apply(model, variant, step_source="callback", kernel_backend=backend) as handle:
            handle.set_step(1)
            out = model(**inputs, return_dict=False)[0]
            out.square().mean().backward()
            assert handle.attention_calls > 0
            density = [
                st for st in variant._cache.values() if isinstance(st, tuple) and hasattr(st[0], "density")
            ]  # the cached radial layout(s)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, min(s[0].density for s in density)


@pytest.mark.slow  # 6-14 s on 2 loaded cores (reference), ~30 s (Triton interpreter)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sparse_kernel_gradients_equal_dense_attention_under_the_same_mask(backend, monkeypatch):
    sparse, density = _grads(backend, False, monkeypatch)
    dense, _ = _grads(backend, True, monkeypatch)
    assert density < 0.9  # the mask is really sparse: unmasked attention would give other gradients
    assert sparse.keys() == dense.keys() and any("attn1.to_q" in n for n in sparse)
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-6, rtol=1e-4, msg=name)
    # and the mask matters: plain attention (no variant) gives different gradients
    model, inputs = tiny_wan(frames=8, height=8, width=8)
    model.train()
    model(**inputs, return_dict=False)[0].square().mean().backward()
    q_grad = model.blocks[0].attn1.to_q.weight.grad
    assert not torch.allclose(q_grad, sparse["blocks.0.attn1.to_q.weight"], atol=1e-6)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved tiny WanPipeline and a data folder of two clips (GIFs) with captions."""
    import imageio.v3 as iio

    from attn_pipelines.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("lora")
    model = save_tiny_pipeline(root / "pipe", "wan")
    data = root / "clips"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red circle moves right", "a blue square moves down"]):
        iio.imwrite(data / f"clip{i}.gif", (rng.random((9, 40, 48, 3)) * 255).astype(np.uint8))
        (data / f"clip{i}.txt").write_text(caption)
    return model, data, root / "cache"


def _train(tiny_setup, out: Path, steps: int, *extra: str) -> int:
    model, data, cache = tiny_setup
    argv = ["train-lora", "--model", str(model), "--data", str(data), "--out", str(out), "--attn",
            "radial:block_size=16,dense_layers=0,dense_steps=0", "--rank", "4", "--steps", str(steps),
            "--height", "32", "--width", "32", "--frames", "9", "--text-len", "16", "--lr", "1e-3",
            "--save-every", "2", "--cache-dir", str(cache), "--no-progress", *extra]  # fmt: skip
    return main(argv)


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_setup, tmp_path_factory):
    """Uninterrupted 4 steps, and 2 steps then a rerun of the same command to 4 (resumed)."""
    root = tmp_path_factory.mktemp("runs")
    full = root / "full"
    assert _train(tiny_setup, full, 4) == 0
    resumed = root / "resumed"
    assert _train(tiny_setup, resumed, 2) == 0
    assert _train(tiny_setup, resumed, 4) == 0
    return full, resumed


@pytest.mark.slow
def test_train_lora_writes_a_lora_that_loads_and_changes_the_output(tiny_setup, trained):
    from diffusers import WanPipeline

    full, _ = trained
    for name in ("pytorch_lora_weights.safetensors", "README.md", "train_config.json", "metrics.json"):
        assert (full / name).is_file(), name
    card = (full / "README.md").read_text()
    assert "Radial(" in card and "base_model:" in card and "load_lora_weights" in card
    w = _weights(full)
    assert w and all(k.startswith("transformer.") for k in w)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in w.items())  # trained away from B = 0

    def generate(lora: bool) -> torch.Tensor:
        pipe = WanPipeline.from_pretrained(str(tiny_setup[0]))
        if lora:
            pipe.load_lora_weights(str(full))
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle moves right", height=32, width=32, num_frames=5, num_inference_steps=2,
                    guidance_scale=1.0, generator=g, output_type="latent", max_sequence_length=16).frames  # fmt: skip

    base, tuned = generate(False), generate(True)
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-4


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(trained):
    full, resumed = trained
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    import json

    assert json.loads((full / "metrics.json").read_text())["loss"] == pytest.approx(
        json.loads((resumed / "metrics.json").read_text())["loss"], rel=1e-5
    )


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--attn", "lite"], "LiteAttention"),
        (["--mixed-precision", "fp8"], "--mixed-precision"),
        (["--height", "32"], "height and width"),
        (["--attn", "radial:decay_factor=-1"], "decay_factor"),
    ],
)
def test_bad_input_is_refused_before_loading(tmp_path, capsys, flags, needle):
    data = tmp_path / "clips"
    data.mkdir()
    (data / "a.mp4").write_bytes(b"")
    (data / "a.txt").write_text("a caption")
    argv = ["train-lora", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) if "fp8" in flags else _nothing():
        assert main(argv + flags) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_data_folder_without_captions_is_refused(tmp_path, capsys):
    data = tmp_path / "clips"
    data.mkdir()
    (data / "a.mp4").write_bytes(b"")
    argv = ["train-lora", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "a.txt" in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _family_pipe(family: str):
    """(transformer, a stand-in for its pipeline with what `lora_loss` uses, one batch of cached inputs)."""
    import types

    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
    )

    from ..diffusion.tiny import tiny_cogvideox, tiny_hunyuan_video, tiny_ltx_video

    if family == "hunyuan_video":
        model, inp = tiny_hunyuan_video(frames=4, height=8, width=8)
        batch = {k: inp[k] for k in ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")}
        batch["latents"] = inp["hidden_states"]
        return model, types.SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler()), batch
    if family == "ltx_video":
        model, inp = tiny_ltx_video(frames=3, height=4, width=6)
        pipe = types.SimpleNamespace(
            transformer_spatial_patch_size=1, transformer_temporal_patch_size=1, vae_temporal_compression_ratio=8,
            vae_spatial_compression_ratio=32, _pack_latents=LTXPipeline._pack_latents,
            _unpack_latents=LTXPipeline._unpack_latents, scheduler=FlowMatchEulerDiscreteScheduler(),
        )  # fmt: skip
        latents = inp["hidden_states"].view(1, 3, 4, 6, 8).permute(0, 4, 1, 2, 3)  # packed -> [B, C, F, H, W]
        batch = {"latents": latents, "encoder_hidden_states": inp["encoder_hidden_states"]}
        batch["encoder_attention_mask"] = inp["encoder_attention_mask"]
        return model, pipe, batch
    model, inp = tiny_cogvideox(frames=3, height=8, width=8)
    pipe = types.SimpleNamespace(
        scheduler=CogVideoXDDIMScheduler(prediction_type="v_prediction"), vae_scale_factor_spatial=8, transformer=model
    )
    pipe._prepare_rotary_positional_embeddings = types.MethodType(
        CogVideoXPipeline._prepare_rotary_positional_embeddings, pipe
    )
    batch = {"latents": inp["hidden_states"], "encoder_hidden_states": inp["encoder_hidden_states"]}
    batch["pixel_size"] = torch.tensor([[64, 64]])
    return model, pipe, batch


@pytest.mark.parametrize("family", [pytest.param("hunyuan_video", marks=pytest.mark.slow), "ltx_video", "cogvideox"])
def test_family_losses_train_the_lora_through_the_kernel(family):
    """One training step of each other family's own loss with radial applied: finite, through attnplug's
    kernel, and every LoRA B matrix of the attention gets a gradient (A's are zero while B = 0)."""
    from peft import LoraConfig

    from diffusion_attn.lora import TARGET_MODULES, lora_loss

    model, pipe, batch = _family_pipe(family)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(TARGET_MODULES[family])))
    model.train()
    variant = da.Radial(decay_factor=1.0, dense_steps=0, dense_layers=0, attention_sink=True, block_size=16)
    with da.apply(model, variant, step_source="callback") as handle:
        handle.set_step(1)
        loss = lora_loss(pipe, model, family, batch, torch.Generator().manual_seed(0), shift=3.0)
        loss.backward()
        assert handle.attention_calls > 0
    assert torch.isfinite(loss) and loss > 0
    b_grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert b_grads and all(g is not None and g.abs().max() > 0 for n, g in b_grads.items() if ".attn" in n)


@pytest.mark.skipif(__import__("os").name != "posix", reason="POSIX permissions")
def test_written_lora_files_have_the_umask_permissions(tiny_setup, tmp_path):
    """Audit class 4 found again: safetensors >= 0.8 writes 0600 files; the LoRA a user trains (and hands to a
    shared model folder) gets 0666 & ~umask like every other file the run writes."""
    import os
    import stat

    out = tmp_path / "perm"
    old = os.umask(0o027)
    try:
        assert _train(tiny_setup, out, 1) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert "pytorch_lora_weights.safetensors" in modes
    assert set(modes.values()) == {0o640}, modes

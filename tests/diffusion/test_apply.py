"""diffusion_attn.apply on tiny instances of every supported family: exact q/k/v, exact
restore, step tracking, composition checks, backends, batch/CFG, accelerate offload."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import diffusion_attn as da
from attn_kernels import BlockLayout
from diffusion_attn.variants.base import Variant

from .tiny import BUILDERS, VIDEO_FAMILIES, run, save_load, tiny_wan


class ForceKernel(Variant):
    """Test-only: every call through attnplug's kernel with a dense layout (proves q/k/v equality)."""

    name: ClassVar[str] = "force_kernel"
    role: ClassVar[str] = "sparsity"

    def plan(self, ctx, plan):
        plan.layout = BlockLayout.dense(ctx.layout.seq_len, ctx.layout.seq_len, 16, 16)
        return plan


class Recorder(Variant):
    """Test-only: records (step, layer, layout) of every call; leaves the plan dense."""

    name: ClassVar[str] = "recorder"
    role: ClassVar[str] = "modifier"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, da.TokenLayout]] = []
        self.resets = 0

    def plan(self, ctx, plan):
        self.seen.append((ctx.step, ctx.layer, ctx.layout))
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return plan

    def reset(self):
        self.resets += 1


class Other(ForceKernel):
    name: ClassVar[str] = "other_sparse"


@pytest.mark.parametrize("family", list(BUILDERS))
def test_kernel_path_equals_model_and_remove_is_exact(family, tmp_path):
    model, inputs = BUILDERS[family]()
    model = save_load(model, tmp_path / family)  # loaded back with from_pretrained
    ref = run(model, inputs)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    handle = da.apply(model, ForceKernel())
    out = run(model, inputs)
    assert handle.attention_calls == len(handle.adapter.attention_modules(model))  # every layer went through
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    handle.remove()
    assert torch.equal(run(model, inputs), ref)
    assert all(m.processor is procs[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "_diffusers_hook") and "forward" not in model.__dict__


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_token_layout_seen_by_variants(family):
    model, inputs = BUILDERS[family]()
    rec = Recorder()
    with da.apply(model, rec):
        run(model, inputs)
    layouts = {lay for _, _, lay in rec.seen}
    assert {lay.family for lay in layouts} == {family}
    expected_grid = {"wan": (3, 4, 6), "hunyuan_video": (3, 4, 4), "cogvideox": (3, 4, 4), "ltx_video": (3, 4, 6)}
    assert {lay.grid for lay in layouts} == {expected_grid[family]}
    text = {"wan": {0}, "hunyuan_video": {9}, "cogvideox": {6}, "ltx_video": {0}}[family]
    assert {lay.text_len for lay in layouts} == text
    if family == "cogvideox":
        assert all(lay.text_first for lay in layouts)


def test_step_tracking_with_cfg_double_calls_and_new_generation():
    model, inputs = BUILDERS["wan"]()
    rec = Recorder()
    handle = da.apply(model, rec)
    for _gen in range(2):
        for t in (999.0, 800.0, 500.0):
            for _ in range(2):  # cond + uncond at the same timestep
                run(model, {**inputs, "timestep": torch.tensor([t])})
    steps = [s for s, layer, _ in rec.seen if layer == 0]
    assert steps == [0, 0, 1, 1, 2, 2] * 2
    assert {layer for _, layer, _ in rec.seen} == {0, 1}
    assert rec.resets == 1  # the rising timestep started generation 2
    assert handle.runtimes[0].states[(0, 1)]["n"] == 6  # per-(variant, layer) state cleared on reset
    handle.set_step(7)
    run(model, inputs)
    assert rec.seen[-1][0] == 7
    handle.remove()


def test_batch_and_cfg_batches():
    model, inputs = BUILDERS["hunyuan_video"](batch=2)
    inputs["encoder_attention_mask"][1, 4:] = 0  # different padding per batch entry
    ref = run(model, inputs)
    with da.apply(model, ForceKernel()):
        out = run(model, inputs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_apply_on_pipeline_like_object_and_context_manager():
    model, inputs = BUILDERS["wan"]()

    class Pipe:
        transformer = model
        transformer_2 = None

    ref = run(model, inputs)
    with da.apply(Pipe(), ForceKernel()) as handle:
        assert len(handle.runtimes) == 1
        run(model, inputs)
    assert torch.equal(run(model, inputs), ref)


def test_refusals_happen_before_patching():
    model, inputs = BUILDERS["wan"]()
    procs = [m.processor for m in model.modules() if hasattr(m, "processor")]
    with pytest.raises(ValueError, match="at most one sparsity"):
        da.apply(model, ForceKernel(), Other())
    with pytest.raises(ValueError, match="at least one variant"):
        da.apply(model)
    with pytest.raises(TypeError, match="not a diffusion_attn variant"):
        da.apply(model, "radial")
    assert [m.processor for m in model.modules() if hasattr(m, "processor")] == procs
    assert not hasattr(model, "_diffusers_hook")


def test_unsupported_model_lists_families():
    with pytest.raises(ValueError, match=r"no adapter for Linear; supported model families: .*flux.*wan"):
        da.apply(torch.nn.Linear(2, 2), ForceKernel())
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        da.apply(object(), ForceKernel())


def test_apply_twice_refused_and_remove_twice_noop_and_reapply():
    model, inputs = BUILDERS["wan"]()
    ref = run(model, inputs)
    h = da.apply(model, ForceKernel())
    with pytest.raises(RuntimeError, match="already has attnplug variants applied"):
        da.apply(model, ForceKernel())
    h.remove()
    h.remove()
    h2 = da.apply(model, ForceKernel())
    torch.testing.assert_close(run(model, inputs), ref, atol=2e-5, rtol=1e-4)
    h2.remove()
    assert torch.equal(run(model, inputs), ref)


def test_untouched_and_dense_calls_keep_set_attention_backend(backend_spy, restore_active_backend):
    """Dense calls (and the untouched cross-attention) run on the backend the user set, before and while applied;
    a backend set while applied takes effect at once and stays after remove()."""
    model, inputs = tiny_wan()
    ref = run(model, inputs)
    model.set_attention_backend("_native_math")
    radial = da.Radial(dense_steps=1, dense_layers=1, block_size=16)
    with da.apply(model, radial, step_source="callback") as handle:
        backend_spy.clear()
        handle.set_step(0)  # warm-up: every call dense
        out = run(model, inputs)
        assert backend_spy == {"_native_math": 4} and handle.attention_calls == 0  # 2 x attn1 + 2 x attn2
        torch.testing.assert_close(out, ref)
        backend_spy.clear()
        handle.set_step(1)  # layer 0 dense (dense_layers=1), layer 1 sparse
        run(model, inputs)
        assert backend_spy == {"_native_math": 3} and handle.attention_calls == 1
        model.set_attention_backend("native")  # while applied
        backend_spy.clear()
        run(model, inputs)
        assert backend_spy == {"native": 3} and handle.attention_calls == 2
    backend_spy.clear()
    assert torch.equal(run(model, inputs), ref)
    assert backend_spy == {"native": 4}  # the user's later choice survived remove()


def test_accelerate_cpu_offload_hooks():
    accelerate = pytest.importorskip("accelerate")
    model, inputs = BUILDERS["wan"]()
    ref = run(model, inputs)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with da.apply(model, ForceKernel()) as handle:
        out = run(model, inputs)
        assert handle.attention_calls > 0
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_dense_last_steps_through_apply_num_steps():
    """Radial(dense_last_steps=2) learns the number of steps from apply(num_steps=...): the last two steps are
    dense, also with the default step source (timesteps of a custom loop, no pipeline)."""
    model, inputs = BUILDERS["wan"]()
    radial = da.Radial(dense_steps=1, dense_layers=0, dense_last_steps=2, block_size=16)
    with da.apply(model, radial, num_steps=6) as handle:
        per_step = []
        for t in (900.0, 800.0, 700.0, 600.0, 500.0, 400.0):
            calls = handle.attention_calls
            run(model, {**inputs, "timestep": torch.tensor([t])})
            per_step.append(handle.attention_calls - calls)
        assert handle.num_steps == 6
    assert per_step == [0, 2, 2, 2, 0, 0]
    with da.apply(model, da.Radial(dense_last_steps=2)):  # no number of steps anywhere: a clear error
        with pytest.raises(ValueError, match=r"dense_last_steps=2 needs the number of denoising steps.*num_steps"):
            run(model, {**inputs, "timestep": torch.tensor([900.0])})
    with pytest.raises(ValueError, match=r"num_steps must be an int >= 1"):
        da.apply(model, radial, num_steps=0)


def test_flux_grid_errors():
    model, inputs = BUILDERS["flux"]()
    with da.apply(model, ForceKernel()):
        with pytest.raises(
            ValueError, match=r"attnplug\[flux\]: the transformer must be called with hidden_states and img_ids"
        ):
            run(model, {**inputs, "img_ids": None})
        with pytest.raises(ValueError, match=r"img_ids must be \[N, 3\]"):
            run(model, {**inputs, "img_ids": inputs["img_ids"][:, :2]})
        extra = torch.cat([inputs["hidden_states"], inputs["hidden_states"][:, :8]], 1)  # conditioning tokens
        ids = torch.cat([inputs["img_ids"], inputs["img_ids"][:8]])
        with pytest.raises(ValueError, match=r"6 x 8 grid but there are 56 image tokens.*not supported"):
            run(model, {**inputs, "hidden_states": extra, "img_ids": ids})


def test_ltx_grid_errors():
    model, inputs = BUILDERS["ltx_video"]()
    with da.apply(model, ForceKernel()):
        with pytest.raises(ValueError, match=r"num_frames x height x width = 3 x 4 x 5 must equal the 72 packed"):
            run(model, {**inputs, "width": 5})
        with pytest.raises(ValueError, match=r"None x 4 x 6"):
            run(model, {**inputs, "num_frames": None})


def test_hunyuan_mask_errors_and_unseen_grid():
    model, inputs = BUILDERS["hunyuan_video"]()
    attn = model.transformer_blocks[0].attn
    hs, enc = torch.randn(1, 48, 32), torch.randn(1, 9, 32)
    with da.apply(model, ForceKernel()):
        with pytest.raises(RuntimeError, match=r"token grid is unknown.*outside the transformer"):
            attn(hs, enc)  # never seen a transformer forward
        run(model, inputs)
        with pytest.raises(ValueError, match=r"boolean key-padding mask \[B, 1, 1, N\], got torch.float32"):
            attn(hs, enc, attention_mask=torch.zeros(1, 1, 1, 57))
        with pytest.raises(ValueError, match=r"got torch.bool \(1, 1, 57, 57\)"):
            attn(hs, enc, attention_mask=torch.ones(1, 1, 57, 57, dtype=torch.bool))
        with pytest.raises(RuntimeError, match=r"has 57 tokens but the attention call has 41 queries"):
            attn(hs[:, :32], enc)


def test_wan_self_attention_with_a_mask_runs_the_models_processor():
    """A self-attention call given a mask (the model never passes one) keeps the mask's exact semantics."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs = BUILDERS["wan"]()
    attn = model.blocks[1].attn1
    hs = torch.randn(1, 72, 32)
    mask = torch.rand(72, 72) > 0.5
    mask |= torch.eye(72, dtype=torch.bool)
    ref = WanAttnProcessor()(attn, hs, None, mask, None)
    with da.apply(model, da.Radial(dense_steps=0, dense_layers=0, block_size=16)) as handle:
        run(model, inputs)
        calls = handle.attention_calls
        out = attn(hs, None, mask, None)
        assert handle.attention_calls == calls  # not through the sparse kernel
    torch.testing.assert_close(out, ref)

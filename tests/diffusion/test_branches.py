"""Per-branch variant state (issue 9): LiteAttention keeps one skip set per cache-context branch, whether CFG
runs as two calls ("cond" / "uncond") or as one batch ("cond_uncond", one set per sample)."""

from __future__ import annotations

import torch

import diffusion_attn as da

from .tiny import run, tiny_wan, tiny_wan_pipeline, wan_pipeline_inputs


def _lite():
    return da.LiteAttention(threshold=-0.05, block_size=16)


def _skips(handle, branch) -> list[torch.Tensor]:
    states = handle.runtimes[0].branch_states()[branch]
    return [st["skip"].clone() for key in sorted(states) for st in states[key].values() if "skip" in st]


def _inputs(model_inputs, seed):
    """Different latents and prompts per branch, so the branches' attention (and skip sets) differ."""
    g = torch.Generator().manual_seed(seed)
    return {
        **model_inputs,
        "hidden_states": torch.randn(model_inputs["hidden_states"].shape, generator=g),
        "encoder_hidden_states": torch.randn(model_inputs["encoder_hidden_states"].shape, generator=g),
    }


def test_sequential_cfg_keeps_one_skip_set_per_branch():
    """cond / uncond calls alternate; each branch's outputs and skip sets equal a run that saw only that branch."""
    model, base = tiny_wan(frames=4)
    cond, uncond = _inputs(base, 1), _inputs(base, 2)
    timesteps = (900.0, 800.0, 700.0, 600.0)

    def steps(handle, branches):
        outs = {b: [] for b in branches}
        for t in timesteps:
            for name, inputs in branches.items():
                with model.cache_context(name):
                    outs[name].append(run(model, {**inputs, "timestep": torch.tensor([t])}))
        return outs

    with da.apply(model, _lite()) as handle:
        both = steps(handle, {"cond": cond, "uncond": uncond})
        skip_c, skip_u = _skips(handle, "cond"), _skips(handle, "uncond")
        assert handle.step == 3
    with da.apply(model, _lite()) as handle:
        alone_c = steps(handle, {"cond": cond})["cond"]
        ref_skip_c = _skips(handle, "cond")
    with da.apply(model, _lite()) as handle:
        alone_u = steps(handle, {"uncond": uncond})["uncond"]
        ref_skip_u = _skips(handle, "uncond")
    assert any(not torch.equal(a, b) for a, b in zip(skip_c, skip_u))  # the branches really differ
    assert all(torch.equal(a, b) for a, b in zip(skip_c, ref_skip_c))
    assert all(torch.equal(a, b) for a, b in zip(skip_u, ref_skip_u))
    for a, b in zip(both["cond"], alone_c):
        assert torch.equal(a, b)
    for a, b in zip(both["uncond"], alone_u):
        assert torch.equal(a, b)


def test_batched_cfg_keeps_one_skip_set_per_sample():
    """One "cond_uncond" call with batch 2: sample i's output and skip set equal running sample i alone."""
    model, base = tiny_wan(frames=4)
    cond, uncond = _inputs(base, 1), _inputs(base, 2)
    batch = {
        **base,
        "hidden_states": torch.cat([cond["hidden_states"], uncond["hidden_states"]]),
        "encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], uncond["encoder_hidden_states"]]),
    }
    timesteps = (900.0, 800.0, 700.0)

    def steps(inputs, b):
        outs = []
        for t in timesteps:
            with model.cache_context("cond_uncond"):
                outs.append(run(model, {**inputs, "timestep": torch.full((b,), t)}))
        return outs

    with da.apply(model, _lite()) as handle:
        out2 = steps(batch, 2)
        skip2 = _skips(handle, "cond_uncond")
    for i, single in enumerate((cond, uncond)):
        with da.apply(model, _lite()) as handle:
            out1 = steps(single, 1)
            skip1 = _skips(handle, "cond_uncond")
        for a, b in zip(out2, out1):
            torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(s2[i : i + 1], s1) for s2, s1 in zip(skip2, skip1))


def test_wan_pipeline_cfg_branches_have_their_own_state():
    """The real WanPipeline marks its two calls per step "cond" / "uncond": LiteAttention keeps two skip sets."""
    pipe = tiny_wan_pipeline()
    handle = da.apply(pipe, _lite())
    seen = {}

    def grab(p, i, t, kw):
        if i == 2:
            seen.update({b: _skips(handle, b) for b in ("cond", "uncond")})
        return kw

    try:
        pipe(**wan_pipeline_inputs(pipe, steps=4, callback_on_step_end=grab))
    finally:
        handle.remove()
    assert set(seen) == {"cond", "uncond"}
    assert all(s.any() for s in seen["cond"])  # seeded
    assert any(not torch.equal(a, b) for a, b in zip(seen["cond"], seen["uncond"]))

"""AgentSD on tiny real models: the UNet equals an independent reference of the official patch
(ToMe merging included, written here from the formula), the DiT option equals the reference on the
q, k, v a real SD3 layer produced, lower-resolution levels and calls below the agent threshold keep
the model's softmax attention bit-exactly, clear errors, a sync-free steady state, the bench smoke."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.adapters.unet import _levels
from tests.diffusion.tiny import tiny_sd3
from tests.diffusion.tiny_layout import tiny_unet, unet_inputs

ROOT = Path(__file__).resolve().parents[2]


# -- independent reference (the official agentsd/patch.py + merge.py semantics, our own code) -----------
def ref_matching(x, h, w, s, r, agent_r, rand):
    """Official bipartite soft matching written out per batch entry: returns (merge, agents, unmerge)."""
    B, N, _ = x.shape
    pick = torch.zeros(h // s, w // s, dtype=torch.long) if rand is None else rand
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h // s):
        for j in range(w // s):
            p = int(pick[i, j])
            is_dst[i * s + p // s, j * s + p % s] = True
    dst = [t for t in range(N) if is_dst.view(-1)[t]]
    src = [t for t in range(N) if not is_dst.view(-1)[t]]
    r, agent_r = min(len(src), r), min(len(src), agent_r)
    plans = []
    for b in range(B):
        m = x[b] / x[b].norm(dim=-1, keepdim=True)
        sim = m[src] @ m[dst].T
        best, arg = sim.max(-1)
        order = sorted(range(len(src)), key=lambda i: (-float(best[i]), i))  # most similar first, stable
        plans.append((order, arg))
    with_agents = (N - agent_r) * 2 < N - r

    def merge_n(t, n):  # t [B, N, C] -> [B, N - n, C]
        out = []
        for b, (order, arg) in enumerate(plans):
            merged_src = order[:n]
            rows = [t[b, src[i]] for i in order[n:]]
            for di, d in enumerate(dst):
                group = [t[b, d]] + [t[b, src[i]] for i in merged_src if int(arg[i]) == di]
                rows.append(torch.stack(group).mean(0))
            out.append(torch.stack(rows))
        return torch.stack(out)

    def unmerge(y):  # [B, N - r, C] -> [B, N, C]
        out = torch.zeros(B, N, y.shape[-1], dtype=y.dtype)
        for b, (order, arg) in enumerate(plans):
            n_unm = len(src) - r
            for k, i in enumerate(order[r:]):
                out[b, src[i]] = y[b, k]
            for di, d in enumerate(dst):
                out[b, d] = y[b, n_unm + di]
            for i in order[:r]:
                out[b, src[i]] = y[b, n_unm + int(arg[i])]
        return out

    return (lambda t: merge_n(t, r)), (lambda t: merge_n(t, agent_r)) if with_agents else None, unmerge


class RefAgentProcessor:
    """AgentSD's attention on one UNet attn1, as the official patch computes it (merge, then project)."""

    def __init__(self, ref, ratio, agent_ratio, s):
        self.ref, self.ratio, self.agent_ratio, self.s = ref, ratio, agent_ratio, s

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        x, (H, W) = self.ref["block_input"], self.ref["latent"]
        B, N, C = hidden_states.shape
        ds = int(round((H * W / N) ** 0.5))
        h, w = -(-H // ds), -(-W // ds)
        r, agent_r = int(N * self.ratio), int(N * self.agent_ratio)
        rand = None
        if self.ref["gen"] is not None and B % 2 == 0:
            rand = torch.randint(self.s * self.s, (h // self.s, w // self.s), generator=self.ref["gen"])
        merge, agents, unmerge = ref_matching(x, h, w, self.s, r, agent_r, rand)
        feat = merge(hidden_states)
        heads = attn.heads
        split = lambda t: t.view(B, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.to_q(feat)), split(attn.to_k(feat)), split(attn.to_v(feat))
        scale = q.shape[-1] ** -0.5
        if agents is not None:
            a = split(attn.to_q(agents(hidden_states)))
            agent_feature = torch.softmax(a @ k.transpose(-1, -2) * scale, -1) @ v
            out = torch.softmax(q @ a.transpose(-1, -2) * scale**0.3, -1) @ agent_feature + 0.075 * v
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
        out = attn.to_out[0](out.transpose(1, 2).reshape(B, -1, C))
        return unmerge(out)


def reference_unet(unet, ratio, agent_ratio, s, ds_max, seed=None):
    """A copy of `unet` whose attn1 at levels <= ds_max run RefAgentProcessor (block inputs by forward hooks)."""
    ref = copy.deepcopy(unet)
    state = {"gen": None if seed is None else torch.Generator().manual_seed(seed)}
    for _, blk, ds in _levels(ref):
        if ds <= ds_max:
            blk.register_forward_pre_hook(lambda m, a, kw: state.__setitem__("block_input", a[0]), with_kwargs=True)
            blk.attn1.set_processor(RefAgentProcessor(state, ratio, agent_ratio, s))
    ref.register_forward_pre_hook(
        lambda m, a, kw: state.__setitem__("latent", kw["sample"].shape[2:]), with_kwargs=True
    )
    return ref


@torch.no_grad()
@pytest.mark.parametrize("use_rand", [False, True])
def test_unet_equals_the_independent_reference(use_rand):
    """Early phase (stride 4, merge 0.4, agents 0.95): agents at the full-resolution level only."""
    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet, batch=2)
    ref = reference_unet(unet, 0.4, 0.95, 4, 1, seed=0 if use_rand else None)
    expected = ref(**inputs).sample
    plain = unet(**inputs).sample
    var = da.AgentSD(use_rand=use_rand, seed=0)
    with da.apply(unet, var, step_source="callback") as handle:
        out = unet(**inputs).sample
        assert handle.attention_calls == 3  # down_blocks.0 and the two up_blocks.2 transformers (16 x 16 tokens)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (out - plain).abs().max() > 1e-3  # it really changed the attention
    assert da.variants.agentsd.expected_agents(256, 16, 16, 0.4, 0.95, 4) == 16


@torch.no_grad()
def test_late_phase_is_tome_and_sdxl_uses_its_highest_attention_level():
    """From switch_step on (stride 2, agents 0.5) 2·agents >= merged tokens: merged softmax (official);
    SDXL has no attention at full resolution: its 2x level is the highest."""
    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet, batch=1)
    expected = reference_unet(unet, 0.4, 0.5, 2, 1)(**inputs).sample
    with da.apply(unet, da.AgentSD(switch_step=1), step_source="callback") as handle:
        handle.set_step(1)
        out = unet(**inputs).sample
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    xl = tiny_unet("sdxl", 64)
    inputs = unet_inputs(xl, batch=1, size=16)
    expected = reference_unet(xl, 0.4, 0.95, 4, 2)(**inputs).sample
    with da.apply(xl, da.AgentSD(stride=4), step_source="callback") as handle:
        out = xl(**inputs).sample
        assert handle.attention_calls == 6  # down_blocks.1 (2 transformer layers), up_blocks.1 (2 x 2) at 8 x 8
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_calls_below_the_threshold_keep_softmax_bit_exactly(monkeypatch):
    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet, batch=1)
    plain = unet(**inputs).sample
    # every call where 2·agents >= merged tokens runs the model's own processor with fallback="softmax"
    with da.apply(unet, da.AgentSD(switch_step=0, fallback="softmax"), step_source="callback") as handle:
        assert torch.equal(unet(**inputs).sample, plain)
        assert handle.attention_calls == 0
    # lower-resolution levels never leave the model's processor: count its calls per module
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen: list = []
    orig = AttnProcessor2_0.__call__

    def spy(self, attn, *a, **kw):
        seen.append(attn)
        return orig(self, attn, *a, **kw)

    monkeypatch.setattr(AttnProcessor2_0, "__call__", spy)
    with da.apply(unet, da.AgentSD(), step_source="callback") as handle:
        unet(**inputs)
    low = {id(b.attn1) for _, b, ds in _levels(unet) if ds > 1}
    high = {id(b.attn1) for _, b, ds in _levels(unet) if ds == 1}
    assert low and low <= {id(m) for m in seen} and not (high & {id(m) for m in seen})


def test_dit_option_equals_the_reference_on_real_q_k_v():
    """SD3 joint attention: image tokens merged on their grid (metric: keys averaged over heads), agents
    over [text, merged image] keys, text queries exact; checked on the q, k, v a real layer produced."""
    model, inputs = tiny_sd3(height=16, width=16)
    var = da.AgentSD(dit=True, stride=2, use_rand=False)
    seen: list = []
    orig = var.plan

    def plan(ctx, p):
        p = orig(ctx, p)
        if p.compute is not None:
            inner = p.compute

            def compute(q, k, v, backend, inner=inner, lay=ctx.layout):
                out = inner(q, k, v, backend)
                seen.append((lay, q, k, v, out))
                return out

            p.compute = compute
        return p

    var.plan = plan
    with torch.no_grad(), da.apply(model, var, step_source="callback"):
        model(**inputs)
    assert seen
    lay, q, k, v, out = next(s for s in seen if s[0].text_len)
    n_img, (_, h, w) = lay.num_visual, lay.grid
    qi, ki, vi = q[:, :, :n_img], k[:, :, :n_img], v[:, :, :n_img]
    N = h * w
    merge, agents, unmerge = ref_matching(ki.mean(1), h, w, 2, int(N * 0.4), int(N * 0.95), None)
    heads_last = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731
    back = lambda t, H: t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)  # noqa: E731
    H = q.shape[1]
    qm, km, vm = (back(merge(heads_last(t)), H) for t in (qi, ki, vi))
    a = back(agents(heads_last(qi)), H)
    kk, vv = torch.cat([k[:, :, n_img:], km], 2), torch.cat([v[:, :, n_img:], vm], 2)
    s = q.shape[-1] ** -0.5
    o = torch.softmax(qm @ a.transpose(-1, -2) * s**0.3, -1) @ (torch.softmax(a @ kk.transpose(-1, -2) * s, -1) @ vv)
    o = back(unmerge(heads_last(o + 0.075 * vm)), H)
    txt = torch.softmax(q[:, :, n_img:] @ k.transpose(-1, -2) * s, -1) @ v
    torch.testing.assert_close(out, torch.cat([o, txt], 2), rtol=1e-4, atol=1e-5)


def test_kernel_path_in_the_interpreter_matches_the_formula():
    """backend "triton" runs attn_kernels.agent_attention (Triton interpreter on CPU): same values."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    from diffusion_attn.variants.agentsd import agent_attention_call, agent_formula

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 24, generator=g) for _ in range(3))  # head dim 24: zero-padded to 32
    a = torch.randn(1, 2, 8, 24, generator=g)
    out = agent_attention_call(q, k, v, a, 24**-0.5, 0.3, "triton")
    torch.testing.assert_close(out, agent_formula(q, k, v, a, 24**-0.5, 0.3), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="129 agents > 128"):
        agent_attention_call(q, k, v, torch.randn(1, 2, 129, 24), 0.2, 0.3, "triton")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"agent_ratio": 0.0}, r"AgentSD.agent_ratio must be in \(0, 1\]"),
        ({"agent_ratio": 1.5}, r"AgentSD.agent_ratio must be in \[0.0, 1.0\]"),
        ({"late_agent_ratio": float("nan")}, r"AgentSD.late_agent_ratio must be in .*nan"),
        ({"merge_ratio": 1.0}, r"AgentSD.merge_ratio must be in \[0, 1\)"),
        ({"stride": 0}, r"AgentSD.stride must be in \[1, inf\]"),
        ({"fallback": "dense"}, r"AgentSD.fallback must be one of"),
        ({"layers": (0, -1)}, r"AgentSD.layers\[1\] must be in"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        da.AgentSD(**kwargs)


def test_refused_on_a_dit_without_the_option_and_model_untouched():
    model, _ = tiny_sd3()
    procs = dict(model.attn_processors)
    with pytest.raises(ValueError, match=r"AgentSD on sd3 \(a DiT\) is an option.*dit=True"):
        da.apply(model, da.AgentSD())
    with pytest.raises(ValueError, match=r"AgentSD.layers must index the 3 hooked attention layers"):
        da.apply(model, da.AgentSD(dit=True, layers=(5,)))
    assert dict(model.attn_processors) == procs and not hasattr(model, "_diffusers_hook")


def test_steady_state_reads_nothing_on_the_host():
    from tests.diffusion.test_sync_free import NoHostSync

    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet, batch=2)
    with da.apply(unet, da.AgentSD(), step_source="callback") as handle, torch.no_grad():
        unet(**inputs)
        calls = handle.attention_calls
        guard = NoHostSync(tolerate=("attn_kernels/reference.py", "diffusers/"))
        with guard:
            unet(**inputs)
        assert handle.attention_calls - calls == 3 and guard.calls > 100


def test_remove_restores_bit_exactly():
    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet, batch=1)
    with torch.no_grad():
        before = unet(**inputs).sample
        procs = dict(unet.attn_processors)
        handle = da.apply(unet, da.AgentSD(), step_source="callback")
        unet(**inputs)
        handle.remove()
        assert torch.equal(unet(**inputs).sample, before)
    assert dict(unet.attn_processors) == procs
    assert not any(hasattr(m, "_diffusers_hook") for m in unet.modules())


def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("agentsd_bench", ROOT / "benchmarks" / "agentsd_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "agentsd_bench_smoke.json").read_text())
    assert data["device"]["type"] == "cpu" and data["layer"] and data["layer"][0]["softmax_ms"] > 0
    assert {"tome_ms", "agentsd_ms", "agents", "merged_tokens"} <= set(data["layer"][0])

"""diffusers ring context parallelism (issue 22): `ContextParallelConfig(ring_degree=N)` and Ulysses x ring over
CPU processes (gloo) give the same outputs as one process for radial, GNA, LiteAttention and UltraViCo (with its
beta band: extra passes merged like the chunks) on Wan (self-attention), radial / GNA on FLUX (joint
[text, image] attention, both sharded per rank) and regional attention through tiny FLUX (joint attention:
entity masks with element-level blocks) and Wan (text cross-attention on the rank's query rows) pipelines; a
ring step whose sub-layout is empty makes no kernel call.

Every case plans every self-attention call sparse: dense calls run diffusers' own ring attention, which needs
an attention backend that returns the LSE, and diffusers has none on the CPU. As in test_parallel.py, the
workers make `torch.accelerator.device_count` report 1 (test code only) so diffusers
places every rank on the CPU; nothing needs NCCL. One spawn per world size (module fixtures, slow); the default
suite runs the ring's compute in one process (`ring_chunks` for each rank of a simulated ring of 4).
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

import diffusion_attn as da

from .tiny import tiny_flux, tiny_wan

STEPS = (0, 1, 2)


def _variants() -> dict:
    return {
        "radial": lambda: da.Radial(
            dense_steps=0, dense_layers=0, decay_factor=0.3, attention_sink=True, block_size=16
        ),
        "gna": lambda: da.Neighborhood(kernel_size=3, stride=(1, 1, 3), block_size=16),
        "lite": lambda: da.LiteAttention(threshold=-0.05, block_size=16),
        "ultravico": lambda: da.UltraViCo(
            alpha=0.8, beta=0.5, train_frames=1, harmonic_period=2, harmonic_width=1, block_size=16
        ),
    }


def _wan():
    return tiny_wan(frames=4, height=8, width=16)  # 4 x 4 x 8 = 128 tokens: 32 (two blocks of 16) per rank of 4


def _flux():
    model, inputs = tiny_flux()  # 6 x 8 = 48 image tokens
    g = torch.Generator().manual_seed(5)
    inputs["encoder_hidden_states"] = torch.randn(1, 8, 24, generator=g)  # 8 text tokens: 2 per rank of 4
    inputs["txt_ids"] = torch.zeros(8, 3)
    return model, inputs


MODELS = {"wan": _wan, "flux": _flux}
#: (family, variant) pairs run under every layout; LiteAttention needs block-aligned shards (no text)
CASES = [("wan", "radial"), ("wan", "gna"), ("wan", "lite"), ("wan", "ultravico"), ("flux", "radial"), ("flux", "gna")]


def _generate(model, inputs, variant) -> tuple[list[torch.Tensor], int]:
    handle = da.apply(model, variant, step_source="callback")
    try:
        outs = []
        for step in STEPS:
            handle.set_step(step)
            with torch.no_grad():
                outs.append(model(**inputs, return_dict=False)[0])
        return outs, handle.attention_calls
    finally:
        handle.remove()


def _regional(pipe) -> tuple[torch.Tensor, int]:
    """Regional attention (two entity boxes) through a tiny FLUX pipeline: joint [entity 0, entity 1, global,
    image] attention with element masks; 6 + 6 + 8 = 20 text and 16 image tokens (5 and 4 per rank of 4)."""
    from tests.diffusion.tiny_layout import PROMPT

    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64)), ("a blue car", (32, 16, 64, 64))], height=64,
                      width=64, max_sequence_length=6, block_size=16)  # fmt: skip
    with da.apply(pipe, reg) as handle:
        out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), height=64, width=64, num_inference_steps=2,
                   output_type="latent", max_sequence_length=8).images  # fmt: skip
        return out, handle.attention_calls


def _wan_regional(pipe) -> tuple[torch.Tensor, int]:
    """Regional attention on Wan's text cross-attention (queries sharded, every text key local) with UltraViCo on
    the self-attention, through a tiny WanPipeline with classifier-free guidance: 3 x 4 x 4 = 48 visual tokens."""
    from tests.diffusion.tiny_layout import PROMPT

    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64))], height=64, width=64, max_sequence_length=6,
                      block_size=16)  # fmt: skip
    uvc = da.UltraViCo(alpha=0.8, train_frames=1)  # self-attention never dense (diffusers' dense ring needs an LSE)
    with da.apply(pipe, uvc, reg) as handle:
        out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), height=64, width=64, num_frames=9,
                   num_inference_steps=2, output_type="latent", max_sequence_length=8).frames  # fmt: skip
        return out, handle.attention_calls


def _worker(rank: int, world: int, port: int, meshes: list, out: str, pipelines: bool) -> None:
    try:
        import torch.distributed as dist
        from diffusers import ContextParallelConfig
        from torch.distributed.device_mesh import init_device_mesh

        import attn_kernels

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.accelerator.device_count = lambda: 1  # see the module docstring
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        kernel_calls = [0]
        real = attn_kernels.attention

        def counting(*args, **kwargs):
            kernel_calls[0] += 1
            return real(*args, **kwargs)

        attn_kernels.attention = counting  # ring.py imports it per call: every kernel call is counted
        results: dict = {}
        for ring, uly in meshes:
            for family, name in CASES:
                model, inputs = MODELS[family]()
                mesh = init_device_mesh("cpu", (ring, uly), mesh_dim_names=("ring", "ulysses"))
                model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=uly, mesh=mesh))
                kernel_calls[0] = 0
                handle = da.apply(model, _variants()[name](), step_source="callback")
                outs = []
                for step in STEPS:
                    handle.set_step(step)
                    with torch.no_grad():
                        outs.append(model(**inputs, return_dict=False)[0])
                rt = handle.runtimes[0]
                results[(ring, uly, family, name)] = (outs, rt.calls, kernel_calls[0], rt.ring_skipped)
                handle.remove()
            if not pipelines:
                continue
            from attn_pipelines.tiny import build_tiny_pipeline

            pipe = build_tiny_pipeline("flux")
            mesh = init_device_mesh("cpu", (ring, uly), mesh_dim_names=("ring", "ulysses"))
            pipe.transformer.enable_parallelism(
                config=ContextParallelConfig(ring_degree=ring, ulysses_degree=uly, mesh=mesh)
            )
            results[(ring, uly, "flux", "regional")] = _regional(pipe)
            pipe = build_tiny_pipeline("wan")
            mesh = init_device_mesh("cpu", (ring, uly), mesh_dim_names=("ring", "ulysses"))
            pipe.transformer.enable_parallelism(
                config=ContextParallelConfig(ring_degree=ring, ulysses_degree=uly, mesh=mesh)
            )
            results[(ring, uly, "wan", "regional")] = _wan_regional(pipe)
        # gradients through ring attention are refused with a clear error (inference only)
        model, inputs = _wan()
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ring", "ulysses"))
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=world, mesh=mesh))
        with da.apply(model, _variants()["radial"](), step_source="callback") as handle:
            handle.set_step(0)
            try:
                model(**inputs, return_dict=False)[0].sum().backward()
                results["grad"] = "no error"
            except RuntimeError as e:
                results["grad"] = str(e)
        torch.save(results, out + f".{rank}")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(out + f".err{rank}").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path_factory, world: int, meshes: list, pipelines: bool) -> list[dict]:
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp(f"ring{world}") / "rank")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, meshes, out, pipelines)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    msgs = [Path(out + f".err{r}").read_text() for r in range(world) if Path(out + f".err{r}").exists()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out + f".{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory, 2, [(2, 1)], pipelines=False)  # the models only


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory, 4, [(4, 1), (2, 2)], pipelines=True)


@pytest.fixture(scope="module")
def regional_reference():
    from attn_pipelines.tiny import build_tiny_pipeline

    return {"flux": _regional(build_tiny_pipeline("flux")), "wan": _wan_regional(build_tiny_pipeline("wan"))}


def _check_regional(results: list[dict], reference: dict, ring: int, uly: int, family: str) -> None:
    ref, ref_calls = reference[family]
    for rank, res in enumerate(results):
        out, calls = res[(ring, uly, family, "regional")]
        assert calls == ref_calls > 0  # every call that is sparse in one process is sparse on every rank
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-4, msg=f"rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("ring,uly", [(4, 1), (2, 2)])
def test_regional_ring_four_ranks_equal_one_process(four_ranks, regional_reference, ring, uly, family):
    _check_regional(four_ranks, regional_reference, ring, uly, family)


@pytest.fixture(scope="module")
def reference():
    """One process, the same models and variants: outputs and attnplug attention calls per case."""
    return {case: _generate(*MODELS[case[0]](), _variants()[case[1]]()) for case in CASES}


def _check(results: list[dict], reference: dict, ring: int, uly: int, family: str, name: str) -> None:
    ref, ref_calls = reference[(family, name)]
    for rank, res in enumerate(results):
        outs, calls, kernel_calls, skipped = res[(ring, uly, family, name)]
        assert calls == ref_calls > 0  # the sparse path ran on every rank, once per attnplug call
        for step, (a, b) in enumerate(zip(outs, ref)):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4, msg=f"rank {rank} step {STEPS[step]}")
        if name == "lite":  # one call over all gathered keys (exact tile statistics)
            assert kernel_calls == calls
        else:  # one kernel call per (pass, ring chunk), less the chunks whose sub-layout is empty
            passes = 2 if name == "ultravico" else 1
            assert kernel_calls + skipped == calls * passes * ring


@pytest.mark.slow  # the two-process fixture: ~80 s on 2 loaded cores (spawn and imports dominate)
@pytest.mark.parametrize("family,name", CASES)
def test_ring_two_ranks_equal_one_process(two_ranks, reference, family, name):
    _check(two_ranks, reference, 2, 1, family, name)


@pytest.mark.slow
@pytest.mark.parametrize("family,name", CASES)
@pytest.mark.parametrize("ring,uly", [(4, 1), (2, 2)])
def test_ring_four_ranks_equal_one_process(four_ranks, reference, ring, uly, family, name):
    _check(four_ranks, reference, ring, uly, family, name)


@pytest.mark.slow
def test_ring_gradients_refused(two_ranks):
    for res in two_ranks:
        assert "inference only" in res["grad"] and "ulysses_degree" in res["grad"]


@pytest.mark.slow
def test_empty_ring_steps_are_skipped(four_ranks):
    """GNA with a 3-frame window on 4 frames, one frame per rank: the first and last ranks' queries see no key of
    the farthest rank's chunk, so those chunks make no kernel call (and the outputs above still match)."""
    skipped = [res[(4, 1, "wan", "gna")][3] for res in four_ranks]
    assert skipped[0] > 0 and skipped[3] > 0, skipped
    assert all(res[(4, 1, "wan", "radial")][3] == 0 for res in four_ranks)  # radial's band: every chunk visible


@pytest.mark.parametrize(
    "family,name", [("wan", "radial"), ("wan", "gna"), ("wan", "ultravico"), ("flux", "radial"), ("flux", "gna")]
)
def test_ring_chunks_equal_the_one_process_call(family, name):
    """The ring's compute without processes (the default suite): each rank of a simulated ring of 4 runs its
    queries against the 4 ranks' key chunks (the plan's layout and LogitDecay cut per rank and chunk, the
    variant's permutation and FLUX's per-rank [text, image] shards mapped) and merges them by LSE: its rows of
    the one-process kernel call. GNA's 3-frame window leaves chunks empty: skipped, same result."""
    from diffusion_attn.runtime import AttnRuntime
    from diffusion_attn.runtime.ring import build_ring_plan, ring_chunks

    ring = 4
    rt = AttnRuntime(family=family, variants=(_variants()[name](),), num_layers=1)
    rt.grid, text = ((4, 4, 8), 0) if family == "wan" else ((1, 6, 8), 8)
    layout = rt.layout(text, family == "flux")
    n, heads = layout.seq_len, 2
    plan = rt.plan(0, layout, 1, heads, 16, torch.device("cpu"), torch.float32)
    assert not plan.is_dense
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, 16, generator=g) for _ in range(3))
    full = rt._kernel(plan, q, k, v, None, None)
    perm, inv = plan.perm, plan.inv if plan.perm is None or plan.inv is not None else torch.argsort(plan.perm)
    c2g = rt.parallel.c2g(layout, ring, q.device)
    combined, combined_inv = rt.parallel.composed(((layout, ring, "cpu"), c2g), perm, inv)
    g2c = torch.arange(n) if c2g is None else torch.argsort(c2g)  # gathered position -> canonical token
    m = n // ring
    shard = [g2c[j * m : (j + 1) * m] for j in range(ring)]  # each rank's local tokens, canonical indices
    for r in range(ring):
        rp = build_ring_plan(plan, n, combined_inv, ring, r, q.device)
        out = ring_chunks(rt, plan, q[:, shard[r]], [k[:, s] for s in shard], [v[:, s] for s in shard], rp, combined)
        torch.testing.assert_close(out, full[:, shard[r]], atol=2e-6, rtol=1e-5, msg=f"rank {r}")
    if family == "wan" and name == "gna":
        assert rt.ring_skipped > 0

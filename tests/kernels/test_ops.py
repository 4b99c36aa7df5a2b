"""The `attention` entry point: backend selection, errors, custom op and torch.compile."""

from __future__ import annotations

import os

import pytest
import torch

from attn_kernels import BlockLayout, OutputMix, attention


def _qkv(nq=32, nk=32, d=16):
    return torch.randn(1, 2, nq, d), torch.randn(1, 2, nk, d), torch.randn(1, 2, nk, d)


def test_registered_as_custom_op():
    assert hasattr(torch.ops.attnplug, "block_sparse_attention")


def test_compile_fullgraph_traces_through():
    q, k, v = _qkv()
    lay = BlockLayout.from_token_mask(torch.rand(32, 32) < 0.5, 16, 16)
    fn = torch.compile(
        lambda a, b, c: attention(a, b, c, lay, backend="reference") * 2, fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(fn(q, k, v), 2 * attention(q, k, v, lay))


def test_compile_backward():
    q, k, v = (t.requires_grad_() for t in _qkv())
    fn = torch.compile(lambda a, b, c: attention(a, b, c).sum(), fullgraph=True, backend="aot_eager")
    fn(q, k, v).backward()
    ref = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v).sum().backward()
    for a, t in zip(ref, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="backend='triton'.*cannot run.*cpu"):
        attention(q, k, v, backend="triton")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_unsupported_head_dim_is_a_clear_error():
    q, k, v = _qkv(d=264)
    with pytest.raises(RuntimeError, match=r"head dim 264/264 is above the supported maximum 256"):
        attention(q, k, v, backend="triton")
    assert attention(q, k, v, backend="reference").shape == (1, 2, 32, 264)  # the reference takes any


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
@pytest.mark.parametrize("d, dv", [(24, 24), (80, 80), (72, 40), (96, 160)])
def test_padded_head_dims_run_on_triton(d, dv):
    """Head dims that are not powers of two run in the kernel padded to the next one (masked loads):
    forward and all gradients equal the reference."""
    g = torch.Generator().manual_seed(d)
    q, k = (torch.randn(1, 2, 40, d, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 40, dv, generator=g)
    lay = BlockLayout.from_token_mask(torch.rand(40, 40, generator=g) < 0.6, 16, 16)
    outs, grads = [], []
    go = torch.randn(1, 2, 40, dv, generator=g)
    for backend in ("triton", "reference"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o = attention(qq, kk, vv, lay, backend=backend)
        outs.append(o)
        grads.append(torch.autograd.grad((o * go).sum(), (qq, kk, vv)))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda q, k, v: attention(q[0], k, v), ValueError, "q must be a 4-D tensor"),
        (lambda q, k, v: attention(q, k.half(), v), TypeError, "must share a dtype"),
        (lambda q, k, v: attention(q, k[:, :1], v), ValueError, "no GQA"),
        (lambda q, k, v: attention(q, k, v, backend="cuda"), ValueError, "backend must be one of"),
        (lambda q, k, v: attention(q, k, v, scale=-1.0), ValueError, "scale must be a positive float"),
        (lambda q, k, v: attention(q, k, v, BlockLayout.dense(16, 32, 16, 16)), ValueError, "layout is for q_len=16"),
        (lambda q, k, v: attention(q, k[:, :, :20], v[:, :, :20], modifiers=(OutputMix(0.5),)), ValueError, "Nq == Nk"),
        (
            lambda q, k, v: attention(q, k, v, modifiers=(OutputMix(1.5),)),
            ValueError,
            r"OutputMix.u values must be in \[0",
        ),
        (lambda q, k, v: attention(q, k, v, modifiers=("x",)), TypeError, "unknown modifier"),
    ],
)
def test_errors_name_the_parameter(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_qkv())


def test_cross_attention_lengths_differ():
    q, k, v = _qkv(nq=20, nk=51)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_kernel_bench_smoke_writes_json_and_plot(tmp_path):
    """The benchmark's code paths run on CPU (tiny shapes, reference backend, eager Flex) and write JSON + PNG
    to --out only, never into the source tree; real numbers need a GPU (benchmarks/run_gpu.sh)."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    import kernel_bench

    results = root / "benchmarks" / "results"
    before = sorted(results.iterdir())
    with pytest.raises(SystemExit, match="not results"):
        kernel_bench.main(["--smoke", "--out", str(results)])
    default = kernel_bench._default_out(smoke=True)  # a fresh temp dir
    default.rmdir()
    assert root not in default.resolve().parents
    report = kernel_bench.main(["--smoke", "--out", str(tmp_path)])
    assert sorted(results.iterdir()) == before
    data = json.loads((tmp_path / "kernel_bench_smoke.json").read_text())
    assert (tmp_path / "kernel_bench_smoke.png").stat().st_size > 1000
    assert data["smoke"] and data["complete"] and data["versions"]["torch"] == torch.__version__
    assert report["versions"]["torch"] == torch.__version__
    measured = {(r["case"], r["impl"]) for r in data["results"]}
    cases = ["wan_dense", "wan_sparse_0.5", "wan_sparse_0.25", "wan_sparse_0.1", "gna_hunyuan", "wan_modifiers"]
    for case, impl in [(c, "ours") for c in cases[:4]] + [("gna_hunyuan", "ours_with_perm"), ("wan_bwd_dense", "ours")]:
        assert (case, impl) in measured, (case, impl, data["skipped"])
    assert {f"ours_{m}" for m in ("plain", "logitdecay", "outputmix")} <= {i for c, i in measured if c == cases[5]}
    for case in cases[:4]:  # Flex on the same block mask, or a recorded reason
        assert (case, "flex") in measured or any(s["case"] == case and s["impl"] == "flex" for s in data["skipped"])
    for r in data["results"]:
        assert r["ms"] > 0 and r["tflops"] > 0 and 0 < r["density"] <= 1
    checks = data["correctness"]
    assert checks and data["all_checks_pass"], checks  # fp32 on CPU: every record checked and within tolerance
    assert len(checks) == len(data["results"]) and all(r["check_ok"] for r in data["results"])
    fwd = [c for c in checks if "out_rel_err" in c]
    assert fwd and all(c["out_rel_err"] < 1e-4 for c in fwd)
    assert all(c["dk_rel_err"] < 1e-4 for c in checks if "dk_rel_err" in c)
    assert {t["target"] for t in data["targets"]} == set(kernel_bench.TARGETS)
    assert all(s["reason"] for s in data["skipped"])
    assert any(s["impl"] == "sdpa_cudnn" for s in data["skipped"])  # CPU: refused, with torch's reason
    # the script's own code and the peers must not error; our kernel's failures are reported, not raised
    assert not [e for e in data["errors"] if not e["impl"].startswith("ours")], data["errors"]

"""The kernel-backend registry (`attn_kernels.backends`): every reason at once, one chooser and its
error, its cache (the per-call path never re-runs the checks), the deprecated "eager" alias, no
kernels -> static_check import, and `attnplug list` reading the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from attn_kernels import BlockLayout, attention, backends
from attn_kernels.agent_attn import agent_attention, agent_attention_reference
from attn_kernels.backends import Inputs, NoBackendError, backends_for, choose_backend, register_backend
from attn_kernels.channel_attn import coord_fused, eca_fused, eca_reference

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


def _reasons(op, name, **kw):
    return backends_for(op)[name].not_supported_reasons(Inputs(**kw))


# ---------------------------------------------------------------------- every reason, not the first
@pytest.mark.parametrize(
    "op, dims, features, expected",
    [
        ("attention", (264, 264), (), ["tensors are on cpu", "float64",
                                       "head dim 264/264 is above the supported maximum 256"]),
        ("agent_attention", (24, 200), (), ["tensors are on cpu", "float64", "head dim in (16, 32, 64, 128), got 24",
                                            "agents 200 is above the supported maximum 128"]),
        ("eca", (), (), ["tensors are on cpu", "float64"]),
        ("coord", (5000,), ("skip",), ["tensors are on cpu", "float64", "planes up to 4096 wide, got W=5000",
                                       "does not support skip"]),
    ],
)  # fmt: skip
def test_triton_backends_report_every_reason_at_once(op, dims, features, expected):
    why = _reasons(op, "triton", device="cpu", dtype=F64, dims=dims, features=frozenset(features), interpret=False)
    assert len(why) == len(expected), why
    for reason, text in zip(why, expected):
        assert text in reason, (reason, text)
    # each constraint alone is one reason: the reasons are independent, not the first that failed
    fine = _reasons(op, "triton", device="cuda", dtype=torch.float16, dims=dims, features=frozenset(features))
    assert len(fine) == len(expected) - 2
    assert not any("tensors are on" in r for r in _reasons(op, "triton", device="cpu", dtype=F64, interpret=True))


@pytest.mark.parametrize("op", ["attention", "agent_attention", "eca", "coord"])
def test_reference_backends_take_any_device_and_float_dtype_but_not_integers(op):
    dims = {"attention": (264, 7), "agent_attention": (24, 500), "eca": (), "coord": (5000,)}[op]
    feats = frozenset(backends.OPS[op].features)
    assert _reasons(op, "reference", device="meta", dtype=F64, dims=dims, features=feats) == []
    assert _reasons(op, "reference", device="cpu", dtype=torch.int32, dims=dims) == [
        "dtype torch.int32 is not a floating dtype"
    ]


# ---------------------------------------------------------------------- the chooser and its error
def test_explicit_backend_that_cannot_run_lists_every_backend_with_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 32, 264, dtype=F64)
    with pytest.raises(NoBackendError) as e:
        attention(q, q, q, backend="triton")
    msg = str(e.value)
    assert msg.startswith("attention(backend='triton') cannot run on cpu (float64; head dim q/k 264; head dim v 264)")
    triton = next(ln for ln in msg.splitlines() if ln.strip().startswith("triton (requested):"))
    for text in ("tensors are on cpu", "float64 is not one of", "head dim 264/264 is above the supported maximum 256"):
        assert text in triton, msg
    assert "reference: fits: pass backend='reference'" in msg
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, ValueError)  # both, as before


def test_vision_kernels_raise_the_same_listing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 8, 24, dtype=F64)
    agents = torch.randn(1, 1, 200, 24, dtype=F64)
    with pytest.raises(NoBackendError) as e:
        agent_attention(q, q, q, agents, torch.zeros(1, 200, 8), torch.zeros(1, 8, 200), 0.2, backend="triton")
    line = next(ln for ln in str(e.value).splitlines() if "triton (requested)" in ln)
    assert line.count(";") == 3 and "agents 200" in line and "head dim in" in line and "float64" in line
    m = torch.nn.Module()
    m.has_skip = True
    with pytest.raises(
        NoBackendError, match=r"(?s)coord\(backend='triton'\).*tensors are on cpu.*does not support skip"
    ):
        coord_fused(torch.randn(1, 8, 2, 3), m, backend="triton")


def test_auto_on_cuda_refuses_the_attention_reference_and_says_why():
    """The attention reference materialises the scores: "auto" never picks it on a GPU, and says
    so next to the Triton kernel's own reasons (decided on the facts; no GPU needed)."""
    with pytest.raises(NoBackendError) as e:
        choose_backend("attention", "auto", "cuda", F64, (264, 264))
    msg = str(e.value)
    assert "float64 is not one of" in msg and "head dim 264/264" in msg
    assert "reference: 'auto' picks it only on cpu" in msg and "pass backend='reference'" in msg
    assert choose_backend("attention", "reference", "cuda", F64, (264, 264)).name == "reference"
    # the vision references are linear in the tokens: "auto" falls back to them on a GPU
    assert choose_backend("agent_attention", "auto", "cuda", F64, (24, 8)).name == "reference"
    assert choose_backend("agent_attention", "auto", "cuda", torch.float16, (64, 49)).name == "triton"


@pytest.mark.parametrize("op, dims", [("attention", (64, 64)), ("agent_attention", (64, 49)), ("eca", ()),
                                      ("coord", (56,))])  # fmt: skip
def test_auto_picks_triton_on_cuda_and_the_reference_on_cpu_interpreter_or_not(op, dims, monkeypatch):
    """ "auto" on CPU is the reference with or without TRITON_INTERPRET=1 (the interpreter is a test tool,
    ~1000x slower); the interpreter only lets an explicit "triton" take CPU tensors."""
    assert choose_backend(op, "auto", "cuda", torch.bfloat16, dims).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_backend(op, "auto", "cpu", torch.float32, dims).name == "reference"
    with pytest.raises(NoBackendError, match="TRITON_INTERPRET=1 for the CPU interpreter"):
        choose_backend(op, "triton", "cpu", torch.float32, dims)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend(op, "auto", "cpu", torch.float32, dims).name == "reference"
    assert choose_backend(op, "triton", "cpu", torch.float32, dims).name == "triton"


def test_attention_auto_on_cpu_runs_the_reference_op(monkeypatch):
    """What the chooser says is what runs: "auto" on CPU goes through the reference, never a launch."""
    from attn_kernels import triton_attention

    monkeypatch.setattr(triton_attention, "_LAUNCH_HOOK", lambda *a: pytest.fail("Triton launched"))
    q = torch.randn(1, 2, 32, 16)
    torch.testing.assert_close(attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))


# ---------------------------------------------------------------------- decisions are cached
def test_the_chooser_runs_once_per_device_dtype_head_dims_and_features(monkeypatch):
    calls = []
    decide = backends._decide
    monkeypatch.setattr(backends, "_decide", lambda *key: calls.append(key) or decide(*key))
    monkeypatch.setattr(backends, "_DECISIONS", {})
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    lay = BlockLayout.from_token_mask(torch.rand(32, 32) < 0.5, 16, 16)
    for _ in range(5):
        attention(q, k, v, lay)
    assert len(calls) == 1
    attention(q.double(), k.double(), v.double(), lay)  # another dtype
    attention(q, k, v)  # no layout: another feature set
    attention(q, k, v, lay, return_lse=True)  # the LSE: another feature set
    attention(*(t.requires_grad_() for t in (q, k, v)), lay)  # a backward: another feature set
    assert len(calls) == 5
    # the flags ops.attention builds are the op's declared features, bit for bit
    ff = lambda *names: backends.feature_flags("attention", "layout", "element_mask", *names)  # noqa: E731
    assert [c[5] for c in calls] == [ff(), ff(), 0, ff("lse"), ff("backward")] and calls[1][3] == F64
    for _ in range(3):  # every one of them is now a cache hit
        attention(q, k, v, lay)
        attention(q.detach(), k.detach(), v.detach())
    assert len(calls) == 5
    x, w = torch.randn(2, 8, 4, 4), torch.randn(1, 1, 3)
    for _ in range(3):
        eca_fused(x, w)
    assert len(calls) == 6 and calls[-1][:2] == ("eca", "auto")


def test_registering_a_backend_invalidates_the_cached_decisions(monkeypatch):
    monkeypatch.setattr(backends, "OPS", dict(backends.OPS))
    monkeypatch.setattr(backends, "KERNEL_BACKENDS", {k: dict(v) for k, v in backends.KERNEL_BACKENDS.items()})
    monkeypatch.setattr(backends, "_DECISIONS", {})
    backends.define_op("toy", dims=("head dim",), features=("backward",))
    register_backend("toy", "reference", priority=10)(lambda: "ref")
    assert choose_backend("toy", "auto", "cuda", torch.float16, (8,)).name == "reference"
    register_backend("toy", "triton", devices=("cuda",), sizes=(backends.SizeRule("head dim", 0, max=64),))(
        lambda: "tri"
    )  # priority 0: tried first by "auto"
    assert choose_backend("toy", "auto", "cuda", torch.float16, (8,)).fn() == "tri"
    assert choose_backend("toy", "auto", "cuda", torch.float16, (80,)).fn() == "ref"  # the first that fits
    with pytest.raises(ValueError, match="other than 'auto'"):
        register_backend("toy", "auto")
    with pytest.raises(ValueError, match="op 'nope' is not defined"):
        register_backend("nope", "triton")
    with pytest.raises(ValueError, match=r"toy has no features \['lse'\]"):
        register_backend("toy", "triton", features=("lse",))
    with pytest.raises(NoBackendError, match="no backend is registered"):
        choose_backend("nope", "auto", "cpu", torch.float32)


# ---------------------------------------------------------------------- one vocabulary
def test_eager_is_a_deprecated_alias_of_reference():
    x, w = torch.randn(2, 8, 4, 4), torch.randn(1, 1, 3)
    with pytest.warns(DeprecationWarning, match="'eager' is deprecated, use 'reference'"):
        out = eca_fused(x, w, backend="eager")
    torch.testing.assert_close(out, eca_reference(x, w))
    q, a = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 4, 16)
    b1, b2 = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 8, 4)
    with pytest.warns(DeprecationWarning, match="agent_attention: backend 'eager'"):
        out = agent_attention(q, q, q, a, b1, b2, 0.25, backend="eager")
    torch.testing.assert_close(out, agent_attention_reference(q, q, q, a, b1, b2, 0.25))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'reference'\)"):
        eca_fused(x, w, backend="cuda")


def test_a_module_backend_set_to_eager_warns_and_runs_the_formula():
    from vision_attn.variants.eca import make_eca

    m = make_eca(8, mode="original")
    torch.nn.init.normal_(m.conv.weight)
    x = torch.randn(2, 8, 4, 4)
    ref = m(x)
    m.backend = "eager"
    with pytest.warns(DeprecationWarning, match="eca module's backend"):
        torch.testing.assert_close(m(x), ref)


def test_vision_gates_and_kernels_share_the_vocabulary():
    from attn_kernels import BACKENDS
    from vision_attn.variants import _gates

    assert _gates.BACKENDS == BACKENDS == backends.BACKEND_NAMES == ("auto", "triton", "reference")
    assert set(backends.all_backends()) >= {"attention", "agent_attention", "eca", "coord"}
    for table in backends.all_backends().values():
        assert set(table) == {"triton", "reference"}


# ---------------------------------------------------------------------- structure
def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            out |= {mod} | {f"{mod}.{a.name}" if node.module else f"{mod}{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_kernel_module_imports_static_check_which_imports_them_at_top_level():
    for path in sorted((ROOT / "attn_kernels").glob("*.py")):
        if path.name != "static_check.py":
            bad = {m for m in _imports(path) if "static_check" in m}
            assert not bad, f"{path.name} imports {bad}"
    top = _imports(ROOT / "attn_kernels" / "static_check.py", top_level_only=True)
    assert {".agent_attn", ".channel_attn", ".triton_attention"} <= top


def test_attnplug_list_shows_every_registered_backend_with_its_declarations(capsys, monkeypatch):
    from attn_pipelines.cli import main
    from attn_pipelines.commands import listing

    monkeypatch.setattr(listing, "preset_names", lambda: [])  # presets are tests/pipelines' business
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("Kernel backends") : out.index("Presets")].splitlines()
    for op, table in backends.all_backends().items():
        at = next(i for i, ln in enumerate(section) if ln.startswith(f"  {op}: "))
        rows = section[at + 1 : at + 1 + len(table)]
        for (name, b), row in zip(table.items(), rows):
            assert row.startswith(f"    {name} ")
            for fact in (b.describe_devices(), b.describe_dtypes(), b.describe_sizes()):
                assert fact in row, (fact, row)
    text = "\n".join(section)
    assert "devices: cuda (cpu with TRITON_INTERPRET=1); auto on cuda; dtypes: float16, bfloat16, float32" in text
    assert "1 <= head dim <= 256" in text and "head dim in {16, 32, 64, 128}, 1 <= agents <= 128" in text
    assert "1 <= plane width <= 4096; features: all but skip" in text

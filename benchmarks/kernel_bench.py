"""Kernel benchmark: attnplug's block-sparse attention against its peers, in one run.

Peers on identical tensors and masks: torch SDPA per backend (cuDNN, flash, efficient; each via
`sdpa_kernel`), FlexAttention (`torch.compile(flex_attention)`, Triton backend, the same block
mask via `BlockMask.from_kv_blocks`), xformers (if importable) and ours (`attn_kernels.attention`).
Cases, bf16: Wan2.1 480p x 81f (B1 H12 N32760 D128) dense and at block densities 0.5 / 0.25 / 0.1
(random 128-token block masks, diagonal kept, the same number of blocks in every row); HunyuanVideo
GNA (30x48x80 grid, 24 heads, D128, kernel 18x24x24, stride 16x8x8, built by
`diffusion_attn.variants.Neighborhood`, token permutation included) against cuDNN dense; the
modifier overhead (LogitDecay, OutputMix); fwd+bwd against FlexAttention. Times are medians of
CUDA-event-timed repeats after warm-up; TFLOP/s count visited blocks only (4*B*H*D*pairs forward,
3.5x that for fwd+bwd). Each case carries a max-abs-error spot check (vs an fp32 masked SDPA on a
slice of query rows, and vs SDPA / Flex on the whole output). Targets are checked on numbers of
this one run. Writes <out>/kernel_bench.{json,png}; a section that fails is recorded and skipped.

    python benchmarks/kernel_bench.py                      # CUDA -> benchmarks/results/
    python benchmarks/kernel_bench.py --smoke [--out DIR]  # tiny CPU run (a temp dir by default)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: name -> (comparison, threshold, what the value is)
TARGETS: dict[str, tuple[str, float, str]] = {
    "dense_vs_best_sdpa": (">=", 0.9, "best SDPA backend time / our dense time"),
    "sparse_scaling": ("<=", 1.15, "our sparse time / (d * our dense time), d = visited pairs / N^2"),
    "vs_flex_same_mask": (">=", 1.2, "FlexAttention time / our time on the same block mask"),
    "modifier_overhead": ("<=", 1.05, "our time with the modifier / our plain time (interleaved timing)"),
    "gna_vs_cudnn_dense": (">=", 9.7, "cuDNN SDPA dense time / our GNA time incl. token permutation"),
    "backward_vs_flex": (">=", 0.8, "FlexAttention fwd+bwd time / our fwd+bwd time, same mask"),
}
SECTIONS = ("dense", "sparse", "modifiers", "flex", "gna", "backward", "gna_flex")


@dataclass
class Plan:
    """Shapes, dtype and timing for one run (full GPU run or the CPU smoke)."""

    B: int = 1
    H: int = 12
    N: int = 32760
    D: int = 128
    block: int = 128
    densities: tuple[float, ...] = (0.5, 0.25, 0.1)
    bwd_densities: tuple[float, ...] = (1.0, 0.25)
    gna_grid: tuple[int, int, int] = (30, 48, 80)
    gna_heads: int = 24
    gna_kernel: tuple[int, int, int] = (18, 24, 24)
    gna_stride: tuple[int, int, int] = (16, 8, 8)
    ref_rows: int = 128  # query rows at each end checked against float64 (attn_kernels.verify)
    dtype: str = "bfloat16"
    device: str = "cuda"
    backend: str = "triton"  # ours
    compile_flex: bool = True
    warmup_ms: float = 100.0
    rep_ms: float = 400.0
    min_reps: int = 5
    max_reps: int = 100


SMOKE = Plan(
    H=2,
    N=250,
    D=32,
    block=32,
    gna_grid=(4, 8, 8),
    gna_heads=2,
    gna_kernel=(2, 4, 4),
    gna_stride=(2, 2, 2),
    ref_rows=16,
    dtype="float32",
    device="cpu",
    backend="reference",
    compile_flex=False,
    min_reps=1,
    max_reps=1,
)


class Refused(RuntimeError):
    """A peer declined the shape / dtype / device (recorded as a skip with its reason, not an error)."""


class _Abort(Exception):
    """SIGTERM (e.g. `timeout`): stop measuring, write what there is."""


def _on_term(signum, frame):  # pragma: no cover - signal path
    raise _Abort(f"signal {signum}")


# ----------------------------------------------------------------------------------- timing
def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _timed_once(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _samples(fn: Callable[[], Any], n: int, cuda: bool) -> list[float]:
    """n timed calls: one CUDA event pair per call, read after one final sync."""
    if not cuda:
        return [_timed_once(fn, False) for _ in range(n)]
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in ev]


def measure(fns: dict[str, Callable[[], Any]], plan: Plan, rounds: int = 1) -> dict[str, dict]:
    """Median ms of each fn after warm-up; with rounds > 1 the fns' repeats are interleaved
    round by round, so that slow drift (clocks, heat) hits all of them alike."""
    cuda = plan.device == "cuda"
    est: dict[str, float] = {}
    for name, fn in fns.items():
        fn()  # first call: compilation, autotuning, cached host work
        _sync(cuda)
        est[name] = max(_timed_once(fn, cuda), 1e-3)
        for _ in range(min(200, max(1, math.ceil(plan.warmup_ms / est[name]))) if cuda else 0):
            fn()
    _sync(cuda)
    reps = {n: min(plan.max_reps, max(plan.min_reps, math.ceil(plan.rep_ms / e))) for n, e in est.items()}
    got: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            got[name] += _samples(fn, max(1, reps[name] // rounds), cuda)
    return {n: {"ms": statistics.median(t), "ms_min": min(t), "ms_max": max(t), "reps": len(t)} for n, t in got.items()}


# ----------------------------------------------------------------------------------- masks
def random_block_mask(H: int, nb: int, density: float, device: str, seed: int = 0) -> torch.Tensor:
    """bool [1, H, nb, nb]: the diagonal plus random blocks, round(density * nb) per row (>= 1)."""
    g = torch.Generator().manual_seed(seed)
    per_row = max(1, min(nb, round(density * nb)))
    score = torch.rand(H, nb, nb, generator=g)
    score.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # the diagonal always wins
    idx = score.topk(per_row, dim=-1).indices
    bm = torch.zeros(H, nb, nb, dtype=torch.bool).scatter_(-1, idx, True)
    return bm[None].to(device)


def visited_pairs(bm: torch.Tensor, n: int, block: int, B: int, H: int) -> float:
    """Token pairs inside visited blocks (tails clipped), summed over batch and heads."""
    nb = bm.shape[-1]
    lens = (n - torch.arange(nb, device=bm.device) * block).clamp(max=block).double()
    per = (bm.double() * lens[:, None] * lens[None, :]).sum(dim=(-1, -2))  # [Bl, Hl]
    return float(per.sum()) * (B // bm.shape[0]) * (H // bm.shape[1])


def flex_block_mask(bm: torch.Tensor, partial: torch.Tensor | None, n: int, block: int, mask_mod=None):
    """FlexAttention BlockMask of our layout: visited blocks without an element mask go in the
    full lists (no mask_mod work), partial ones (GNA's borders) in the masked lists."""
    from torch.nn.attention.flex_attention import BlockMask

    full = bm if partial is None else bm & (partial < 0)
    part = bm & ~full

    def lists(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return m.sum(-1, dtype=torch.int32), idx

    (pc, pi), (fc, fi) = lists(part), lists(full)
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n))


# ----------------------------------------------------------------------------------- the run
class Bench:
    """Collects records, skips and errors; writes the JSON after every section."""

    def __init__(self, plan: Plan, out: Path, budget_s: float, smoke: bool) -> None:
        self.plan, self.out, self.smoke = plan, out, smoke
        self.t0, self.budget_s = time.monotonic(), budget_s
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self.errors: list[dict] = []
        self.shapes: dict[str, dict] = {}
        self.cuda = plan.device == "cuda"
        self.dtype = getattr(torch, plan.dtype)
        self.extra: dict[str, Any] = {}
        self.save_cb: Callable[[], Any] | None = None
        self.cut_short = False

    def save(self) -> None:
        """Write the JSON so far (set up by main)."""
        if self.save_cb is not None:
            self.save_cb()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def due(self, case: str, impl: str = "all") -> bool:
        """True while time is left; else records the skip (and that the run was cut short)."""
        if self.left() > 0:
            return True
        self.cut_short = True
        self.skip(case, impl, "time budget (--budget-s) spent")
        return False

    def skip(self, case: str, impl: str, reason: str) -> None:
        self.skipped.append({"case": case, "impl": impl, "reason": reason})
        print(f"  skip {case}/{impl}: {reason}", flush=True)

    def fail(self, case: str, impl: str, exc: BaseException) -> None:
        """An exception: recorded as an error, or as a plain skip when the peer says it cannot run."""
        text = str(exc).strip()
        msg = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        if isinstance(exc, (NotImplementedError, Refused)):
            self.skip(case, impl, f"not supported here: {msg}")
            return
        self.errors.append({"case": case, "impl": impl, "error": msg})
        self.skip(case, impl, f"error: {msg}")
        if self.cuda and isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()

    def record(
        self,
        case: str,
        impl: str,
        t: dict,
        *,
        pairs: float,
        d: int,
        n: int,
        h: int,
        fwd_bwd: bool = False,
        check: dict | None = None,
        **extra: Any,
    ) -> dict:
        flops = 4.0 * pairs * d * (3.5 if fwd_bwd else 1.0)
        rec = {
            "case": case,
            "impl": impl,
            "pass": "fwd+bwd" if fwd_bwd else "fwd",
            "B": self.plan.B,
            "H": h,
            "N": n,
            "D": d,
            "density": pairs / (self.plan.B * h * n * n),
            **t,
            "tflops": flops / (t["ms"] * 1e-3) / 1e12,
            **extra,
            "check": check,
            "check_ok": bool(check is not None and check.get("ok")),
        }
        self.records.append(rec)
        verdict = "check ok" if rec["check_ok"] else "CHECK FAILED" if check is not None else "unchecked"
        print(f"  {case:>16} {impl:<22} {t['ms']:9.3f} ms {rec['tflops']:8.1f} TFLOP/s  {verdict}", flush=True)
        return rec

    def find(self, case: str, impl: str) -> dict | None:
        return next((r for r in self.records if r["case"] == case and r["impl"] == impl), None)

    def ms(self, case: str, impl: str) -> float | None:
        """The time of a record whose correctness check passed (None otherwise: no figure is
        reported from a wrong output)."""
        r = self.find(case, impl)
        return None if r is None or not r["check_ok"] else r["ms"]

    def why_missing(self, *pairs: tuple[str, str]) -> str:
        """Why a target has no value: which record is missing or failed its check."""
        why = []
        for case, impl in pairs:
            r = self.find(case, impl)
            if r is None:
                why.append(f"{case}/{impl} not measured (skipped, failed or out of budget)")
            elif not r["check_ok"]:
                why.append(f"{case}/{impl} failed its correctness check: {r['check']}")
        return "; ".join(why)


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    out = {
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    return out


def _sdpa_fn(backend, q, k, v) -> Callable[[], torch.Tensor]:
    """SDPA pinned to one backend; a refusal raises with torch's reasons (its warnings) attached."""
    from torch.nn.attention import sdpa_kernel

    def call() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except RuntimeError as e:
            why = "; ".join(str(w.message).strip().splitlines()[0] for w in caught)
            raise Refused(f"backend refused: {str(e).splitlines()[0]} {why}".strip()) from None
    return call


def _make_flex(bench: Bench):
    """flex_attention, compiled (static shapes) with the Triton backend on CUDA, eager on the smoke."""
    from torch.nn.attention.flex_attention import flex_attention

    if not bench.plan.compile_flex:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention, {}
    return torch.compile(flex_attention, dynamic=False), {"BACKEND": "TRITON"}


def _flex_call(bench: Bench, q, k, v, bmask) -> Callable[[], torch.Tensor]:
    flex, opts = bench.extra["flex"]

    def call() -> torch.Tensor:
        return flex(q, k, v, block_mask=bmask, kernel_options=opts or None)

    try:
        call()
    except Exception as e:  # older torch without the BACKEND option: its default (Triton) kernel
        if not opts or "BACKEND" not in str(e):
            raise
        bench.extra["flex"] = (flex, {})
        bench.extra["flex_note"] = "kernel_options BACKEND unsupported here; default backend used"
        return _flex_call(bench, q, k, v, bmask)
    return call


def _block_lookup(bm: torch.Tensor, block: int):
    """mask_mod equal to a block mask (eager Flex applies only the mask_mod, not the block lists)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return bm[b * 0, h if bm.shape[1] > 1 else h * 0, q_idx // block, kv_idx // block]

    return mask_mod


def run_wan(bench: Bench, sections: set[str]) -> None:
    """Wan shape: dense peers, sparse densities, modifiers, Flex on the same masks, fwd+bwd.

    Every record carries its correctness check (`attn_kernels.verify`): the first and last
    `ref_rows` query rows, each with a planted peak key in the first / last block it visits,
    against float64 (ours: output and LSE; peers: output); fwd+bwd records check gradients."""
    from attn_kernels import BlockLayout, LogitDecay, OutputMix, attention
    from attn_kernels.verify import check_grads, check_rows, plant_peaks, reference_rows, rows_to_check

    if not {"dense", "sparse", "modifiers", "flex", "backward"} & sections:
        return
    p, dev = bench.plan, bench.plan.device
    B, H, N, D, blk = p.B, p.H, p.N, p.D, p.block
    nb = -(-N // blk)
    bench.shapes["wan"] = {"B": B, "H": H, "N": N, "D": D, "block": blk, "dtype": p.dtype, "num_blocks": nb}
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g, device=dev, dtype=bench.dtype) for _ in range(3))
    rows = rows_to_check(N, p.ref_rows, dev)
    # every layout below keeps the diagonal: block 0 is the first rows' first block, the ragged tail
    # block the last rows' last one, so peaks planted for the dense layout serve every case
    k = plant_peaks(q, k, None, rows)
    dense_pairs = float(B * H * N * N)
    ours = lambda lay=None, mods=(): attention(q, k, v, lay, modifiers=mods, backend=p.backend)  # noqa: E731
    masks = {d: random_block_mask(H, nb, d, dev, seed=int(d * 1000)) for d in p.densities}
    layouts = {d: BlockLayout.from_block_mask(m, N, N, blk, blk) for d, m in masks.items()}
    bench.shapes["wan"]["block_density"] = {str(d): lay.block_density for d, lay in layouts.items()}
    refs: dict[Any, tuple] = {}

    def ref(key: Any, lay, mods: tuple = ()) -> tuple:
        if key not in refs:
            refs[key] = reference_rows(q, k, v, lay, rows, modifiers=mods)
        return refs[key]

    def check_ours(key: Any, lay, mods: tuple = ()) -> dict:
        out, lse = attention(q, k, v, lay, modifiers=mods, return_lse=True, backend=p.backend)
        return check_rows(out[:, :, rows], lse[:, :, rows], *ref(key, lay, mods), bench.dtype).as_dict()

    def check_peer(key: Any, lay, out: torch.Tensor) -> dict:
        return check_rows(out[:, :, rows], None, *ref(key, lay), bench.dtype).as_dict()

    if "dense" in sections:
        print("wan dense", flush=True)
        try:
            t = measure({"ours": ours}, p)["ours"]
            bench.record("wan_dense", "ours", t, pairs=dense_pairs, d=D, n=N, h=H, check=check_ours("dense", None))
        except _Abort:
            raise
        except Exception as e:
            bench.fail("wan_dense", "ours", e)
        for name, be in _sdpa_backends().items():
            if be is None:
                bench.skip("wan_dense", f"sdpa_{name}", "this torch has no such SDPA backend")
                continue
            try:
                fn = _sdpa_fn(be, q, k, v)
                t = measure({name: fn}, p)[name]
                chk = check_peer("dense", None, fn())
                bench.record("wan_dense", f"sdpa_{name}", t, pairs=dense_pairs, d=D, n=N, h=H, check=chk)
            except _Abort:
                raise
            except Exception as e:
                bench.skip("wan_dense", f"sdpa_{name}", str(e)[:400])
        try:
            import xformers
            import xformers.ops as xops

            bench.extra["xformers_version"] = xformers.__version__
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            xf = lambda: xops.memory_efficient_attention(qt, kt, vt).transpose(1, 2)  # noqa: E731
            t = measure({"xformers": xf}, p)["xformers"]
            chk = check_peer("dense", None, xf())
            bench.record("wan_dense", "xformers", t, pairs=dense_pairs, d=D, n=N, h=H, check=chk)
        except ImportError as e:
            bench.skip("wan_dense", "xformers", f"not importable ({e}); pip install 'attnplug[xformers]'")
        except _Abort:
            raise
        except Exception as e:
            bench.fail("wan_dense", "xformers", e)
        bench.save()

    if "sparse" in sections and bench.due("wan_sparse"):
        print("wan sparse", flush=True)
        for d, lay in layouts.items():
            case = f"wan_sparse_{d}"
            try:
                fn = lambda lay=lay: ours(lay)  # noqa: E731
                t = measure({"ours": fn}, p)["ours"]
                bench.record(
                    case, "ours", t, pairs=visited_pairs(masks[d], N, blk, B, H), d=D, n=N, h=H, density_nominal=d,
                    block_density=lay.block_density, check=check_ours(d, lay),
                )  # fmt: skip
            except _Abort:
                raise
            except Exception as e:
                bench.fail(case, "ours", e)
        bench.save()

    if "modifiers" in sections and bench.due("wan_modifiers"):
        print("wan modifiers", flush=True)
        case = "wan_modifiers"
        u = torch.linspace(0.1, 0.4, H)
        mods = {"plain": (), "logitdecay": (LogitDecay(0.9, N // 4),), "outputmix": (OutputMix(u),)}
        mods["logitdecay+outputmix"] = mods["logitdecay"] + mods["outputmix"]
        try:
            fns = {name: (lambda m=m: ours(None, m)) for name, m in mods.items()}
            ts = measure(fns, p, rounds=1 if bench.smoke else 3)
            for name, t in ts.items():
                chk = check_ours(("mods", name), None, mods[name])
                bench.record(case, f"ours_{name}", t, pairs=dense_pairs, d=D, n=N, h=H, check=chk)
        except _Abort:
            raise
        except Exception as e:
            bench.fail(case, "ours_modifiers", e)
        bench.save()

    if "flex" in sections and bench.due("wan_flex"):
        print("wan flex (same block masks)", flush=True)
        all_masks = {1.0: torch.ones(1, 1, nb, nb, dtype=torch.bool, device=dev), **masks}
        for d, bm in all_masks.items():
            case = "wan_dense" if d == 1.0 else f"wan_sparse_{d}"
            if not bench.due(case, "flex"):
                continue
            try:
                mm = None if p.compile_flex else _block_lookup(bm, blk)
                fn = _flex_call(bench, q, k, v, flex_block_mask(bm, None, N, blk, mm))
                t = measure({"flex": fn}, p)["flex"]
                chk = check_peer("dense" if d == 1.0 else d, layouts.get(d), fn())
                bench.record(
                    case, "flex", t, pairs=visited_pairs(bm, N, blk, B, H), d=D, n=N, h=H, compiled=p.compile_flex,
                    check=chk,
                )  # fmt: skip
            except _Abort:
                raise
            except Exception as e:
                bench.fail(case, "flex", e)
        bench.save()

    if "backward" in sections and bench.due("wan_backward"):
        print("wan fwd+bwd", flush=True)
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        go = torch.randn(B, H, N, D, generator=g, device=dev, dtype=bench.dtype)

        def fwd_bwd(f: Callable[[], torch.Tensor]) -> Callable[[], tuple]:
            return lambda: torch.autograd.grad(f(), (qg, kg, vg), go)

        for d in p.bwd_densities:
            case = "wan_bwd_dense" if d == 1.0 else f"wan_bwd_{d}"
            if d == 1.0:
                bm, lay = torch.ones(1, 1, nb, nb, dtype=torch.bool, device=dev), None
            else:
                bm = masks[d] if d in masks else random_block_mask(H, nb, d, dev, seed=int(d * 1000))
                lay = layouts[d] if d in layouts else BlockLayout.from_block_mask(bm, N, N, blk, blk)
            pairs = visited_pairs(bm, N, blk, B, H)
            # impl -> fn(q, k, v) -> out, timed on (qg, kg, vg) and checked on fresh leaves
            impls: dict[str, Callable[..., torch.Tensor]] = {
                "ours": lambda a, b, c, lay=lay: attention(a, b, c, lay, backend=p.backend)
            }
            if "flex" in bench.extra:
                mm = None if p.compile_flex else _block_lookup(bm, blk)
                bmask = flex_block_mask(bm, None, N, blk, mm)
                impls["flex"] = lambda a, b, c, bmask=bmask: _flex_call(bench, a, b, c, bmask)()
            else:
                bench.skip(case, "flex", "FlexAttention unavailable (see errors)")
            if d == 1.0:
                for name, be in _sdpa_backends().items():
                    if be is not None:
                        impls[f"sdpa_{name}"] = lambda a, b, c, be=be: _sdpa_fn(be, a, b, c)()
            for impl, f in impls.items():
                if not bench.due(case, impl):
                    continue
                try:
                    fn = fwd_bwd(lambda f=f: f(qg, kg, vg))
                    t = measure({impl: fn}, p)[impl]
                    chk = check_grads(f, q, k, v, lay, rows)
                    bench.record(case, impl, t, pairs=pairs, d=D, n=N, h=H, fwd_bwd=True, check=chk)
                except _Abort:
                    raise
                except Exception as e:
                    bench.fail(case, impl, e)
        bench.save()


def run_gna(bench: Bench, sections: set[str]) -> None:
    """HunyuanVideo GNA: our layout + token permutation vs cuDNN (and flash) dense, and Flex."""
    from attn_kernels import attention
    from diffusion_attn.variants.base import TokenLayout
    from diffusion_attn.variants.neighborhood import Neighborhood

    if not {"gna", "gna_flex"} & sections:
        return
    p, dev = bench.plan, bench.plan.device
    grid, H, D = p.gna_grid, p.gna_heads, p.D
    N = math.prod(grid)
    case = "gna_hunyuan"
    if "gna_layout" not in bench.extra:  # built once per run (two phases use it)
        var = Neighborhood(kernel_size=p.gna_kernel, stride=p.gna_stride, block_size=p.block)
        tl = TokenLayout(grid)
        t0 = time.perf_counter()
        lay, perm = var.build(tl, dev)
        bench.extra["gna_layout"] = (var, tl, lay, perm, time.perf_counter() - t0)
    var, tl, lay, perm, build_s = bench.extra["gna_layout"]
    bm = lay.to_block_mask()
    token_density = math.prod(float(m.float().mean()) for m in var.dim_masks(grid))
    pairs = visited_pairs(bm, N, p.block, p.B, H)
    bench.shapes["gna"] = {
        "grid": list(grid),
        "B": p.B,
        "H": H,
        "N": N,
        "D": D,
        "kernel": list(p.gna_kernel),
        "stride": list(p.gna_stride),
        "block": p.block,
        "tile": list(var.permutation(tl)[1] or []),
        "block_density": lay.block_density,
        "token_density": token_density,
        "layout_build_s": build_s,
    }
    print("gna", bench.shapes["gna"], flush=True)
    from attn_kernels.verify import check_rows, plant_peaks, reference_rows, rows_to_check

    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(p.B, H, N, D, generator=g, device=dev, dtype=bench.dtype) for _ in range(3))
    inv = None if perm is None else torch.argsort(perm)
    qp, kp, vp = (x if perm is None else x[:, :, perm] for x in (q, k, v))
    rows = rows_to_check(N, p.ref_rows, dev)  # rows of the permuted sequence
    kp = plant_peaks(qp, kp, lay, rows)  # peaks in the first / last block each checked row visits
    if perm is not None:
        k = kp[:, :, inv]
    kernel = lambda: attention(qp, kp, vp, lay, backend=p.backend)  # noqa: E731

    def with_perm() -> torch.Tensor:
        if perm is None:
            return attention(q, k, v, lay, backend=p.backend)
        o = attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], lay, backend=p.backend)
        return o[:, :, inv]

    ref = None
    try:
        ref = reference_rows(qp, kp, vp, lay, rows)
    except _Abort:
        raise
    except Exception as e:
        bench.fail(case, "reference", e)

    def check(out: torch.Tensor, lse: torch.Tensor | None = None) -> dict | None:
        if ref is None:
            return None
        return check_rows(out[:, :, rows], None if lse is None else lse[:, :, rows], *ref, bench.dtype).as_dict()

    if "gna" in sections:
        for impl, fn in (("ours_kernel", kernel), ("ours_with_perm", with_perm)):
            try:
                t = measure({impl: fn}, p)[impl]
                if impl == "ours_kernel":
                    o, lse = attention(qp, kp, vp, lay, return_lse=True, backend=p.backend)
                    chk = check(o, lse)
                else:
                    o = fn()
                    chk = check(o if perm is None else o[:, :, perm])
                bench.record(case, impl, t, pairs=pairs, d=D, n=N, h=H, check=chk)
            except _Abort:
                raise
            except Exception as e:
                bench.fail(case, impl, e)
        for name in ("cudnn", "flash"):
            be = _sdpa_backends().get(name)
            if not bench.due(case, f"sdpa_{name}_dense"):
                continue
            try:
                if be is None:
                    raise RuntimeError("this torch has no such SDPA backend")
                fn = _sdpa_fn(be, q, k, v)
                t = measure({name: fn}, p)[name]
                # dense attention is not GNA: checked against the dense float64 reference instead
                o = fn() if perm is None else fn()[:, :, perm]
                chk = check_rows(o[:, :, rows], None, *reference_rows(qp, kp, vp, None, rows), bench.dtype).as_dict()
                bench.record(
                    case, f"sdpa_{name}_dense", t, pairs=float(p.B * H * N * N), d=D, n=N, h=H, check=chk
                )  # fmt: skip
            except _Abort:
                raise
            except Exception as e:
                bench.skip(case, f"sdpa_{name}_dense", str(e)[:400])
        bench.save()

    if "gna_flex" in sections and bench.due("gna_flex"):
        try:
            ms_ = [m.to(dev) for m in var.dim_masks(grid)]
            order = torch.arange(N, device=dev) if perm is None else perm
            f_, h_, w_ = grid
            ct, ch, cw = order // (h_ * w_), (order // w_) % h_, order % w_

            def gna_mask(b, h, q_idx, kv_idx):  # the variant's mask on the permuted sequence (no text)
                return ms_[0][ct[q_idx], ct[kv_idx]] & ms_[1][ch[q_idx], ch[kv_idx]] & ms_[2][cw[q_idx], cw[kv_idx]]

            bmask = flex_block_mask(bm, lay.partial_index(), N, p.block, gna_mask)
            fn = _flex_call(bench, qp, kp, vp, bmask)
            t = measure({"flex": fn}, p)["flex"]
            chk = check(fn())
            bench.record(case, "flex", t, pairs=pairs, d=D, n=N, h=H, compiled=p.compile_flex, check=chk)
        except _Abort:
            raise
        except Exception as e:
            bench.fail(case, "flex", e)
        bench.save()


# ----------------------------------------------------------------------------------- targets
def _target(name: str, value: float | None, label: str, why_missing: str = "") -> dict:
    cmp, thr, what = TARGETS[name]
    ok = None if value is None else (value >= thr if cmp == ">=" else value <= thr)
    out = {"target": name, "case": label, "value": value, "cmp": cmp, "threshold": thr, "pass": ok, "what": what}
    if value is None:
        out["missing"] = why_missing or "a measurement it needs was skipped or failed"
    return out


def targets(bench: Bench) -> list[dict]:
    """Every target of the brief from this run's records whose correctness checks passed (None,
    with the reason, where a measurement is missing or its check failed). A missed target says by
    how much (`margin`: value / threshold for >=, threshold / value for <=; < 1 is a miss)."""
    ms, find, why, p = bench.ms, bench.find, bench.why_missing, bench.plan
    out: list[dict] = []
    ours_dense = ms("wan_dense", "ours")
    sdpa = {
        r["impl"]: r["ms"]
        for r in bench.records
        if r["case"] == "wan_dense" and r["impl"].startswith("sdpa_") and r["check_ok"]
    }
    best = min(sdpa, key=sdpa.get) if sdpa else None
    val = sdpa[best] / ours_dense if best and ours_dense else None
    out.append(_target("dense_vs_best_sdpa", val, f"wan_dense vs {best}", why(("wan_dense", "ours"))))
    for d in p.densities:
        r = find(f"wan_sparse_{d}", "ours")
        t = ms(f"wan_sparse_{d}", "ours")
        val = t / (r["density"] * ours_dense) if t and ours_dense else None
        out.append(
            _target("sparse_scaling", val, f"wan_sparse_{d}", why((f"wan_sparse_{d}", "ours"), ("wan_dense", "ours")))
        )
    for d in p.densities:
        a, f = ms(f"wan_sparse_{d}", "ours"), ms(f"wan_sparse_{d}", "flex")
        pairs = ((f"wan_sparse_{d}", "ours"), (f"wan_sparse_{d}", "flex"))
        out.append(_target("vs_flex_same_mask", f / a if a and f else None, f"wan_sparse_{d}", why(*pairs)))
    plain = ms("wan_modifiers", "ours_plain")
    for m in ("logitdecay", "outputmix"):
        t = ms("wan_modifiers", f"ours_{m}")
        pairs = (("wan_modifiers", f"ours_{m}"), ("wan_modifiers", "ours_plain"))
        out.append(_target("modifier_overhead", t / plain if t and plain else None, m, why(*pairs)))
    cud, gna = ms("gna_hunyuan", "sdpa_cudnn_dense"), ms("gna_hunyuan", "ours_with_perm")
    pairs = (("gna_hunyuan", "sdpa_cudnn_dense"), ("gna_hunyuan", "ours_with_perm"))
    out.append(_target("gna_vs_cudnn_dense", cud / gna if cud and gna else None, "gna_hunyuan", why(*pairs)))
    for d in p.bwd_densities:
        case = "wan_bwd_dense" if d == 1.0 else f"wan_bwd_{d}"
        a, f = ms(case, "ours"), ms(case, "flex")
        out.append(_target("backward_vs_flex", f / a if a and f else None, case, why((case, "ours"), (case, "flex"))))
    for t in out:
        if t["value"] is not None:
            t["margin"] = t["value"] / t["threshold"] if t["cmp"] == ">=" else t["threshold"] / t["value"]
    return out


def info_ratios(bench: Bench) -> dict[str, float]:
    """Ratios reported without a target (speed-ups > 1 mean ours is faster)."""
    ms, out = bench.ms, {}
    pairs = [
        ("wan_dense", "flex", "wan_dense", "ours", "dense_flex_over_ours"),
        ("gna_hunyuan", "sdpa_cudnn_dense", "gna_hunyuan", "ours_kernel", "gna_kernel_only_vs_cudnn_dense"),
        ("gna_hunyuan", "sdpa_flash_dense", "gna_hunyuan", "ours_with_perm", "gna_vs_flash_dense"),
        ("gna_hunyuan", "flex", "gna_hunyuan", "ours_kernel", "gna_flex_over_ours_kernel"),
        ("wan_dense", "xformers", "wan_dense", "ours", "dense_xformers_over_ours"),
        ("wan_modifiers", "ours_logitdecay+outputmix", "wan_modifiers", "ours_plain", "both_modifiers_overhead"),
        ("wan_bwd_dense", "sdpa_flash", "wan_bwd_dense", "ours", "bwd_dense_sdpa_flash_over_ours"),
        ("wan_bwd_dense", "sdpa_cudnn", "wan_bwd_dense", "ours", "bwd_dense_sdpa_cudnn_over_ours"),
    ]
    for c1, i1, c2, i2, name in pairs:
        a, b = ms(c1, i1), ms(c2, i2)
        if a and b:
            out[name] = a / b
    # where a sparse layout stops paying: sparse time ~ s * d * our dense time (s: the measured scaling,
    # averaged), the dense engine is the best checked SDPA backend -> d* = t_sdpa / (s * t_ours_dense)
    ours = ms("wan_dense", "ours")
    sdpa = [
        ms("wan_dense", r["impl"]) for r in bench.records if r["case"] == "wan_dense" and r["impl"].startswith("sdpa_")
    ]
    sdpa = [t for t in sdpa if t]
    scal = []
    for r in bench.records:
        t = ms(r["case"], r["impl"]) if r["case"].startswith("wan_sparse_") and r["impl"] == "ours" else None
        if t and ours:
            scal.append(t / (r["density"] * ours))
    if ours and sdpa and scal:
        out["dense_engine_block_density"] = min(sdpa) / (statistics.mean(scal) * ours)
    return out


def correctness(bench: Bench) -> list[dict]:
    """Every record's correctness check (attn_kernels.verify), pass or fail, with its errors."""
    return [
        {"case": r["case"], "impl": r["impl"], "pass": r["check_ok"], **(r["check"] or {"missing": True})}
        for r in bench.records
    ]


# ----------------------------------------------------------------------------------- output
def environment(plan: Plan) -> tuple[dict, dict]:
    """(device, versions) of this run."""
    import triton

    if plan.device == "cuda":
        pr = torch.cuda.get_device_properties(0)
        device = {
            "name": pr.name,
            "capability": f"{pr.major}.{pr.minor}",
            "sms": pr.multi_processor_count,
            "memory_gib": round(pr.total_memory / 2**30, 1),
        }
        try:
            device["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception:
            pass
    else:
        device = {"name": platform.processor() or platform.machine() or "cpu", "threads": torch.get_num_threads()}
    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        import xformers

        versions["xformers"] = xformers.__version__
    except Exception:
        versions["xformers"] = None
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "attn_kernels"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        versions["attnplug_commit"] = rev.stdout.strip() or None
        versions["attn_kernels_uncommitted"] = [ln[3:] for ln in dirty.stdout.splitlines()] if rev.stdout else None
    except Exception:
        versions["attnplug_commit"] = None
    return device, versions


def plot(report: dict, path: Path) -> None:
    """Three panels: Wan time vs density, TFLOP/s per implementation, target margins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = report["results"]
    fig, ax = plt.subplots(1, 3, figsize=(18, 4.8))
    for impl, style in (("ours", "o-"), ("flex", "s--")):
        pts = sorted(
            (r["density"], r["ms"])
            for r in recs
            if r["pass"] == "fwd"
            and r["impl"] == impl
            and (r["case"] == "wan_dense" or r["case"].startswith("wan_sparse"))
        )
        if pts:
            ax[0].plot(*zip(*pts), style, label=impl)
    dense = next((r for r in recs if r["case"] == "wan_dense" and r["impl"] == "ours"), None)
    if dense:
        xs = [0.0, 1.0]
        ax[0].plot(xs, [1.15 * x * dense["ms"] for x in xs], ":", color="gray", label="1.15 d x our dense (target)")
    sdpa = [r["ms"] for r in recs if r["case"] == "wan_dense" and r["impl"].startswith("sdpa_")]
    if sdpa:
        ax[0].axhline(min(sdpa), color="k", lw=0.8, ls="--", label="best SDPA dense")
    w = report["shapes"].get("wan", {})
    title = f"Wan-shape forward B{w.get('B')} H{w.get('H')} N{w.get('N')} D{w.get('D')}"
    ax[0].set(xlabel="visited token pairs / N^2", ylabel="ms (median)", title=title)
    ax[0].legend(fontsize=8)
    labels = [f"{r['case']}\n{r['impl']}" for r in recs]
    colors = ["#2a4d8f" if r["impl"].startswith("ours") else "#999" for r in recs]
    ax[1].bar(range(len(recs)), [r["tflops"] for r in recs], color=colors)
    ax[1].set_xticks(range(len(recs)), labels, rotation=90, fontsize=6)
    ax[1].set(ylabel="TFLOP/s (visited blocks)", title="throughput (blue: ours)")
    tg = report["targets"]
    margin = [
        (t["value"] / t["threshold"] if t["cmp"] == ">=" else t["threshold"] / t["value"]) if t["value"] else 0.0
        for t in tg
    ]
    col = ["#3a3" if t["pass"] else "#d33" if t["pass"] is False else "#bbb" for t in tg]
    ax[2].bar(range(len(tg)), margin, color=col)
    ax[2].axhline(1.0, color="k", lw=0.8)
    ax[2].set_xticks(range(len(tg)), [f"{t['target']}\n{t['case']}" for t in tg], rotation=90, fontsize=6)
    ax[2].set(ylabel="margin (>= 1 passes)", title="targets (green pass, red fail, grey missing)")
    fig.suptitle(f"kernel_bench on {report['device']['name']}" + (" (SMOKE: not figures)" if report["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(bench: Bench, args: argparse.Namespace, device: dict, versions: dict, done: bool) -> dict:
    tg = targets(bench)
    return {
        "benchmark": "kernel_bench",
        "smoke": bench.smoke,
        "complete": done and not bench.cut_short,
        "device": device,
        "versions": versions,
        "dtype": bench.plan.dtype,
        "ours_backend": bench.plan.backend,
        "timing": {
            "method": "median of CUDA-event-timed repeats after warm-up"
            if bench.cuda
            else "median of perf_counter-timed repeats (CPU smoke)",
            "warmup_ms": bench.plan.warmup_ms,
            "rep_ms": bench.plan.rep_ms,
            "min_reps": bench.plan.min_reps,
            "max_reps": bench.plan.max_reps,
            "flops": "forward 4*B*H*D*visited pairs; fwd+bwd 3.5x that (backward = 2.5x forward)",
            "elapsed_s": round(time.monotonic() - bench.t0, 1),
            "budget_s": bench.budget_s,
        },
        "sections": sorted(args.sections_set),
        "shapes": bench.shapes,
        "targets": tg,
        "pass": {f"{t['target']}:{t['case']}": t["pass"] for t in tg},
        "all_targets_pass": all(t["pass"] for t in tg) if tg else None,
        "ratios": info_ratios(bench),
        "correctness": correctness(bench),
        "all_checks_pass": all(r["check_ok"] for r in bench.records) if bench.records else None,
        "interrupted": bench.extra.get("interrupted"),
        "results": bench.records,
        "skipped": bench.skipped,
        "errors": bench.errors,
        "notes": {k: v for k, v in bench.extra.items() if isinstance(v, (str, int, float))},
    }


def _default_out(smoke: bool) -> Path:
    """benchmarks/results for real runs; a fresh temp dir for the smoke (never the source tree)."""
    if smoke:
        return Path(tempfile.mkdtemp(prefix="kernel_bench_smoke_"))
    return ROOT / "benchmarks" / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, reference backend, eager Flex")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results; smoke: temp)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, help="sections to leave out")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new measurements after this")
    ap.add_argument("--densities", type=float, nargs="+", default=None)
    ap.add_argument("--bwd-densities", type=float, nargs="+", default=None)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16"])
    ap.add_argument("--backend", default=None, choices=["triton", "reference"], help="ours (smoke: reference)")
    ap.add_argument("--rep-ms", type=float, default=None, help="timed repeats per measurement, in ms")
    args = ap.parse_args(argv)
    args.sections_set = set(args.sections) - set(args.skip)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    plan = SMOKE if args.smoke else Plan()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("kernel_bench.py needs a CUDA GPU (use --smoke to check the script on CPU)")
    overrides = {
        "densities": args.densities and tuple(args.densities),
        "bwd_densities": args.bwd_densities and tuple(args.bwd_densities),
        "dtype": None if args.smoke else args.dtype,
        "backend": args.backend,
        "rep_ms": args.rep_ms,
    }
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or _default_out(args.smoke)
    if args.smoke and out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        raise SystemExit("--smoke numbers are not results: pass another --out (default: a temp dir)")
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_bench_smoke" if args.smoke else "kernel_bench"
    bench = Bench(plan, out, args.budget_s, args.smoke)
    device, versions = environment(plan)
    bench.extra["plan"] = asdict(plan)

    def save(done: bool = False) -> dict:
        rep = build_report(bench, args, device, versions, done)
        rep["plan"] = bench.extra["plan"]
        (out / f"{stem}.json").write_text(json.dumps(rep, indent=2, default=str))
        return rep

    bench.save_cb = save
    old = signal.signal(signal.SIGTERM, _on_term)
    try:
        if {"flex", "backward", "gna_flex"} & args.sections_set:
            try:
                bench.extra["flex"] = _make_flex(bench)
            except Exception as e:
                bench.fail("all", "flex", e)
                args.sections_set -= {"flex", "gna_flex"}
        # cheap phases first: a run cut short by its budget loses the compile-heavy Flex parts
        phases = ((run_wan, {"dense", "sparse", "modifiers"}), (run_gna, {"gna"}), (run_wan, {"flex", "backward"}),
                  (run_gna, {"gna_flex"}))  # fmt: skip
        for runner, names in phases:
            todo = args.sections_set & names
            if not todo or not bench.due(f"{runner.__name__}:{'+'.join(sorted(todo))}"):
                continue
            try:
                runner(bench, todo)
            except _Abort:
                raise
            except Exception as e:
                bench.fail(runner.__name__, "setup", e)
            if bench.cuda:
                torch.cuda.empty_cache()
    except (_Abort, KeyboardInterrupt) as e:  # SIGTERM, or SIGINT from run_gpu.sh's section limit
        bench.cut_short = True
        bench.extra["interrupted"] = f"{type(e).__name__} {e}".strip()
        bench.skip("all", "rest", f"interrupted ({type(e).__name__}): the numbers above are complete measurements")
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    report = save(done=True)
    try:
        plot(report, out / f"{stem}.png")
    except Exception as e:  # the JSON is what counts
        print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"kernel_bench: wrote {out / (stem + '.json')}")
    for t in report["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['target']:<20} {t['case']:<28} {v:>8} {t['cmp']} {t['threshold']:<5} pass={t['pass']}")
    return report


if __name__ == "__main__":
    main()

"""Hopper features on trial: tensor descriptors (TMA) and warp specialisation in the attention loop.

Our kernels load K/V with pointer arithmetic. Triton can instead issue TMA loads through tensor
descriptors (`tl.make_tensor_descriptor`) and warp-specialise a loop (`tl.range(...,
warp_specialize=True)`). Whether that pays off in our kernel is measured here on the dense forward
loop (the full-block path of `attn_kernels.triton_attention`, stripped of masks and modifiers):
the same loop with pointer loads and with descriptor loads, each with and without warp
specialisation, compiled for sm_90a (registers, spills, shared memory: no GPU needed) and, on a
GPU, timed against each other and against our production dense kernel at Wan 480p x 81f (B1 H12
N32760 D128, bf16) in one run. A feature moves into the production kernel when its timing says so.

    python benchmarks/hopper_features.py              # static on any machine; + timings on CUDA
    python benchmarks/hopper_features.py --smoke --out DIR
Writes <out>/hopper_features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@triton.jit
def _loop_ptr(Q, K, V, O, N, qk_scale, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr):
    """Dense forward, pointer loads ([B*H, N, D] contiguous)."""
    pid = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * N * D
    offs_m = pid * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in tl.range(0, N, BN, warp_specialize=WS):
        offs_n = start + tl.arange(0, BN)
        k = tl.load(K + base + offs_n[None, :] * D + offs_d[:, None])
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :])
        s = tl.dot(q, k) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


@triton.jit
def _loop_tma(Q, K, V, O, N, qk_scale, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr):
    """Dense forward, tensor-descriptor (TMA) loads and store."""
    pid = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * N * D
    qd = tl.make_tensor_descriptor(Q + base, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
    kd = tl.make_tensor_descriptor(K + base, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
    vd = tl.make_tensor_descriptor(V + base, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
    od = tl.make_tensor_descriptor(O + base, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
    q = qd.load([pid * BM, 0])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in tl.range(0, N, BN, warp_specialize=WS):
        k = kd.load([start, 0])
        v = vd.load([start, 0])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    od.store([pid * BM, 0], (acc / l_i[:, None]).to(O.dtype.element_ty))


TILES = ((128, 64, 8, 3), (128, 128, 8, 2))


def static(n: int, d: int) -> list[dict]:
    """sm_90a compile of every (loop, warp specialisation, tile) variant."""
    from attn_kernels.static_check import LaunchConfig, compile_sm90

    x = torch.empty(1, dtype=torch.bfloat16)
    out = []
    for kern in (_loop_ptr, _loop_tma):
        for ws in (False, True):
            for bm, bn, w, st in TILES:
                name = f"{kern.__name__[1:]}{'+ws' if ws else ''}[{bm}x{bn},w{w}s{st}]"
                cfg = LaunchConfig(name, kern, (x, x, x, x, n, 0.127), dict(BM=bm, BN=bn, D=d, WS=ws), w, st)
                try:
                    r = compile_sm90(cfg)
                    out.append({k: r[k] for k in ("name", "regs", "spill_stores", "shared", "wgmma")})
                except Exception as e:  # a feature the compiler refuses is a result too
                    out.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    return out


def timings(B: int, H: int, n: int, d: int, iters: int) -> list[dict]:
    """CUDA-event medians of every variant and of the production dense kernel, one run."""
    from attn_kernels import attention

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    q, k, v = (torch.randn(B * H, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    ref = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    flops = 4 * B * H * n * n * d
    res = []

    def time_it(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]

    for kern in (_loop_ptr, _loop_tma):
        for ws in (False, True):
            for bm, bn, w, st in TILES:
                name = f"{kern.__name__[1:]}{'+ws' if ws else ''}[{bm}x{bn},w{w}s{st}]"

                def run(kern=kern, ws=ws, bm=bm, bn=bn, w=w, st=st):
                    kern[(n // bm, B * H)](q, k, v, o, n, d**-0.5 * 1.4426950408889634, BM=bm, BN=bn, D=d, WS=ws,
                                           num_warps=w, num_stages=st)  # fmt: skip

                try:
                    ms = time_it(run)
                    err = float((o.float() - ref.float()).abs().max())
                    res.append({"name": name, "ms": ms, "tflops": flops / ms / 1e9, "max_abs_err": err})
                except Exception as e:
                    res.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    qh, kh, vh = (t.view(B, H, n, d) for t in (q, k, v))
    ms = time_it(lambda: attention(qh, kh, vh))
    res.append({"name": "attnplug dense (production)", "ms": ms, "tflops": flops / ms / 1e9})
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="static check only, small shapes, temp output")
    p.add_argument("--out", default=None)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp()) if a.smoke else ROOT / "benchmarks" / "results")
    B, H, n, d = 1, 12, 32768, 128  # N rounded to a multiple of 128: the loop has no tail handling
    env = {k: v for k, v in os.environ.items()}
    report = {
        "what": "dense forward loop: pointer vs tensor-descriptor (TMA) loads, with/without warp specialisation",
        "shape": {"B": B, "H": H, "N": n, "D": d, "dtype": "bfloat16"},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (static only)",
    }
    if env.get("TRITON_INTERPRET") == "1":
        report["static_sm90"] = "skipped: TRITON_INTERPRET=1"
    else:
        report["static_sm90"] = static(n, d)
    if torch.cuda.is_available() and not a.smoke:
        try:
            report["timings"] = timings(B, H, n, d, a.iters)
            for r in report["timings"]:  # a timing counts only when its output matches production's
                if "max_abs_err" in r:
                    r["check_ok"] = r["max_abs_err"] == r["max_abs_err"] and r["max_abs_err"] <= 2e-2
        except KeyboardInterrupt:
            report["timings"] = "interrupted (KeyboardInterrupt) before the timings finished"
    else:
        report["timings"] = "skipped: needs CUDA"
    out.mkdir(parents=True, exist_ok=True)
    (out / "hopper_features.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

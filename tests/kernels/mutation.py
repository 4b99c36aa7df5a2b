"""Small mutation run for the kernel package (not collected by pytest; run by hand when tests change).

    python tests/kernels/mutation.py [--only SUBSTRING] [--keep]

Copies the working tree to a temp dir (the shared checkout is never modified), then for each mutation
below replaces one snippet in one file, runs the named tests with `-x` (the Triton kernels in the
interpreter), and reports whether a test failed ("killed") or all passed ("SURVIVED"). Exit status 1
when a mutation survives or a snippet is not found (the list is stale). The reference backend has its
own checks in tests/kernels/test_reference.py (see that file's mutation notes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mutation_runner import main  # noqa: E402

T = "tests/kernels/"

# (file, old snippet, new snippet, tests)
TA = "attn_kernels/triton_attention.py"
TRI = T + "test_triton.py"
MUTATIONS: list[tuple[str, str, str, str]] = [
    # partial blocks: bit expansion, key bounds, tail handling
    (TA, "bit = (words >> (offs_c % 32)[None, :]) & 1", "bit = (words >> (offs_c % 16)[None, :]) & 1", TRI),
    (TA, "valid = (bit != 0) & (offs_n < Nk)[None, :]", "valid = bit != 0", TRI),
    (TA, "valid = (bit != 0) & (offs_n < Nk)[:, None]", "valid = (bit == bit) & (offs_n < Nk)[:, None]", TRI),
    (TA, "tail_kb = tl.where(Nk % BLOCK_K != 0, NKB - 1, -1)", "tail_kb = -1", TRI),
    (TA, "nfull = tl.where(tail_kb >= 0, NKB - 1, NKB)", "nfull = NKB", TRI),
    (
        TA,
        "for i in tl.static_range(1, WPT):\n            words = tl.where((wsel == i)[None, :]",
        "for i in tl.static_range(1, 1):\n            words = tl.where((wsel == i)[None, :]",
        TRI,
    ),
    # online softmax, modifiers, statistics
    (TA, "            alpha = tl.exp2(m_i - m_new)", "            alpha = tl.exp2(m_new - m_i)", TRI),
    (TA, "far = (tl.abs(qp - kp) > decay_thr)", "far = (tl.abs(qp - kp) >= decay_thr)", TRI),
    (TA, "out = (1.0 - u) * out + u * vrow", "out = (1.0 - u) * out + u * out", TRI),
    # (tile_max > m_i + thr instead of m_before is equivalent for thr < 0: a sub-tile that fails the
    # test leaves m_i == m_before, so it is not listed)
    (TA, "need = tl.where(sub == 0, cond, tl.maximum(need, cond))", "need = cond", TRI),
    # backward
    (TA, "    dk = dk * scale\n", "    dk = dk\n", TRI),
    (TA, "        ds = p * (dp - delta[:, None]) * gate", "        ds = p * (dp - delta[:, None])", TRI),
    (TA, "        dv = dv * cmix + u * do_n", "        dv = dv * cmix", TRI),
    # tiles and launch
    (TA, "        if _fits(kind, c, block_q, block_k):\n", "        if True:\n", TRI + " " + T + "test_static_sm90.py"),
    (TA, 'lambda m: (nqb * (bq // m["BLOCK_M"]), B * H),', "lambda m: (nqb, B * H),", TRI),
    # layout views
    (
        "attn_kernels/layout.py",
        "key = torch.where(mask, ar, ar + W)",
        "key = torch.where(mask, ar + W, ar)",
        T + "test_layout.py " + TRI,
    ),
    (
        "attn_kernels/layout.py",
        "end = begin + mask.sum(1, dtype=torch.int32)",
        "end = begin + W",
        T + "test_layout.py " + TRI,
    ),
    (
        "attn_kernels/layout.py",
        "order = torch.argsort(cols * nqb + qb, stable=True)",
        "order = torch.argsort(qb, stable=True)",
        TRI,
    ),
    # op boundary and modifiers
    ("attn_kernels/ops.py", "scale_f = d**-0.5 if scale is None else float(scale)", "scale_f = d**-0.5", TRI),
    ("attn_kernels/modifiers.py", " or bool((tc > hi).any())", "", T + "test_ops.py"),
]

if __name__ == "__main__":
    raise SystemExit(main(MUTATIONS, __doc__))

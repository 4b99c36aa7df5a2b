"""The correctness checks that gate every GPU figure fail when the kernel is wrong.

Each planted bug is a kernel that skips the first block of every row, skips the ragged tail
block, or returns a wrong LSE; the check must pass the right output and fail each bug. On CPU the
"kernel" is the Triton kernel in the interpreter (or the reference where Triton cannot run); with
`-m gpu` the same checks run the real kernel in bf16 at a Wan-like length."""

from __future__ import annotations

import math
import os

import pytest
import torch

from attn_kernels import BlockLayout, LogitDecay, OutputMix, attention
from attn_kernels.verify import check_rows_of, plant_peaks, reference_rows, rows_to_check

CUDA = torch.cuda.is_available()
TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [pytest.mark.gpu] if CUDA else []  # on a GPU every case here is part of `pytest -m gpu`


def _band_layout(n: int, heads: int, block: int, device: str) -> BlockLayout:
    """Per-head band (element masks at the band edges: partial blocks) with a ragged tail."""
    return BlockLayout.from_mask_mod(
        lambda b, h, i, j: (i - j).abs() < 2 * block + 7 * (h + 1), n, n, H=heads, block_q=block, block_k=block,
        device=device,
    )  # fmt: skip


def _drop(layout: BlockLayout, which: str) -> BlockLayout:
    """The layout a buggy kernel would walk: each query block without its first visited key block
    ("first") or without the ragged tail key block ("tail"), element masks kept elsewhere."""
    bl, hl = layout.batch, layout.heads
    tm = torch.stack([torch.stack([layout.to_token_mask(b, h) for h in range(hl)]) for b in range(bl)])
    bk = layout.block_k
    for qb in range(layout.num_q_blocks):
        r0, r1 = qb * layout.block_q, min((qb + 1) * layout.block_q, layout.q_len)
        for b in range(bl):
            for h in range(hl):
                if which == "first":
                    cols = tm[b, h, r0:r1].any(0).nonzero()
                    if cols.numel():
                        k0 = int(cols[0]) // bk * bk
                        tm[b, h, r0:r1, k0 : k0 + bk] = False
                else:
                    tm[b, h, r0:r1, (layout.k_len - 1) // bk * bk :] = False
    return BlockLayout.from_token_mask(tm.to(layout.device), layout.block_q, layout.block_k)


def _run(q, k, v, layout, mods=()):
    backend = "triton" if TRITON else "reference"
    return attention(q, k, v, layout, modifiers=mods, return_lse=True, backend=backend)


def _case(n: int, heads: int, d: int, block: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to(device, dtype) for _ in range(3))
    lay = _band_layout(n, heads, block, device)
    rows = rows_to_check(n, block, device)
    k = plant_peaks(q, k, lay, rows)
    return q, k, v, lay, rows


def _assert_check_catches_bugs(q, k, v, lay, rows, mods=()):
    out, lse = _run(q, k, v, lay, mods)
    good = check_rows_of(q, k, v, lay, out, lse, rows, modifiers=mods)
    assert good.ok, good
    for which in ("first", "tail"):
        o_bug, l_bug = _run(q, k, v, _drop(lay, which), mods)
        bad = check_rows_of(q, k, v, lay, o_bug, l_bug, rows, modifiers=mods)
        assert not bad.ok and bad.out_rel_err > 0.3, (which, bad)  # off by far more than the tolerance
        assert bad.lse_abs_err > 1.0, (which, bad)
        assert check_rows_of(q, k, v, lay, o_bug, None, rows, modifiers=mods).ok is False  # the output alone
    for wrong in (lse / math.log(2.0), lse + 0.01):  # log2 instead of ln; an offset
        bad = check_rows_of(q, k, v, lay, out, wrong, rows, modifiers=mods)
        assert not bad.ok and bad.out_rel_err == good.out_rel_err, bad


@pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1 (else the reference stands in)")
@pytest.mark.parametrize("mods", [(), "both"])
def test_checks_fail_on_planted_bugs_interpreter(mods):
    mods = (LogitDecay(torch.tensor([0.5, 1.0]), 40), OutputMix(torch.tensor([0.25, 0.0]))) if mods else ()
    dev = "cuda" if CUDA else "cpu"
    _assert_check_catches_bugs(*_case(300, 2, 32, 32, torch.float32, dev), mods)


def test_peaks_are_planted_where_the_rows_look():
    q, k, v, lay, rows = _case(300, 2, 32, 32, torch.float32, "cpu")
    _ref, lse = reference_rows(q, k, v, lay, rows)
    # a planted key carries almost all of its row's weight: lse is within 0.1 of the peak logit
    assert float((lse - 16.0).abs().median()) < 0.1
    # ... and it sits in the first visited block (first rows) or the ragged tail block (last rows:
    # 12 tail keys for 32 rows, so at least 12 rows per head peak there)
    s = torch.einsum("bhrd,bhnd->bhrn", q[:, :, rows].double(), k.double()) / math.sqrt(32)
    seen = torch.stack([lay.to_token_mask(0, h) for h in range(2)])[None][:, :, rows]
    j = s.masked_fill(~seen, float("-inf")).argmax(-1)
    assert bool((j[:, :, :32] < 32).all())  # row block 0 visits key block 0 first
    assert bool(((j[:, :, -32:] >= 288).sum(-1) >= 12).all())  # keys 288..299: the tail block


def test_empty_rows_must_be_exact_zero():
    q, k, v, lay, rows = _case(96, 1, 16, 32, torch.float32, "cpu")
    empty = BlockLayout.from_block_mask(torch.zeros(1, 1, 3, 3, dtype=torch.bool), 96, 96, 32, 32)
    out, lse = attention(q, k, v, empty, return_lse=True, backend="reference")
    assert check_rows_of(q, k, v, empty, out, lse, rows).ok
    assert not check_rows_of(q, k, v, empty, out + 1e-3, lse, rows).ok
    assert not check_rows_of(q, k, v, empty, out, torch.zeros_like(lse), rows).ok


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
def test_checks_fail_on_planted_bugs_gpu_bf16(d):
    """The real kernel in bf16 at a Wan-like length (32,760 keys, ragged 120-token tail)."""
    _assert_check_catches_bugs(*_case(32760, 2, d, 128, torch.bfloat16, "cuda"))

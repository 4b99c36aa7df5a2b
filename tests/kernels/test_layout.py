"""BlockLayout: constructors agree, CSR invariants, element masks, transpose, validation."""

from __future__ import annotations

import pytest
import torch

from attn_kernels import BlockLayout


def test_from_block_mask_csr_roundtrip():
    bm = torch.rand(2, 3, 5, 4) < 0.5
    lay = BlockLayout.from_block_mask(bm, 70, 60, 16, 16)
    assert lay.batch == 2 and lay.heads == 3 and lay.nnz == int(bm.sum())
    assert torch.equal(lay.to_block_mask(), bm)
    rp = lay.row_ptr.long()
    for r in range(rp.numel() - 1):  # sorted within each row
        cols = lay.col_idx[rp[r] : rp[r + 1]]
        assert torch.equal(cols, cols.sort().values)


def test_constructors_agree():
    nq, nk, bq, bk = 45, 70, 16, 32
    bm = torch.rand(1, 1, 3, 3) < 0.6
    idx = [[int(c) for c in bm[0, 0, r].nonzero()[:, 0]] for r in range(3)]
    a = BlockLayout.from_block_mask(bm, nq, nk, bq, bk)
    b = BlockLayout.from_indices(idx, nq, nk, bq, bk)
    c = BlockLayout.from_mask_mod(lambda b_, h, q, k: bm[0, 0, q // bq, k // bk], nq, nk, block_q=bq, block_k=bk)
    for other in (b, c):
        assert torch.equal(a.row_ptr, other.row_ptr) and torch.equal(a.col_idx, other.col_idx)
    assert c.partial is None  # whole blocks need no element mask


def test_token_mask_roundtrip_and_density():
    tm = torch.rand(2, 1, 37, 29) < 0.3
    lay = BlockLayout.from_token_mask(tm, 16, 16)
    for b in range(2):
        assert torch.equal(lay.to_token_mask(b, 0), tm[b, 0])
    assert lay.density == pytest.approx(tm.float().mean().item())
    assert lay.has_element_mask


def test_empty_rows_have_no_entries():
    bm = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    bm[0, 0, 1, 2] = True
    lay = BlockLayout.from_block_mask(bm, 48, 48, 16, 16)
    assert lay.row_ptr.tolist() == [0, 0, 1, 1]


def test_transpose_lists_query_blocks_per_key_block():
    bm = torch.rand(1, 2, 4, 3) < 0.5
    lay = BlockLayout.from_block_mask(bm, 64, 48, 16, 16)
    col_ptr, row_idx, entry = lay.transpose()
    for h in range(2):
        for kb in range(3):
            c = h * 3 + kb
            got = row_idx[col_ptr[c] : col_ptr[c + 1]].tolist()
            assert got == bm[0, h, :, kb].nonzero()[:, 0].tolist()
            # entry points back at the CSR position holding this key block
            for e in entry[col_ptr[c] : col_ptr[c + 1]].tolist():
                assert int(lay.col_idx[e]) == kb


def test_shared_layout_has_no_copies():
    lay = BlockLayout.dense(100, 100, 32, 32)
    assert lay.batch == 1 and lay.heads == 1 and lay.nnz == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q_len=0, k_len=10), "q_len must be a positive int"),
        (dict(q_len=10, k_len=10, block_q=48), r"block_q must be one of \(16, 32, 64, 128\)"),
        (dict(q_len=10, k_len=10, block_k=8), "block_k must be one of"),
    ],
)
def test_dense_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockLayout.dense(**kwargs)


def test_validation_messages():
    with pytest.raises(TypeError, match="block_mask must be a bool tensor"):
        BlockLayout.from_block_mask(torch.ones(2, 2), 32, 32, 16, 16)
    with pytest.raises(ValueError, match="nqb x nkb = 2 x 2"):
        BlockLayout.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 32, 32, 16, 16)
    with pytest.raises(ValueError, match=r"key block 5, allowed range \[0, 2\)"):
        BlockLayout.from_indices([[0], [5]], 32, 32, 16, 16)
    with pytest.raises(ValueError, match=r"col_idx entries must be in \[0, 2\)"):
        BlockLayout(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), q_len=16, k_len=32,
                    block_q=16, block_k=16)  # fmt: skip
    with pytest.raises(TypeError, match="row_ptr must be a 1-D int32 tensor"):
        BlockLayout(torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32), q_len=16, k_len=16, block_q=16,
                    block_k=16)  # fmt: skip


@pytest.mark.parametrize("shared", [True, False])
def test_with_key_mask_equals_token_mask_and(shared):
    B, H, nq, nk = 2, 2, 40, 45
    tm = torch.rand(1 if shared else B, H, nq, nk) < 0.5
    lay = BlockLayout.from_token_mask(tm, 16, 16)
    valid = torch.ones(B, nk, dtype=torch.bool)
    valid[0, 30:] = False  # text padding: a suffix of keys
    valid[1, 10:20] = False
    out = lay.with_key_mask(valid)
    assert out.batch == B
    for b in range(B):
        for h in range(H):
            want = tm[0 if shared else b, h] & valid[b][None, :]
            assert torch.equal(out.to_token_mask(b, h), want)
    assert not out.to_block_mask()[0, :, :, 2].any()  # keys 32..44 all invalid for b=0: block dropped

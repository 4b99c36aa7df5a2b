"""Block layouts: for each (batch, head, query block), the key blocks the kernel visits.

Stored CSR-style so the kernel does no work for skipped blocks:

* ``row_ptr`` int32 ``[Bl*Hl*nqb + 1]`` and ``col_idx`` int32 ``[nnz]`` (sorted within a row);
  row ``r = (b*Hl + h)*nqb + qb``.
* ``partial`` int32 ``[nnz]``: -1 for a fully visible block, else an index into ``elem_mask``.
* ``elem_mask`` int32 ``[n_partial, block_q, ceil(block_k/32)]``: bit ``j`` of word ``w`` is key
  ``w*32 + j`` of the block (element-level mask inside partially visible blocks).

``Bl`` is 1 or the batch size and ``Hl`` 1 or the number of heads: a layout with ``Bl == 1`` or
``Hl == 1`` is shared across batch / heads without copies. Tokens past ``q_len`` / ``k_len`` in
tail blocks are always masked.

What the kernels read is not the CSR itself but its `KernelLayout` (built once per layout, on the
layout's device, and cached): FlexAttention's split into *full* blocks (every pair visible: no
mask memory, no bounds checks) and *partial* blocks (an element mask, or the ragged last key
block), each as per-row ``begin / end / idx`` lists, plus the merged list in ascending key order
(LiteAttention's tile statistics) and, for the backward pass, the same split per key-block column.
Layouts are immutable: build one per (shape, phase), keep it, and every call reuses its views.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = ["BlockLayout", "KernelLayout", "VALID_BLOCK_SIZES", "owner_of", "remember_owner"]

VALID_BLOCK_SIZES = (16, 32, 64, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {VALID_BLOCK_SIZES}, got {value!r}")
    return value


def _check_len(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., block_k] -> int32 [..., ceil(block_k/32)] (bit j of word w = column w*32+j)."""
    bk = mask.shape[-1]
    words = _cdiv(bk, 32)
    pad = words * 32 - bk
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    m = mask.reshape(*mask.shape[:-1], words, 32).to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    packed = (m * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_bits(words: torch.Tensor, block_k: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., block_k]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (w.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., :block_k].bool()


class KernelLayout(NamedTuple):
    """The int32 device arrays the kernels walk (see the module docstring), built once per layout.

    Rows are ``(bl*Hl + hl)*nqb + qb``, columns ``(bl*Hl + hl)*nkb + kb``; every list is given as
    ``begin[r] / end[r]`` offsets into its index array (CSR offsets, or ELL rows of width nkb for
    layouts built on the device without a host sync). ``*_mask`` holds the element-mask index of
    a partial entry, -1 for the ragged tail block without one. ``t_*`` (backward) may be None.
    """

    full_begin: torch.Tensor
    full_end: torch.Tensor
    full_idx: torch.Tensor
    part_begin: torch.Tensor
    part_end: torch.Tensor
    part_idx: torch.Tensor
    part_mask: torch.Tensor
    all_begin: torch.Tensor
    all_end: torch.Tensor
    all_idx: torch.Tensor
    all_mask: torch.Tensor
    elem_mask: torch.Tensor | None
    t_full_begin: torch.Tensor | None = None
    t_full_end: torch.Tensor | None = None
    t_full_idx: torch.Tensor | None = None
    t_part_begin: torch.Tensor | None = None
    t_part_end: torch.Tensor | None = None
    t_part_idx: torch.Tensor | None = None
    t_part_mask: torch.Tensor | None = None

    @property
    def has_backward(self) -> bool:
        return self.t_full_idx is not None


def _csr_lists(rows: torch.Tensor, idx: torch.Tensor, extra: torch.Tensor | None, nrows: int):
    """Entries (already sorted by row, then index) -> (begin, end, idx[, extra]) int32 lists."""
    counts = torch.bincount(rows, minlength=nrows) if rows.numel() else torch.zeros(nrows, dtype=torch.long)
    ptr = torch.zeros(nrows + 1, dtype=torch.int32, device=idx.device)
    ptr[1:] = counts.to(idx.device).cumsum(0).to(torch.int32)
    out = [ptr[:-1], ptr[1:], idx.to(torch.int32).contiguous()]
    if extra is not None:
        out.append(extra.to(torch.int32).contiguous())
    return out


def _ell_lists(mask: torch.Tensor) -> list[torch.Tensor]:
    """bool [R, W] -> ELL (begin, end, idx): row r lists its True columns ascending in
    idx[r*W : r*W + count]. Device ops only (no host sync): sort keys put True columns first."""
    R, W = mask.shape
    ar = torch.arange(W, device=mask.device, dtype=torch.int32)
    key = torch.where(mask, ar, ar + W)  # True columns first, each group ascending
    idx = key.sort(dim=1).values
    idx = torch.where(idx >= W, idx - W, idx).reshape(-1).contiguous()
    begin = torch.arange(R, device=mask.device, dtype=torch.int32) * W
    end = begin + mask.sum(1, dtype=torch.int32)
    return [begin, end, idx]


class BlockLayout:
    """Which key blocks each (batch, head, query block) visits; see the module docstring."""

    def __init__(
        self,
        row_ptr: torch.Tensor,
        col_idx: torch.Tensor,
        *,
        q_len: int,
        k_len: int,
        block_q: int = 128,
        block_k: int = 128,
        batch: int = 1,
        heads: int = 1,
        partial: torch.Tensor | None = None,
        elem_mask: torch.Tensor | None = None,
        validate: bool = True,
    ) -> None:
        self._kernel: KernelLayout | None = None
        self._block_mask: torch.Tensor | None = None  # set by the device builder (no CSR)
        if not validate:  # internal: parts that come from a validated layout or our own builders
            self.q_len, self.k_len, self.block_q, self.block_k = q_len, k_len, block_q, block_k
            self.batch, self.heads = batch, heads
            self._row_ptr, self._col_idx, self.partial, self.elem_mask = row_ptr, col_idx, partial, elem_mask
            self._transpose = None
            self._dense_cache = {}
            if row_ptr is not None:
                self._build_views()
            return
        self.q_len = _check_len("q_len", q_len)
        self.k_len = _check_len("k_len", k_len)
        self.block_q = _check_block("block_q", block_q)
        self.block_k = _check_block("block_k", block_k)
        self.batch = _check_len("batch", batch)
        self.heads = _check_len("heads", heads)
        nrows = self.batch * self.heads * self.num_q_blocks
        for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
                raise TypeError(f"BlockLayout.{name} must be a 1-D int32 tensor, got {_describe(t)}")
        if row_ptr.numel() != nrows + 1:
            raise ValueError(
                f"BlockLayout.row_ptr must have batch*heads*num_q_blocks + 1 = {nrows + 1} entries, "
                f"got {row_ptr.numel()}"
            )
        nnz = col_idx.numel()
        rp = row_ptr.cpu()
        if int(rp[0]) != 0 or int(rp[-1]) != nnz or bool((rp[1:] < rp[:-1]).any()):
            raise ValueError(f"BlockLayout.row_ptr must be non-decreasing from 0 to nnz={nnz}")
        if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= self.num_k_blocks):
            raise ValueError(
                f"BlockLayout.col_idx entries must be in [0, {self.num_k_blocks}) (num_k_blocks), "
                f"got range [{int(col_idx.min())}, {int(col_idx.max())}]"
            )
        if (partial is None) != (elem_mask is None):
            raise ValueError("BlockLayout.partial and BlockLayout.elem_mask must be given together")
        if partial is not None:
            if partial.dtype != torch.int32 or partial.shape != (nnz,):
                raise TypeError(f"BlockLayout.partial must be int32 [nnz={nnz}], got {_describe(partial)}")
            words = _cdiv(self.block_k, 32)
            if elem_mask.dtype != torch.int32 or elem_mask.dim() != 3 or elem_mask.shape[1:] != (self.block_q, words):
                raise TypeError(
                    f"BlockLayout.elem_mask must be int32 [n_partial, {self.block_q}, {words}], "
                    f"got {_describe(elem_mask)}"
                )
            if nnz and (int(partial.min()) < -1 or int(partial.max()) >= elem_mask.shape[0]):
                raise ValueError(f"BlockLayout.partial entries must be in [-1, {elem_mask.shape[0]})")
        self._row_ptr = row_ptr
        self._col_idx = col_idx
        self.partial = partial
        self.elem_mask = elem_mask
        self._transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._dense_cache: dict = {}  # layouts are immutable: cache derived views
        self._build_views()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def dense(
        cls, q_len: int, k_len: int, block_q: int = 128, block_k: int = 128, device: torch.device | str | None = None
    ) -> BlockLayout:
        """Every query block visits every key block (shared across batch and heads).

        Cached per (lengths, blocks, device): repeated calls return the same immutable layout, so its
        kernel views are built once."""
        _check_len("q_len", q_len), _check_len("k_len", k_len)
        _check_block("block_q", block_q), _check_block("block_k", block_k)
        dev = torch.device("cpu" if device is None else device)
        key = (q_len, k_len, block_q, block_k, str(dev))
        hit = _DENSE_CACHE.get(key)
        if hit is not None:
            return hit
        mask = torch.ones(1, 1, _cdiv(q_len, block_q), _cdiv(k_len, block_k), dtype=torch.bool)
        lay = cls.from_block_mask(mask, q_len, k_len, block_q, block_k).to(dev)
        if len(_DENSE_CACHE) >= 64:
            _DENSE_CACHE.pop(next(iter(_DENSE_CACHE)))
        _DENSE_CACHE[key] = lay
        return lay

    @classmethod
    def from_device_block_mask(
        cls, block_mask: torch.Tensor, q_len: int, k_len: int, block_q: int = 128, block_k: int = 128
    ) -> BlockLayout:
        """From a bool block mask ``[Bl, Hl, nqb, nkb]`` on any device, with no host sync.

        For masks that change every call (LiteAttention's skip sets): the kernel lists are built
        with device ops only (ELL rows of width nkb instead of CSR), so a CUDA graph can capture
        the call. Shapes are checked; the mask's contents are trusted. CSR views (`row_ptr`,
        `col_idx`) are derived on first access (that one syncs)."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
            raise TypeError(f"block_mask must be a bool tensor [Bl, Hl, nqb, nkb], got {_describe(block_mask)}")
        nqb = _cdiv(_check_len("q_len", q_len), _check_block("block_q", block_q))
        nkb = _cdiv(_check_len("k_len", k_len), _check_block("block_k", block_k))
        if block_mask.shape[2:] != (nqb, nkb):
            raise ValueError(
                f"block_mask must have nqb x nkb = {nqb} x {nkb} blocks for q_len={q_len}, k_len={k_len}, "
                f"block_q={block_q}, block_k={block_k}; got {tuple(block_mask.shape[2:])}"
            )
        lay = cls(
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            q_len=q_len,
            k_len=k_len,
            block_q=block_q,
            block_k=block_k,
            batch=block_mask.shape[0],
            heads=block_mask.shape[1],
            validate=False,
        )
        lay._block_mask = block_mask
        lay._dense_cache["block"] = block_mask
        lay.kernel_view()  # forward lists now (device ops); backward lists on first use
        return lay

    @classmethod
    def from_block_mask(
        cls, block_mask: torch.Tensor, q_len: int, k_len: int, block_q: int = 128, block_k: int = 128
    ) -> BlockLayout:
        """From a boolean block mask ``[Bl, Hl, nqb, nkb]`` (``[nqb, nkb]`` means shared)."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor, got {_describe(block_mask)}")
        if block_mask.dim() == 2:
            block_mask = block_mask[None, None]
        if block_mask.dim() != 4:
            raise ValueError(
                f"block_mask must be [Bl, Hl, nqb, nkb] or [nqb, nkb], got shape {tuple(block_mask.shape)}"
            )
        nqb = _cdiv(_check_len("q_len", q_len), _check_block("block_q", block_q))
        nkb = _cdiv(_check_len("k_len", k_len), _check_block("block_k", block_k))
        if block_mask.shape[2:] != (nqb, nkb):
            raise ValueError(
                f"block_mask must have nqb x nkb = {nqb} x {nkb} blocks for q_len={q_len}, k_len={k_len}, "
                f"block_q={block_q}, block_k={block_k}; got {tuple(block_mask.shape[2:])}"
            )
        bm = block_mask.cpu()
        counts = bm.reshape(-1, nkb).sum(-1)
        row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32)
        row_ptr[1:] = counts.cumsum(0).to(torch.int32)
        col_idx = bm.reshape(-1, nkb).nonzero()[:, 1].to(torch.int32)  # row-major: sorted per row
        return cls(
            row_ptr.to(block_mask.device),
            col_idx.to(block_mask.device),
            q_len=q_len,
            k_len=k_len,
            block_q=block_q,
            block_k=block_k,
            batch=bm.shape[0],
            heads=bm.shape[1],
        )

    @classmethod
    def from_indices(
        cls, indices: Sequence, q_len: int, k_len: int, block_q: int = 128, block_k: int = 128
    ) -> BlockLayout:
        """From nested lists ``indices[b][h][qb] -> key block ids`` (``indices[qb]`` = shared)."""
        nqb = _cdiv(_check_len("q_len", q_len), _check_block("block_q", block_q))
        nkb = _cdiv(_check_len("k_len", k_len), _check_block("block_k", block_k))
        if len(indices) == nqb and all(
            isinstance(r, (list, tuple)) and all(isinstance(x, int) for x in r) for r in indices
        ):
            indices = [[indices]]
        mask = torch.zeros(len(indices), len(indices[0]), nqb, nkb, dtype=torch.bool)
        for b, per_b in enumerate(indices):
            if len(per_b) != mask.shape[1]:
                raise ValueError("indices must have the same number of heads for every batch entry")
            for h, rows in enumerate(per_b):
                if len(rows) != nqb:
                    raise ValueError(f"indices[{b}][{h}] must list {nqb} query blocks, got {len(rows)}")
                for qb, cols in enumerate(rows):
                    for c in cols:
                        if not 0 <= int(c) < nkb:
                            raise ValueError(f"indices[{b}][{h}][{qb}] has key block {c}, allowed range [0, {nkb})")
                        mask[b, h, qb, int(c)] = True
        return cls.from_block_mask(mask, q_len, k_len, block_q, block_k)

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        q_len: int,
        k_len: int,
        *,
        B: int = 1,
        H: int = 1,
        block_q: int = 128,
        block_k: int = 128,
        element_mask: bool = True,
        device: torch.device | str | None = None,
    ) -> BlockLayout:
        """From a vectorised ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's convention).

        Evaluated one query-block row at a time (memory ``B*H*block_q*k_len``). Blocks with some
        but not all pairs allowed become partial and carry an element mask (unless
        ``element_mask=False``, which keeps them whole).
        """
        nqb = _cdiv(_check_len("q_len", q_len), _check_block("block_q", block_q))
        nkb = _cdiv(_check_len("k_len", k_len), _check_block("block_k", block_k))
        _check_len("B", B), _check_len("H", H)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        b_idx = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h_idx = torch.arange(H, device=dev).view(1, H, 1, 1)
        kv = torch.arange(nkb * block_k, device=dev)
        kv_valid = kv < k_len
        kv_idx = kv.clamp(max=k_len - 1).view(1, 1, 1, -1)
        block_rows, partial_rows, bits = [], [], []
        n_partial = 0
        for qb in range(nqb):
            q = torch.arange(qb * block_q, (qb + 1) * block_q, device=dev)
            q_valid = q < q_len
            m = mask_mod(b_idx, h_idx, q.clamp(max=q_len - 1).view(1, 1, -1, 1), kv_idx)
            m = torch.as_tensor(m, device=dev).bool().expand(B, H, block_q, nkb * block_k)
            valid = q_valid.view(1, 1, -1, 1) & kv_valid.view(1, 1, 1, -1)
            m = m & valid
            m = m.reshape(B, H, block_q, nkb, block_k).permute(0, 1, 3, 2, 4)  # [B,H,nkb,bq,bk]
            anyb = m.flatten(-2).any(-1)
            fullb = (m | ~valid.reshape(block_q, nkb, block_k).permute(1, 0, 2)).flatten(-2).all(-1) & anyb
            block_rows.append(anyb)
            if element_mask:
                part = anyb & ~fullb
                pidx = torch.full(anyb.shape, -1, dtype=torch.int32, device=dev)
                npart = int(part.sum())
                if npart:
                    pidx[part] = torch.arange(n_partial, n_partial + npart, dtype=torch.int32, device=dev)
                    bits.append(_pack_bits(m[part]))
                    n_partial += npart
                partial_rows.append(pidx)
        block_mask = torch.stack(block_rows, 2)  # [B,H,nqb,nkb]
        layout = cls.from_block_mask(block_mask, q_len, k_len, block_q, block_k)
        if element_mask and n_partial:
            pdense = torch.stack(partial_rows, 2)
            partial = pdense[block_mask].to(torch.int32)  # row-major order == CSR order
            elem = torch.cat(bits, 0)
            layout = cls(
                layout.row_ptr,
                layout.col_idx,
                q_len=q_len,
                k_len=k_len,
                block_q=block_q,
                block_k=block_k,
                batch=B,
                heads=H,
                partial=partial,
                elem_mask=elem,
            )
        return layout

    @classmethod
    def from_token_mask(cls, mask: torch.Tensor, block_q: int = 128, block_k: int = 128) -> BlockLayout:
        """From a dense boolean token mask ``[Bl, Hl, Nq, Nk]`` or ``[Nq, Nk]`` (small sizes)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {_describe(mask)}")
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError(f"mask must be [Bl, Hl, Nq, Nk] or [Nq, Nk], got shape {tuple(mask.shape)}")
        B, H, nq, nk = mask.shape
        return cls.from_mask_mod(
            lambda b, h, q, k: mask[b, h, q, k],
            nq,
            nk,
            B=B,
            H=H,
            block_q=block_q,
            block_k=block_k,
            device=mask.device,
        )

    # ------------------------------------------------------------------ properties
    @property
    def row_ptr(self) -> torch.Tensor:
        """CSR row offsets int32 ``[Bl*Hl*nqb + 1]``."""
        if self._row_ptr is None:
            self._csr_from_mask()
        return self._row_ptr

    @property
    def col_idx(self) -> torch.Tensor:
        """CSR key-block indices int32 ``[nnz]``, sorted within each row."""
        if self._col_idx is None:
            self._csr_from_mask()
        return self._col_idx

    def _csr_from_mask(self) -> None:
        bm = self._block_mask.reshape(-1, self.num_k_blocks)
        counts = bm.sum(-1)
        rp = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=bm.device)
        rp[1:] = counts.cumsum(0).to(torch.int32)
        self._row_ptr, self._col_idx = rp, bm.nonzero()[:, 1].to(torch.int32)

    @property
    def ldims(self) -> tuple[int, int, int, int, int, int]:
        """(q_len, k_len, block_q, block_k, batch, heads): the kernels' layout dimensions."""
        return (self.q_len, self.k_len, self.block_q, self.block_k, self.batch, self.heads)

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return _cdiv(self.k_len, self.block_k)

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    def known_block_density(self) -> float | None:
        """`block_density` when it is known on the host without a sync (CSR-built layouts), else None
        (layouts built on the device from a mask, e.g. LiteAttention's, whose count lives there)."""
        if self._col_idx is None:
            return None
        return self._col_idx.numel() / (self.batch * self.heads * self.num_q_blocks * self.num_k_blocks)

    @property
    def device(self) -> torch.device:
        return self._block_mask.device if self._col_idx is None else self._col_idx.device

    @property
    def has_element_mask(self) -> bool:
        return self.partial is not None

    def __repr__(self) -> str:
        return (
            f"BlockLayout(q_len={self.q_len}, k_len={self.k_len}, block=({self.block_q}, {self.block_k}), "
            f"batch={self.batch}, heads={self.heads}, nnz={self.nnz}, block_density={self.block_density:.3f}, "
            f"element_mask={self.has_element_mask})"
        )

    def to(self, device: torch.device | str) -> BlockLayout:
        """The layout on `device`: self when already there, else a copy made once and cached."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.device == device:
            return self
        moved = self._dense_cache.get(("to", str(device)))
        if moved is not None:
            return moved
        if self._col_idx is None:
            moved = BlockLayout.from_device_block_mask(
                self._block_mask.to(device), self.q_len, self.k_len, self.block_q, self.block_k
            )
        else:
            moved = BlockLayout(
                self.row_ptr.to(device),
                self.col_idx.to(device),
                q_len=self.q_len,
                k_len=self.k_len,
                block_q=self.block_q,
                block_k=self.block_k,
                batch=self.batch,
                heads=self.heads,
                partial=None if self.partial is None else self.partial.to(device),
                elem_mask=None if self.elem_mask is None else self.elem_mask.to(device),
                validate=False,
            )
        self._dense_cache[("to", str(device))] = moved
        return moved

    @property
    def is_full(self) -> bool:
        """True when every block is visited with no element mask (a dense layout). Cached."""
        if "is_full" not in self._dense_cache:
            self._dense_cache["is_full"] = self.partial is None and bool(self.to_block_mask().all())
        return self._dense_cache["is_full"]

    def _build_views(self) -> None:
        """Build the kernel lists (forward and backward) when the layout is made, outside any
        torch.compile trace, so a compiled call only reads them."""
        if not torch.compiler.is_compiling():
            self.kernel_view(backward=True)

    def kernel_view(self, backward: bool = False) -> KernelLayout:
        """The kernel's lists (see `KernelLayout`), built on the layout's device once and cached;
        ``backward=True`` adds the per-column lists of the backward pass (also cached)."""
        kv = self._kernel
        if kv is None:
            kv = self._kernel = self._build_forward_view()
            remember_owner(kv.all_idx, self)
        if backward and not kv.has_backward:
            kv = self._kernel = kv._replace(**self._build_backward_view())
        return kv

    def _tail_col(self) -> int:
        """Key block that is ragged (k_len not a multiple of block_k), or -1."""
        return self.num_k_blocks - 1 if self.k_len % self.block_k else -1

    def _build_forward_view(self) -> KernelLayout:
        dev, nkb = self.device, self.num_k_blocks
        nrows = self.batch * self.heads * self.num_q_blocks
        tail = self._tail_col()
        if self._col_idx is None:  # device-built: ELL lists, no host sync
            bm = self._block_mask.reshape(nrows, nkb)
            cols = torch.arange(nkb, device=dev)
            part = bm & (cols == tail)
            full = bm & (cols != tail)
            all_l = _ell_lists(bm)
            all_mask = torch.full_like(all_l[2], -1)
            part_l = _ell_lists(part)
            return KernelLayout(*_ell_lists(full), *part_l, torch.full_like(part_l[2], -1), *all_l, all_mask, None)
        rows = self._row_of_entries()
        col = self.col_idx.long()
        pidx = self.partial if self.partial is not None else torch.full_like(self.col_idx, -1)
        is_part = (pidx >= 0) | (col == tail)
        f, p = ~is_part, is_part
        return KernelLayout(
            *_csr_lists(rows[f], col[f], None, nrows),
            *_csr_lists(rows[p], col[p], pidx[p], nrows),
            self.row_ptr[:-1],
            self.row_ptr[1:],
            self.col_idx,
            pidx.contiguous(),
            self.elem_mask,
        )

    def _build_backward_view(self) -> dict:
        """Per key-block column: the query blocks of its full and partial entries (ascending)."""
        nqb, nkb = self.num_q_blocks, self.num_k_blocks
        ncols = self.batch * self.heads * nkb
        tail = self._tail_col()
        if self._col_idx is None:  # device-built: ELL over the transposed mask
            bm = self._block_mask.transpose(-1, -2).reshape(ncols, nqb)
            is_tail = (torch.arange(ncols, device=bm.device) % nkb == tail).view(-1, 1)
            full_l, part_l = _ell_lists(bm & ~is_tail), _ell_lists(bm & is_tail)
            names = ("t_full_begin", "t_full_end", "t_full_idx", "t_part_begin", "t_part_end", "t_part_idx")
            out = dict(zip(names, (*full_l, *part_l)))
            out["t_part_mask"] = torch.full_like(part_l[2], -1)
            return out
        rows = self._row_of_entries()
        bh, qb = rows // nqb, rows % nqb
        col = self.col_idx.long()
        cols = bh * nkb + col
        order = torch.argsort(cols * nqb + qb, stable=True)
        pidx = self.partial if self.partial is not None else torch.full_like(self.col_idx, -1)
        cols, qb, pidx, col = cols[order], qb[order], pidx[order], col[order]
        is_part = (pidx >= 0) | (col == tail)
        f, p = ~is_part, is_part
        fb, fe, fi = _csr_lists(cols[f], qb[f], None, ncols)
        pb, pe, pi, pm = _csr_lists(cols[p], qb[p], pidx[p], ncols)
        return dict(
            t_full_begin=fb, t_full_end=fe, t_full_idx=fi, t_part_begin=pb, t_part_end=pe, t_part_idx=pi, t_part_mask=pm
        )

    def _row_of_entries(self) -> torch.Tensor:
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def to_block_mask(self) -> torch.Tensor:
        """Dense bool ``[Bl, Hl, nqb, nkb]``: True where the block is visited."""
        if "block" in self._dense_cache:
            return self._dense_cache["block"]
        nqb, nkb = self.num_q_blocks, self.num_k_blocks
        out = torch.zeros(self.batch * self.heads * nqb, nkb, dtype=torch.bool, device=self.device)
        out[self._row_of_entries(), self.col_idx.long()] = True
        self._dense_cache["block"] = out.view(self.batch, self.heads, nqb, nkb)
        return self._dense_cache["block"]

    def partial_index(self) -> torch.Tensor:
        """Dense int32 ``[Bl, Hl, nqb, nkb]``: element-mask index of partial blocks, -1 elsewhere."""
        if "partial" in self._dense_cache:
            return self._dense_cache["partial"]
        nqb, nkb = self.num_q_blocks, self.num_k_blocks
        out = torch.full((self.batch * self.heads * nqb, nkb), -1, dtype=torch.int32, device=self.device)
        if self.partial is not None:
            out[self._row_of_entries(), self.col_idx.long()] = self.partial
        self._dense_cache["partial"] = out.view(self.batch, self.heads, nqb, nkb)
        return self._dense_cache["partial"]

    def row_token_mask(self, qb: int) -> torch.Tensor:
        """Token mask of query block ``qb``: bool ``[Bl, Hl, block_q, k_len]`` (tails masked)."""
        bm = self.to_block_mask()[:, :, qb]  # [Bl,Hl,nkb]
        tok = bm.unsqueeze(-2).repeat_interleave(self.block_k, -1).expand(-1, -1, self.block_q, -1).clone()
        if self.partial is not None:
            pidx = self.partial_index()[:, :, qb]  # [Bl,Hl,nkb]
            sel = pidx >= 0
            if bool(sel.any()):
                bits = _unpack_bits(self.elem_mask[pidx[sel].long()], self.block_k)  # [n, bq, bk]
                b, h, kb = sel.nonzero(as_tuple=True)
                view = tok.view(self.batch, self.heads, self.block_q, self.num_k_blocks, self.block_k)
                view[b, h, :, kb, :] = bits
        rows = torch.arange(qb * self.block_q, (qb + 1) * self.block_q, device=self.device) < self.q_len
        tok &= rows.view(1, 1, -1, 1)
        return tok[..., : self.k_len]

    def to_token_mask(self, b: int = 0, h: int = 0) -> torch.Tensor:
        """Dense bool ``[q_len, k_len]`` for batch entry ``b`` and head ``h`` (small sizes)."""
        bl = 0 if self.batch == 1 else b
        hl = 0 if self.heads == 1 else h
        rows = [self.row_token_mask(qb)[bl, hl] for qb in range(self.num_q_blocks)]
        return torch.cat(rows, 0)[: self.q_len]

    @property
    def block_density(self) -> float:
        """Fraction of (query block, key block) pairs visited."""
        return self.nnz / (self.batch * self.heads * self.num_q_blocks * self.num_k_blocks)

    @property
    def density(self) -> float:
        """Fraction of (query, key) token pairs visited, element masks and tails included."""
        total = 0
        for qb in range(self.num_q_blocks):
            total += int(self.row_token_mask(qb).sum())
        return total / (self.batch * self.heads * self.q_len * self.k_len)

    def with_key_mask(self, key_valid: torch.Tensor) -> BlockLayout:
        """This layout restricted to valid keys: ``key_valid`` bool ``[B, k_len]`` (e.g. text padding).

        Returns a layout with one row set per batch entry; blocks with no valid key are dropped,
        blocks with some invalid keys get (or AND into) an element mask. O(nnz) work.
        """
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool or key_valid.dim() != 2:
            raise TypeError(f"key_valid must be a bool tensor [B, k_len], got {_describe(key_valid)}")
        B, nk = key_valid.shape
        if nk != self.k_len or self.batch not in (1, B):
            raise ValueError(
                f"key_valid must be [B, k_len={self.k_len}] with B matching the layout batch {self.batch}; "
                f"got {tuple(key_valid.shape)}"
            )
        dev = self.device
        bq, bk, nkb = self.block_q, self.block_k, self.num_k_blocks
        kv = torch.nn.functional.pad(key_valid.to(dev), (0, nkb * bk - nk)).view(B, nkb, bk)
        beyond = (torch.arange(nkb * bk, device=dev) >= nk).view(nkb, bk)
        any_v = kv.any(-1)
        all_v = (kv | beyond).all(-1)
        key_bits = _pack_bits(kv)  # [B, nkb, words]
        words = key_bits.shape[-1]
        per_b = self.heads * self.num_q_blocks
        rp = self.row_ptr.long()
        ones = torch.full((bq, words), -1, dtype=torch.int32, device=dev)
        counts, cols, parts, elems = [], [], [], []
        n_elem = 0
        for b in range(B):
            bl = 0 if self.batch == 1 else b
            lo, hi = int(rp[bl * per_b]), int(rp[(bl + 1) * per_b])
            col = self.col_idx[lo:hi].long()
            rows = self._row_of_entries()[lo:hi] - bl * per_b
            keep = any_v[b, col]
            part = self.partial[lo:hi] if self.partial is not None else torch.full_like(col, -1, dtype=torch.int32)
            col, rows, part = col[keep], rows[keep], part[keep]
            needs = ~all_v[b, col] | (part >= 0)
            new_part = torch.full_like(part, -1)
            nneed = int(needs.sum())
            if nneed:
                base = ones.expand(nneed, bq, words)
                if self.partial is not None:
                    old = part[needs]
                    base = torch.where((old >= 0).view(-1, 1, 1), self.elem_mask[old.clamp(min=0).long()], base)
                elems.append(base & key_bits[b, col[needs]].unsqueeze(1))
                new_part[needs] = torch.arange(n_elem, n_elem + nneed, dtype=torch.int32, device=dev)
                n_elem += nneed
            counts.append(torch.bincount(rows, minlength=per_b))
            cols.append(col.to(torch.int32))
            parts.append(new_part)
        row_ptr = torch.zeros(B * per_b + 1, dtype=torch.int32, device=dev)
        row_ptr[1:] = torch.cat(counts).cumsum(0).to(torch.int32)
        return BlockLayout(
            row_ptr,
            torch.cat(cols),
            q_len=self.q_len,
            k_len=self.k_len,
            block_q=bq,
            block_k=bk,
            batch=B,
            heads=self.heads,
            partial=torch.cat(parts) if n_elem else None,
            elem_mask=torch.cat(elems) if n_elem else None,
        )

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSC view for the backward pass (cached): ``(col_ptr [Bl*Hl*nkb+1], row_idx [nnz],
        entry [nnz])`` where ``entry`` is the CSR position of each entry (to find its partial mask)."""
        if self._transpose is None:
            nqb, nkb = self.num_q_blocks, self.num_k_blocks
            rows = self._row_of_entries()
            bh = rows // nqb
            qb = rows % nqb
            key = (bh * nkb + self.col_idx.long()) * nqb + qb
            order = torch.argsort(key, stable=True)
            counts = torch.bincount(bh * nkb + self.col_idx.long(), minlength=self.batch * self.heads * nkb)
            col_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=self.device)
            col_ptr[1:] = counts.cumsum(0).to(torch.int32)
            self._transpose = (col_ptr, qb[order].to(torch.int32), order.to(torch.int32))
        return self._transpose


# The custom op receives tensors; the reference backend wants the objects that own them (their
# host-side caches). Keyed by id of an owned tensor, both held weakly, checked by identity.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def remember_owner(tensor: torch.Tensor, owner: object) -> None:
    """Record that `owner` (a layout or modifier) owns `tensor` (skipped while compiling)."""
    if torch.compiler.is_compiling():
        return
    key = id(tensor)
    hit = _OWNERS.get(key)
    if hit is not None and hit[0]() is tensor and hit[1]() is owner:
        return
    _OWNERS[key] = (weakref.ref(tensor, lambda _, key=key: _OWNERS.pop(key, None)), weakref.ref(owner))


def owner_of(tensor: torch.Tensor | None) -> object | None:
    """The object recorded by `remember_owner` for this very tensor, or None."""
    if tensor is None:
        return None
    hit = _OWNERS.get(id(tensor))
    if hit is not None and hit[0]() is tensor:
        return hit[1]()
    return None


#: BlockLayout.dense results, by (q_len, k_len, block_q, block_k, device)
_DENSE_CACHE: dict[tuple, BlockLayout] = {}


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__

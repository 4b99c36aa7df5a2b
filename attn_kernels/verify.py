"""Correctness checks that fail when a kernel is wrong: output and LSE against an exact reference.

Why not an absolute tolerance on random inputs: at Wan's 32,760 keys a row of random logits
averages thousands of values, |out| is about 0.04, and dropping the first and the ragged last key
block moves it by less than 0.006 -- inside any absolute tolerance a bf16 kernel needs. So the
checks here

* plant **peaked logits**: each checked query row gets one key (in the first, respectively the
  last, key block it visits) whose logit is ``peak`` above the rest, so that key carries almost
  all of the row's weight and a kernel that skips that block is off by about 100%;
* compare **row-relative** errors, ``||o_i - r_i|| / ||r_i||`` (rows that see nothing must be exactly
  0 with LSE ``-inf``), and the **LSE** (natural log) in absolute terms;
* compute the reference in float64 from the **same rounded inputs** the kernel read (bf16 q, k, v
  upcast), on the checked rows only (first and last rows: the ragged tail is always checked), with
  the layout's token mask (per head, element masks and key bounds included) and the modifiers'
  reference formulas.

`tests/kernels/test_verify.py` shows each check failing on a planted bug (first block dropped, tail
block dropped, wrong LSE) and `benchmarks/kernel_bench.py` gates every timing on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .layout import BlockLayout
from .modifiers import check_modifiers

__all__ = [
    "CheckResult",
    "TOLERANCES",
    "check_grads",
    "check_rows",
    "check_rows_of",
    "plant_peaks",
    "reference_rows",
    "rows_to_check",
]

#: (row-relative output error, absolute LSE error) allowed per input dtype. 16-bit: P is rounded
#: to 16 bits before P.V and the output is stored in 16 bits (about 2**-8 relative each); fp32
#: runs 3xTF32 up to head dim 64 and TF32 above (about 1e-3 relative). Errors from the planted
#: bugs are about 1 (output) and 1 or more (LSE).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.bfloat16: (2e-2, 2e-3),
    torch.float16: (1e-2, 2e-3),
    torch.float32: (5e-3, 1e-3),
}


@dataclass
class CheckResult:
    """What a check found: the worst row-relative output error, the worst LSE error, rows whose
    emptiness (LSE -inf, output 0) disagrees, and whether all are within tolerance."""

    rows: int
    out_rel_err: float
    lse_abs_err: float
    empty_mismatch: int
    tol_out: float
    tol_lse: float
    ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def rows_to_check(n: int, per_end: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first and the last `per_end` query rows (all rows when n <= 2 * per_end)."""
    if n <= 2 * per_end:
        return torch.arange(n, device=device)
    return torch.cat([torch.arange(per_end), torch.arange(n - per_end, n)]).to(device)


def _row_mask(layout: BlockLayout | None, rows: torch.Tensor, nq: int, nk: int, device) -> torch.Tensor:
    """bool [Bl, Hl, R, Nk]: which keys each checked row sees (tails and element masks included)."""
    if layout is None:
        return torch.ones(1, 1, rows.numel(), nk, dtype=torch.bool, device=device)
    lay = layout.to(device)
    blocks = rows.div(lay.block_q, rounding_mode="floor")
    out = torch.zeros(lay.batch, lay.heads, rows.numel(), nk, dtype=torch.bool, device=device)
    for qb in torch.unique(blocks).tolist():
        sel = (blocks == qb).nonzero(as_tuple=True)[0]
        tok = lay.row_token_mask(int(qb))  # [Bl, Hl, block_q, Nk]
        out[:, :, sel] = tok[:, :, rows[sel] - int(qb) * lay.block_q]
    return out


def plant_peaks(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: BlockLayout | None,
    rows: torch.Tensor,
    *,
    scale: float | None = None,
    peak: float = 16.0,
) -> torch.Tensor:
    """A copy of k in which each checked row gets a key of logit ``peak`` (scaled units): rows in
    the first half of `rows` peak at a key of the first block they visit, rows in the second half
    at a key of the last block they visit (the ragged tail for self-attention), a different key
    per row where the block allows. Returns k (same dtype); q is not changed."""
    B, H, nq, d = q.shape
    nk = k.shape[2]
    sc = d**-0.5 if scale is None else scale
    mask = _row_mask(layout, rows.to(q.device), nq, nk, q.device).expand(B, H, -1, -1)
    bk = layout.block_k if layout is not None else 128
    ar = torch.arange(nk, device=q.device)
    r = rows.numel()
    first = torch.arange(r, device=q.device) < (r + 1) // 2
    any_vis = mask.any(-1)  # [B, H, R]
    lo = torch.where(mask, ar, nk).amin(-1)  # first visible key
    hi = torch.where(mask, ar, -1).amax(-1)  # last visible key
    # the visited block's start, then an offset by the row's position, then the next visible key
    blk = torch.where(first, lo.div(bk, rounding_mode="floor"), hi.div(bk, rounding_mode="floor"))
    want = blk * bk + (torch.arange(r, device=q.device) % bk)
    cand = mask & (ar >= want[..., None])
    target = torch.where(cand.any(-1), torch.where(cand, ar, nk).amin(-1), torch.where(first, lo, hi))
    k2 = k.clone()
    qf = q.float()
    for b in range(B):
        for h in range(H):
            ok = any_vis[b, h]
            ii = rows.to(q.device)[ok]
            jj = target[b, h][ok]
            dirn = qf[b, h, ii]
            dirn = dirn / dirn.norm(dim=-1, keepdim=True).clamp_min(1e-6) ** 2  # q_i . dirn = 1
            k2[b, h, jj] = (dirn * (peak / sc)).to(k.dtype)
    return k2


def reference_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    rows: torch.Tensor,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (float64) attention for some query rows of the kernel's own inputs: (out [B,H,R,Dv]
    float64, lse [B,H,R] float64, natural log, -inf for rows that see nothing)."""
    B, H, nq, d = q.shape
    nk = k.shape[2]
    sc = d**-0.5 if scale is None else scale
    decay, mix = check_modifiers(tuple(modifiers), nq, nk, H)
    rows = rows.to(q.device)
    mask = _row_mask(layout, rows, nq, nk, q.device).expand(B, H, -1, -1)
    q64, k64, v64 = q[:, :, rows].double(), k.double(), v.double()
    s = torch.einsum("bhrd,bhnd->bhrn", q64, k64) * sc
    if decay is not None:
        qp, kp = decay.positions(nq, nk, q.device)
        s = decay.reference_scores(s, qp[rows], kp, decay.factors(H))  # float64 s stays float64
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhrn,bhnd->bhrd", p, v64)
    out = torch.where(torch.isinf(lse)[..., None], 0.0, out)
    if mix is not None:
        u = mix.weights(H).to(q.device).double().view(1, H, 1, 1)
        out = (1 - u) * out + u * v[:, :, rows].double()
    return out, lse


def check_rows(
    out_rows: torch.Tensor,
    lse_rows: torch.Tensor | None,
    ref_out: torch.Tensor,
    ref_lse: torch.Tensor,
    dtype: torch.dtype,
    tol: tuple[float, float] | None = None,
) -> CheckResult:
    """Compare a kernel's rows with `reference_rows`' (see the module docstring for the metrics)."""
    tol_out, tol_lse = tol if tol is not None else TOLERANCES[dtype]
    o, r = out_rows.double(), ref_out.double()
    empty = torch.isinf(ref_lse) & (ref_lse < 0)
    num = (o - r).norm(dim=-1)
    den = r.norm(dim=-1)
    rel = torch.where(empty, torch.where(num > 0, torch.inf, 0.0), num / den.clamp_min(1e-12))
    out_err = float(rel.max()) if rel.numel() else 0.0
    mismatch = int((empty & (num > 0)).sum())
    lse_err = 0.0
    if lse_rows is not None:
        got = lse_rows.double()
        got_empty = torch.isinf(got) & (got < 0)
        mismatch += int((got_empty != empty).sum())
        both = ~empty & ~got_empty
        if bool(both.any()):
            lse_err = float((got[both] - ref_lse[both]).abs().max())
        if bool(torch.isnan(got).any()):
            lse_err = float("inf")
    if bool(torch.isnan(o).any()):
        out_err = float("inf")
    ok = out_err <= tol_out and lse_err <= tol_lse and mismatch == 0
    return CheckResult(int(rel.numel()), out_err, lse_err, mismatch, tol_out, tol_lse, ok)


def check_rows_of(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
    tol: tuple[float, float] | None = None,
) -> CheckResult:
    """`reference_rows` + `check_rows` for a kernel's full outputs (out [B,H,Nq,Dv], lse [B,H,Nq])."""
    ref_out, ref_lse = reference_rows(q, k, v, layout, rows, scale=scale, modifiers=modifiers)
    rows = rows.to(out.device)
    return check_rows(
        out[:, :, rows], None if lse is None else lse[:, :, rows], ref_out, ref_lse, q.dtype, tol
    )  # fmt: skip


def check_grads(
    fn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    rows: torch.Tensor,
    *,
    scale: float | None = None,
    modifiers: tuple = (),
    tol: float | None = None,
    seed: int = 0,
) -> dict:
    """Gradients of ``fn(q, k, v) -> out`` against float64 autograd of `reference_rows`, with an
    output gradient that is zero outside `rows` (so the exact reference needs those rows only):
    relative L2 errors of dq (on `rows`), dk and dv; ok when all are within `tol` (16-bit: 3e-2)."""
    g = torch.Generator(device=q.device).manual_seed(seed)
    B, H, nq, _ = q.shape
    go_rows = torch.randn(B, H, rows.numel(), v.shape[-1], generator=g, device=q.device, dtype=torch.float32)
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv)
    go = torch.zeros_like(out)
    go[:, :, rows.to(q.device)] = go_rows.to(out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), go)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, _ = reference_rows(q64, k64, v64, layout, rows, scale=scale, modifiers=modifiers)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), go.double()[:, :, rows.to(q.device)])
    r = rows.to(q.device)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a = a.double()
        if bool(torch.isnan(a).any()):
            return float("inf")
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    errs = {"dq_rel_err": rel(dq[:, :, r], rq[:, :, r]), "dk_rel_err": rel(dk, rk), "dv_rel_err": rel(dv, rv)}
    # rows outside `rows` received no gradient: their dq must be exactly 0
    outside = torch.ones(nq, dtype=torch.bool, device=q.device)
    outside[r] = False
    errs["dq_outside_max"] = float(dq[:, :, outside].abs().max()) if bool(outside.any()) else 0.0
    limit = tol if tol is not None else (1e-3 if q.dtype == torch.float32 else 3e-2)
    ok = max(errs["dq_rel_err"], errs["dk_rel_err"], errs["dv_rel_err"]) <= limit and errs["dq_outside_max"] == 0
    return {**errs, "tol": limit, "ok": ok}

"""Naive dense-mask oracle: full N x N softmax written from the definition (tiny sizes only)."""

from __future__ import annotations

import torch


def naive_attention(q, k, v, token_mask=None, *, scale=None, decay=None, mix=None):
    """token_mask bool [Bm, Hm, Nq, Nk]; decay=(factor[H], threshold, q_pos, k_pos); mix=u[H]."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if decay is not None:
        f, thr, qp, kp = decay
        far = ((qp[:, None] - kp[None, :]).abs() > thr) & (qp[:, None] >= 0) & (kp[None, :] >= 0)
        s = torch.where(far & (s > 0), s * f.double().view(1, -1, 1, 1), s)
    if token_mask is not None:
        s = s.masked_fill(~token_mask, float("-inf"))
    p = torch.softmax(s, -1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no key -> 0
    o = p @ v
    if mix is not None:
        u = mix.double().view(1, -1, 1, 1)
        o = (1 - u) * o + u * v
    return o

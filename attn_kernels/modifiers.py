"""Fused score / output modifiers and LiteAttention's tile statistics.

A modifier is a small frozen dataclass with a reference implementation (used by the PyTorch
reference and as the test oracle) and the arguments the Triton kernel needs. Score modifiers
act on the scaled logits ``s = q.k * scale`` before the softmax; output modifiers act on the
normalised output row. Adding one means adding a class here plus its branch in the kernel's
modifier hook; the kernel's main loop does not change.

Modifiers are validated once, when they are built (a tensor argument may sync once there), and
`prepare_modifiers` caches their device tensors per (heads, lengths, device) on the modifier, so
an attention call with a modifier does no host work in steady state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import remember_owner

__all__ = ["LogitDecay", "OutputMix", "TileStats", "check_modifiers", "prepare_modifiers"]


def _check_values(name: str, value: float | torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Validate a float or 1-D tensor of per-head values once; returns it as fp32 (0-D or [H])."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 1-D tensor of per-head values, got {value!r}")
    t = torch.as_tensor(value, dtype=torch.float32).detach()
    if t.dim() > 1:
        raise ValueError(f"{name} must be a float or a 1-D tensor [H], got shape {tuple(t.shape)}")
    tc = t.cpu()
    if not bool(torch.isfinite(tc).all()) or bool((tc < lo).any()) or bool((tc > hi).any()):
        raise ValueError(f"{name} values must be in [{lo}, {hi}], got {tc.tolist()}")
    return t


def _per_head(name: str, t: torch.Tensor, heads: int) -> torch.Tensor:
    """A validated 0-D / [H] tensor as [heads] (shape check only: no host sync)."""
    if t.dim() == 0:
        return t.expand(heads).contiguous()
    if t.shape != (heads,):
        raise ValueError(f"{name} must be a float or a tensor of shape [H]=[{heads}], got shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True, eq=False)
class LogitDecay:
    """UltraViCo: for ``|q_pos - k_pos| > threshold`` and ``s > 0``: ``s <- factor * s``.

    factor: float or fp32 ``[H]`` in [0, 1]; threshold: token distance (>= 0).
    q_pos / k_pos: int positions ``[Nq]`` / ``[Nk]`` (default ``arange``); a negative position
    marks an exempt token (e.g. text) that is never decayed.
    """

    factor: float | torch.Tensor
    threshold: int
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_factor", _check_values("LogitDecay.factor", self.factor, 0.0, 1.0))
        object.__setattr__(self, "_prepared", {})
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 0:
            raise ValueError(f"LogitDecay.threshold must be an int >= 0, got {self.threshold!r}")
        for name in ("q_pos", "k_pos"):
            p = getattr(self, name)
            if p is not None and (not isinstance(p, torch.Tensor) or p.dim() != 1 or p.is_floating_point()):
                raise TypeError(f"LogitDecay.{name} must be a 1-D integer tensor, got {p!r}")

    def factors(self, heads: int) -> torch.Tensor:
        """fp32 [heads] (values validated at construction)."""
        return _per_head("LogitDecay.factor", self._factor, heads)

    def prepare(self, heads: int, nq: int, nk: int, device: torch.device) -> tuple:
        """(factors [H] fp32, threshold, q_pos [Nq] int32, k_pos [Nk] int32) on `device`, cached."""
        key = (heads, nq, nk, str(device))
        hit = self._prepared.get(key)
        if hit is None:
            qp, kp = self.positions(nq, nk, device)
            hit = (self.factors(heads).to(device).contiguous(), int(self.threshold), qp.contiguous(), kp.contiguous())
            self._prepared[key] = hit
            remember_owner(hit[0], self)
        return hit

    def positions(self, nq: int, nk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        qp = torch.arange(nq, device=device) if self.q_pos is None else self.q_pos.to(device)
        kp = torch.arange(nk, device=device) if self.k_pos is None else self.k_pos.to(device)
        if qp.numel() != nq or kp.numel() != nk:
            raise ValueError(
                f"LogitDecay.q_pos/k_pos must have Nq={nq} / Nk={nk} entries, got {qp.numel()} / {kp.numel()}"
            )
        return qp.to(torch.int32), kp.to(torch.int32)

    def reference_scores(
        self, s: torch.Tensor, qp_rows: torch.Tensor, kp: torch.Tensor, factors: torch.Tensor
    ) -> torch.Tensor:
        """s: fp32 ``[B, H, rows, Nk]``; qp_rows / kp: positions of those rows / all keys; factors [H]."""
        qp_rows, kp = qp_rows.long(), kp.long()
        far = ((qp_rows[:, None] - kp[None, :]).abs() > self.threshold) & (qp_rows[:, None] >= 0) & (kp[None, :] >= 0)
        f = factors.to(s.device).view(1, -1, 1, 1)
        return torch.where(far & (s > 0), s * f, s)


@dataclass(frozen=True, eq=False)
class OutputMix:
    """SoftPAG: ``out_i <- (1 - u_h) * attn_i + u_h * v_i`` (needs Nq == Nk).

    u: float or fp32 ``[H]`` in [0, 1] (0 = plain attention, 1 = identity map).
    """

    u: float | torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "_u", _check_values("OutputMix.u", self.u, 0.0, 1.0))
        object.__setattr__(self, "_prepared", {})

    def weights(self, heads: int) -> torch.Tensor:
        """fp32 [heads] (values validated at construction)."""
        return _per_head("OutputMix.u", self._u, heads)

    def prepare(self, heads: int, device: torch.device) -> torch.Tensor:
        """u as fp32 [heads] on `device`, cached."""
        key = (heads, str(device))
        hit = self._prepared.get(key)
        if hit is None:
            hit = self._prepared[key] = self.weights(heads).to(device).contiguous()
            remember_owner(hit, self)
        return hit

    def reference_output(self, o: torch.Tensor, v_rows: torch.Tensor, heads: int) -> torch.Tensor:
        u = self.weights(heads).to(o.device).view(1, heads, 1, 1)
        return (1 - u) * o + u * v_rows


@dataclass
class TileStats:
    """LiteAttention feedback: ask the kernel which visited tiles were needed.

    A visited (query block, key block) tile is *needed* when some valid row has
    ``(tile_rowmax - running_rowmax_before_tile) * log2(e) > threshold`` on the scaled logits
    (tiles visited in ascending key-block order). After the call ``needed`` holds uint8
    ``[B, H, nqb, nkb]`` (0 for skippable or unvisited tiles). Inference only.
    """

    threshold: float = -10.0
    needed: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not self.threshold < 0  # also refuses NaN
            or self.threshold == float("-inf")
        ):
            raise ValueError(
                f"TileStats.threshold must be a finite negative number (log2 domain), got {self.threshold!r}"
            )


def _check_heads(name: str, t: torch.Tensor, heads: int) -> None:
    """`_per_head`'s shape rule without building the [heads] tensor (per-call checks allocate nothing)."""
    if t.dim() != 0 and t.shape != (heads,):
        raise ValueError(f"{name} must be a float or a tensor of shape [H]=[{heads}], got shape {tuple(t.shape)}")


def check_modifiers(modifiers: tuple, nq: int, nk: int, heads: int) -> tuple[LogitDecay | None, OutputMix | None]:
    """Check a modifier tuple against a call's shapes (no host sync); returns (decay, mix)."""
    decay = mix = None
    for m in modifiers:
        if isinstance(m, LogitDecay):
            if decay is not None:
                raise ValueError("modifiers: LogitDecay given twice")
            _check_heads("LogitDecay.factor", m._factor, heads)
            for name, p, n in (("q_pos", m.q_pos, nq), ("k_pos", m.k_pos, nk)):
                if p is not None and p.numel() != n:
                    raise ValueError(f"LogitDecay.{name} must have {n} entries for this call, got {p.numel()}")
            decay = m
        elif isinstance(m, OutputMix):
            if mix is not None:
                raise ValueError("modifiers: OutputMix given twice")
            if nq != nk:
                raise ValueError(f"OutputMix needs self-attention (Nq == Nk), got Nq={nq}, Nk={nk}")
            _check_heads("OutputMix.u", m._u, heads)
            mix = m
        else:
            raise TypeError(f"modifiers: unknown modifier {type(m).__name__}; expected LogitDecay or OutputMix")
    return decay, mix


def prepare_modifiers(
    modifiers: tuple, heads: int, nq: int, nk: int, device: torch.device
) -> tuple[tuple | None, torch.Tensor | None]:
    """(decay kernel arguments or None, OutputMix u [H] or None) on `device`, cached per modifier."""
    decay, mix = check_modifiers(modifiers, nq, nk, heads) if modifiers else (None, None)
    return (
        None if decay is None else decay.prepare(heads, nq, nk, device),
        None if mix is None else mix.prepare(heads, device),
    )

"""AgentSD (Han et al., "Agent Attention", the Stable Diffusion experiments; LeapLabTHU/Agent-Attention
`agentsd/`): training-free agent attention on ToMe-merged tokens in a diffusion model's self-attention.

Per self-attention call at the highest-resolution UNet level (our own code, the official semantics):

1. **Token merging** (ToMeSD's bipartite soft matching): the h x w tokens are split into one
   destination per `stride x stride` window (the top-left one, or a random one per window when
   `use_rand` and the batch is even, as ToMeSD: an odd batch cannot hold both CFG halves) and the
   sources; each source's best destination is its most cosine-similar one under the merge metric.
   The r = int(N * merge_ratio) sources with the highest similarity are averaged into their
   destinations (`scatter_reduce` mean, the destination included), leaving N - r tokens.
2. **Agents**: the same matching merges agent_r = int(N * agent_ratio) sources (both r and agent_r
   capped at the number of sources), leaving n = N - agent_r agent tokens A.
3. When 2·n < N - r (the official condition), on the merged q, k, v:
   ``O = softmax(Q·Aᵀ·s^e) · softmax(A·Kᵀ·s) · V + shortcut · V`` with s = head_dim^-0.5, e = 0.3
   (`agent_scale_exponent`), shortcut = 0.075; otherwise (`fallback="tome"`, the official behaviour)
   softmax attention on the merged tokens, or (`fallback="softmax"`) the model's own attention,
   bit-exact. The output is un-merged back to N tokens (each merged source gets its destination's).
4. Official schedule (the AgentSD README): steps 0-19 stride 4, merge ratio 0.4, agent ratio 0.95;
   from step 20 stride 2, merge ratio 0.4, agent ratio 0.5, where 2·n < N - r never holds, so late
   steps run ToMe (`fallback`). Self-attention only; cross-attention is never merged.

Choices where the official code (a patch of the LDM / diffusers block forward) differs from a
processor plug-in, all exact up to float rounding:
* q, k, v are projected first and merged after (the official code merges the normalised hidden
  states and projects them): `to_q` / `to_k` / `to_v` are affine and merging is a convex average,
  so both give the same tokens; the agents are the merged queries (official: `to_q(agents)`).
  `to_out` runs on the un-merged output (official: before un-merging; `to_out` acts per token).
* Merge metric: the `BasicTransformerBlock` input (ToMeSD's), handed over by the UNet adapter;
  where no adapter provides it, the keys averaged over heads (ToMe's metric for ViTs).
* "Highest-resolution blocks": `max_downsample=None` takes the UNet level of the first hooked
  self-attention layer (SD 1.x/2.x: the full latent resolution, the official `max_downsample=1`;
  SDXL, which has no attention at full resolution: its 2x-downsampled level). An int is the
  official option (a level's downsampling factor relative to the latent).
* Random destinations come from a generator seeded with `seed` at every new generation and drawn on
  the call's device (ToMeSD draws from a global generator): the same seed gives the same images.

DiT option (`dit=True`, FLUX / SD3 joint attention; not in the paper, our choices): only the image
tokens are merged, on their 2-D grid, with the keys averaged over heads (after the model's norms and
RoPE: merged queries and keys are averages of rotated vectors) as the metric; the agents attend to
the text keys and the merged image keys; image queries attend to the agents; the shortcut adds the
merged image values. Text queries keep exact softmax attention over all (unmerged) keys. Every
joint-attention layer takes part unless `layers` lists some (SD3.5's image-only `attn2` included).

Kernel: `attn_kernels.agent_attention` (fused Triton) runs on CUDA when it fits (at most 128 agents,
head dim padded to 16/32/64/128 with zeros, which change no score); otherwise, and on CPU, the eager
formula. The agents' stage-2 scale s^e is applied by scaling Q by s^(e-1) (the kernel takes one
scale). Host work: none per call (shapes only; merging is gathers and scatters on the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

import attn_kernels
from attn_spec import Length, OneOf, Range

from .base import AttnContext, AttnPlan, FamiliesWhere, Variant, adapter_of, check_options, register_variant

__all__ = ["AgentSD", "ToMeMerge", "agent_formula"]

_KERNEL_HEAD_DIMS = (16, 32, 64, 128)
_KERNEL_MAX_AGENTS = 128
_FALLBACKS = ("tome", "softmax")
#: a fraction of the tokens merged, in [0, 1) (the first range also refuses non-numbers and NaN)
_MergeRatio = Annotated[float, Range(0.0, 1.0), Range(0, 1, hi_open=True)]
#: a fraction of the merged tokens kept as agents, in (0, 1]
_AgentRatio = Annotated[float, Range(0.0, 1.0), Range(0, 1, lo_open=True)]


class ToMeMerge:
    """ToMeSD's bipartite soft matching of one call (device ops only; shapes from sizes, never values).

    metric [B, N, C] on an h x w grid (row-major); destinations one per (sy, sx) window (`rand_idx`
    [h // sy, w // sx] picks which, None = top-left); r sources merged for the queries, agent_r for the
    agents (agents only when 2·(N - agent_r) < N - r)."""

    def __init__(
        self,
        metric: torch.Tensor,
        h: int,
        w: int,
        sx: int,
        sy: int,
        r: int,
        agent_r: int,
        rand_idx: torch.Tensor | None = None,
    ) -> None:
        B, N, _ = metric.shape
        dev = metric.device
        hsy, wsx = h // sy, w // sx
        buf = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64, device=dev)
        pick = torch.zeros(hsy, wsx, 1, dtype=torch.int64, device=dev) if rand_idx is None else rand_idx[..., None]
        buf.scatter_(2, pick, -1)
        buf = buf.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if hsy * sy < h or wsx * sx < w:  # windows do not tile the grid: the rest are sources
            full = torch.zeros(h, w, dtype=torch.int64, device=dev)
            full[: hsy * sy, : wsx * sx] = buf
            buf = full
        order = buf.reshape(-1).argsort(stable=True)  # destinations (-1) first
        num_dst = hsy * wsx
        self.a_idx, self.b_idx = order[num_dst:], order[:num_dst]  # sources, destinations
        self.B, self.N, self.num_dst = B, N, num_dst
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, self.a_idx] @ m[:, self.b_idx].transpose(-1, -2)  # [B, Ns, Nd] cosine
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)  # most similar sources first
        ns = N - num_dst
        self.r = r = min(ns, r)
        self.unm_idx, self.src_idx = edge_idx[:, r:], edge_idx[:, :r]
        self.dst_idx = node_idx.gather(1, self.src_idx)
        agent_r = min(ns, agent_r)
        self.has_agents = (N - agent_r) * 2 < N - r
        self.agent_r = agent_r
        self.num_agents = N - agent_r
        if self.has_agents:
            self.a_unm_idx, self.a_src_idx = edge_idx[:, agent_r:], edge_idx[:, :agent_r]
            self.a_dst_idx = node_idx.gather(1, self.a_src_idx)

    @staticmethod
    def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [B, H, M, D] gathered along tokens by idx [B, m] (or [m])."""
        B, H, _, D = x.shape
        if idx.dim() == 1:
            return x[:, :, idx]
        return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))

    def _merge(self, x: torch.Tensor, unm: torch.Tensor, src: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
        B, H, _, D = x.shape
        srcs, dsts = self._take(x, self.a_idx), self._take(x, self.b_idx)
        moved = self._take(srcs, src)
        idx = dst_idx[:, None, :, None].expand(B, H, dst_idx.shape[1], D)
        merged = dsts.scatter_reduce(2, idx, moved, reduce="mean")  # include_self: the destination counts too
        return torch.cat([self._take(srcs, unm), merged], dim=2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, D] -> [B, H, N - r, D]: unmerged sources, then destinations (with their merged sources)."""
        return self._merge(x, self.unm_idx, self.src_idx, self.dst_idx)

    def agents(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, D] -> [B, H, N - agent_r, D], the agent tokens (call only when `has_agents`)."""
        return self._merge(x, self.a_unm_idx, self.a_src_idx, self.a_dst_idx)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, H, N - r, D] -> [B, H, N, D]: every merged source gets its destination's row."""
        B, H, _, D = y.shape
        n_unm = self.unm_idx.shape[1]
        unm, dst = y[:, :, :n_unm], y[:, :, n_unm:]
        out = y.new_zeros(B, H, self.N, D)

        def put(index: torch.Tensor, src: torch.Tensor) -> None:
            idx = index if index.dim() == 2 else index.expand(B, -1)
            out.scatter_(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D), src)

        put(self.b_idx[None], dst)
        put(self.a_idx[self.unm_idx], unm)
        put(self.a_idx[self.src_idx], self._take(dst, self.dst_idx))
        return out


def agent_formula(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, scale: float, exponent: float
) -> torch.Tensor:
    """Eager ``softmax(q·aᵀ·scale^exponent) · softmax(a·kᵀ·scale) · v`` (no shortcut), [B, H, *, D]."""
    agent_v = torch.softmax(agents @ k.transpose(-1, -2) * scale, dim=-1) @ v
    return torch.softmax(q @ agents.transpose(-1, -2) * scale**exponent, dim=-1) @ agent_v


_ZEROS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _zero_biases(n: int, N: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (n, N, str(device), dtype)
    hit = _ZEROS.get(key)
    if hit is None:
        if len(_ZEROS) > 32:
            _ZEROS.pop(next(iter(_ZEROS)))
        hit = _ZEROS[key] = (
            torch.zeros(1, n, N, device=device, dtype=dtype),
            torch.zeros(1, N, n, device=device, dtype=dtype),
        )
    return hit


def _kernel_misfit(q: torch.Tensor, n: int) -> str | None:
    """Why the fused agent kernel cannot take this call (None when it can)."""
    if q.shape[-1] > _KERNEL_HEAD_DIMS[-1]:
        return f"head dim {q.shape[-1]} > {_KERNEL_HEAD_DIMS[-1]}"
    if n > _KERNEL_MAX_AGENTS:
        return f"{n} agents > {_KERNEL_MAX_AGENTS}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    return None


def agent_attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    scale: float,
    exponent: float,
    backend: str,
    upcast: bool = False,
) -> torch.Tensor:
    """The agent formula on the fused kernel when it can run (see the module docstring), else eager.

    backend: the runtime's kernel backend; "reference" always runs the eager formula, "triton" must
    use the kernel (RuntimeError naming the reason when it cannot), "auto" uses it on CUDA when it fits."""
    import os

    n = agents.shape[2]
    misfit = _kernel_misfit(q, n)
    can_run = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    use_kernel = backend == "triton" or (backend == "auto" and q.is_cuda and misfit is None)
    if backend == "triton" and (misfit is not None or not can_run):
        why = misfit or "tensors are not on CUDA and TRITON_INTERPRET is not set"
        raise RuntimeError(f"AgentSD: the agent-attention kernel cannot run this call ({why}); use backend 'auto'")
    dtype = q.dtype
    if upcast:
        q, k, v, agents = q.float(), k.float(), v.float(), agents.float()
    if not use_kernel:
        return agent_formula(q, k, v, agents, scale, exponent).to(dtype)
    from attn_kernels.agent_attn import agent_attention

    D = q.shape[-1]
    Dp = next(d for d in _KERNEL_HEAD_DIMS if d >= D)
    if Dp != D:  # zero columns change no dot product
        pad = lambda t: torch.nn.functional.pad(t, (0, Dp - D))  # noqa: E731
        q, k, agents, v = pad(q), pad(k), pad(agents), pad(v)
    b1, b2 = _zero_biases(n, k.shape[2], q.device, q.dtype)
    qs = q * (scale ** (exponent - 1.0))  # stage 2 at scale^exponent, stage 1 at scale
    out = agent_attention(qs, k, v, agents, b1, b2, scale, backend="triton")
    return out[..., :D].to(dtype)


@register_variant
@dataclass
class AgentSD(Variant):
    """AgentSD: agent attention on ToMe-merged tokens in self-attention, training-free (see module docstring).

    merge_ratio / agent_ratio / stride: steps [0, switch_step); late_*: from switch_step on (official:
    0.4 / 0.95 / 4, then 0.4 / 0.5 / 2 from step 20). agent_scale_exponent (0.3) and shortcut (0.075):
    the formula's constants. max_downsample: UNet levels that take part (None: the highest-resolution
    level with attention). fallback: when 2·agents >= merged tokens, "tome" (softmax on the merged tokens,
    official) or "softmax" (the model's own attention). use_rand / seed: random destinations (even
    batches, as ToMeSD). upcast: agent scores in fp32 (official attn_precision="fp32", SD 2.1). dit:
    allow FLUX / SD3 (image tokens only). layers: only these hooked layers (None: all that qualify).
    """

    name: ClassVar[str] = "agentsd"
    role: ClassVar[str] = "sparsity"
    # the image families (an adapter without `default_fps`): UNets, and DiTs with `dit=True`
    families: ClassVar[tuple[str, ...] | None] = FamiliesWhere(lambda a: a.default_fps is None, "images")

    merge_ratio: _MergeRatio = 0.4
    agent_ratio: _AgentRatio = 0.95
    stride: Annotated[int, Range(1, None)] = 4
    switch_step: Annotated[int, Range(0, None)] = 20
    late_merge_ratio: _MergeRatio = 0.4
    late_agent_ratio: _AgentRatio = 0.5
    late_stride: Annotated[int, Range(1, None)] = 2
    agent_scale_exponent: Annotated[float, Range(0.0, 4.0), Range(0, 4, lo_open=True)] = 0.3
    shortcut: Annotated[float, Range(0.0, 1.0)] = 0.075
    max_downsample: Annotated[int | None, Range(1, None)] = None
    fallback: Annotated[str, OneOf(*_FALLBACKS)] = "tome"
    use_rand: bool = True
    seed: Annotated[int, Range(0, 2**63 - 1)] = 0
    upcast: bool = False
    dit: bool = False
    layers: Annotated[
        tuple[int, ...] | None,
        Range(0, None),
        Length(
            1, None, noun="layer", message="{name} must be a non-empty tuple of layer indices or None, got {value!r}"
        ),
    ] = None

    def __post_init__(self) -> None:
        check_options(self)  # the ranges declared on the fields above
        for f in ("use_rand", "upcast", "dit"):
            if not isinstance(getattr(self, f), bool):
                raise TypeError(f"AgentSD.{f} must be bool, got {getattr(self, f)!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (tuple, list)):
                raise ValueError(f"AgentSD.layers must be a tuple of layer indices or None, got {self.layers!r}")
            self.layers = tuple(self.layers)
        self._gens: dict[str, torch.Generator] = {}
        self._top_downsample: int | None = None

    # -- apply-time checks ------------------------------------------------------------------
    def check_apply(self, family: str, modules: list, variants: tuple) -> None:
        if not adapter_of(family).multilevel and not self.dit:
            raise ValueError(
                f"AgentSD on {family} (a DiT) is an option with its own choices (image tokens only, text queries "
                "exact; see diffusion_attn/variants/agentsd.py): pass AgentSD(dit=True)"
            )
        if self.layers is not None and max(self.layers) >= len(modules):
            raise ValueError(
                f"AgentSD.layers must index the {len(modules)} hooked attention layers [0, {len(modules)}), "
                f"got {self.layers}"
            )

    def phase_steps(self, family: str, num_steps: int | None = None) -> tuple[int, ...]:
        return (0, self.switch_step) if self.switch_step > 0 else (0,)

    def reset(self) -> None:
        """New generation: the random destinations start again from `seed`."""
        self._gens.clear()

    # -- per call ---------------------------------------------------------------------------
    def phase(self, step: int) -> tuple[float, float, int]:
        """(merge ratio, agent ratio, stride) at denoising step `step`."""
        if step < self.switch_step:
            return self.merge_ratio, self.agent_ratio, self.stride
        return self.late_merge_ratio, self.late_agent_ratio, self.late_stride

    def sizes(self, n_tokens: int, h: int, w: int, step: int) -> tuple[int, int, int, int] | None:
        """(r, agent_r, stride, merged tokens) of a call with n_tokens on an h x w grid, None = no merging
        (too few tokens, or no destination window fits the grid), with r and agent_r capped as ToMeSD."""
        ratio, agent_ratio, s = self.phase(step)
        if h // s < 1 or w // s < 1:
            return None
        r = int(n_tokens * ratio)
        if r <= 0:
            return None
        ns = n_tokens - (h // s) * (w // s)
        return min(ns, r), min(ns, int(n_tokens * agent_ratio)), s, n_tokens - min(ns, r)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = self._gens[key] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    def plan(self, ctx: AttnContext, plan: AttnPlan) -> AttnPlan:
        lay = ctx.layout
        if adapter_of(lay.family).multilevel:  # a UNet: only its highest-resolution levels
            if ctx.layer == 0:
                self._top_downsample = lay.downsample
            top = self.max_downsample if self.max_downsample is not None else self._top_downsample
            if top is None or lay.downsample > top:
                return plan  # a lower-resolution level: the model's own attention
        if self.layers is not None and ctx.layer not in self.layers:
            return plan
        if lay.frames != 1:
            return plan
        _, h, w = lay.grid
        sizes = self.sizes(h * w, h, w, ctx.step)
        if sizes is None:
            return plan
        r, agent_r, s, merged = sizes
        agents = (h * w - agent_r) * 2 < merged
        if not agents and self.fallback == "softmax":
            return plan
        rand = self.use_rand and ctx.batch % 2 == 0
        gen = self._generator(ctx.device) if rand else None
        extras = plan.extras
        exponent, shortcut, upcast = self.agent_scale_exponent, self.shortcut, self.upcast

        def compute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
            vis, txt = lay.visual_slice, lay.text_slice
            qi, ki, vi = q[:, :, vis], k[:, :, vis], v[:, :, vis]
            metric = extras.get("metric")
            if metric is None or metric.shape[1] != h * w:
                metric = ki.mean(dim=1)  # ToMe's ViT metric: keys averaged over heads
            rand_idx = None
            if gen is not None:
                rand_idx = torch.randint(s * s, (h // s, w // s), generator=gen, device=gen.device).to(q.device)
            tm = ToMeMerge(metric, h, w, s, s, r, agent_r, rand_idx)
            qm, km, vm = tm.merge(qi), tm.merge(ki), tm.merge(vi)
            scale = q.shape[-1] ** -0.5
            if lay.text_len:  # DiT: the text keys join the merged image keys
                kk, vv = torch.cat([k[:, :, txt], km], 2), torch.cat([v[:, :, txt], vm], 2)
            else:
                kk, vv = km, vm
            if tm.has_agents:
                out_m = agent_attention_call(qm, kk, vv, tm.agents(qi), scale, exponent, backend, upcast)
                out_m = out_m + shortcut * vm
            else:
                out_m = attn_kernels.attention(qm, kk, vv, None, backend=backend)
            out_i = tm.unmerge(out_m)
            if not lay.text_len:
                return out_i
            out_t = attn_kernels.attention(q[:, :, txt], k, v, None, backend=backend)  # text queries: exact, all keys
            parts = [out_t, out_i] if lay.text_first else [out_i, out_t]
            return torch.cat(parts, dim=2)

        plan.compute = compute
        return plan


def expected_agents(n_tokens: int, h: int, w: int, ratio: float, agent_ratio: float, stride: int) -> int:
    """Agent tokens AgentSD uses for a call (0 when 2·agents >= merged tokens): a helper for tests and docs."""
    ns = n_tokens - (h // stride) * (w // stride)
    r = min(ns, int(n_tokens * ratio))
    agent_r = min(ns, int(n_tokens * agent_ratio))
    n = n_tokens - agent_r
    return n if 2 * n < n_tokens - r and r > 0 else 0

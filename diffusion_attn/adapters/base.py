"""What every adapter shares: the per-transformer runtime (grid, per-branch variant state, plan,
kernel call), the base attention processor, and the adapter registry.

An adapter knows one model family: which attention modules to hook, which diffusers processors
it reproduces exactly (any other is refused before patching), how to read the token grid from the
transformer's forward arguments, and a processor that computes q, k, v exactly as the model's own
processor does before handing them to `AttnRuntime.run`.

Per attention call a processor first asks the variants for a plan (from shapes only). A dense
plan runs the model's own processor unchanged: the user's `set_attention_backend`, diffusers'
context parallelism, masks and extra inputs all behave exactly as without attnplug. Only sparse
plans compute q, k, v here and call `attn_kernels.attention`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..clock import STEP_SOURCES, StepClock
from ..variants.base import AttnContext, AttnPlan, TokenLayout, Variant
from .latent import LatentRule, rule_from_dir, token_grid

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AttnRuntime",
    "SparseProcessor",
    "STEP_SOURCES",
    "find_adapter",
    "register_adapter",
    "logger",
]


def _get_logger() -> logging.Logger:
    from diffusers.utils.logging import get_logger

    # under diffusers' root logger: `diffusers.utils.logging.set_verbosity_info()` shows our INFO lines
    return get_logger("diffusers.attnplug")


logger = _get_logger()

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter to `ADAPTERS` under its `name`."""
    ADAPTERS[cls.name] = cls
    return cls


def _compiling() -> bool:
    return torch.compiler.is_compiling()


#: A plan whose only work is a layout of `approximates_dense` variants, keeping at least this fraction of
#: the blocks, runs dense (the model's own processor: SDPA / FlashAttention / cuDNN) instead. From the
#: kernel's targets: sparse time <= 1.15 x density x our dense time and our dense time <= SDPA's / 0.9, so
#: a layout only pays off below 0.9 / 1.15 = 0.78 of the blocks; `benchmarks/kernel_bench.py` reports the
#: measured crossover (`dense_engine_block_density`). Override: ATTNPLUG_DENSE_ENGINE_DENSITY (1.01 = never).
DENSE_ENGINE_BLOCK_DENSITY = float(os.environ.get("ATTNPLUG_DENSE_ENGINE_DENSITY", "0.78"))


def _dense_engine_if_nearly_dense(plan: AttnPlan, variants) -> AttnPlan:
    """`plan`, or a dense plan where its layout is nearly dense (see `DENSE_ENGINE_BLOCK_DENSITY`); reads
    only host-known counts (no sync)."""
    if (
        plan.layout is None or plan.perm is not None or plan.modifiers or plan.tile_stats is not None
        or plan.extra or plan.compute is not None or plan.after
        or not all(v.approximates_dense for v in variants if v.role == "sparsity")
    ):  # fmt: skip
        return plan
    density = plan.layout.known_block_density()
    if density is None or density < DENSE_ENGINE_BLOCK_DENSITY:
        return plan
    return AttnPlan()


@dataclass
class AttnRuntime:
    """Mutable state of one hooked transformer, shared by its step hook and its processors.

    Per forward the step hook advances the shared `StepClock`, sets `grid` (from shapes), selects
    the variant state of the current cache-context branch (`"cond"`, `"uncond"`, ...; one default
    branch without a context) and clears the per-forward caches. Per attention call: the
    variants' plan (dict lookups of cached layouts for Radial / GNA, device ops for LiteAttention),
    then the kernel. The key-padding mask (HunyuanVideo's text padding) is resolved once per
    forward at the first layer and reused by the others, and across forwards while its contents
    are unchanged (one comparison per forward).
    """

    family: str
    variants: tuple[Variant, ...]
    num_layers: int = 0
    clock: StepClock = field(default_factory=StepClock)
    kernel_backend: str = "auto"  # attn_kernels.attention backend: "auto", "triton" or "reference"
    grid: tuple[int, int, int] | None = None
    model_name: str = ""
    layer_names: tuple[str, ...] = ()
    calls: int = 0  # attention calls that went through attnplug's kernel (for tests / stats)
    ring_skipped: int = 0  # ring attention: (pass, key chunk) kernel calls skipped as empty (for tests / stats)
    branch: str | None = None  # cache-context name of the current forward
    perturbed: bool = False  # the current forward is a guidance variant's perturbed pass (AttnContext.perturbed)
    _states: dict = field(default_factory=dict, repr=False)  # variant state of the current branch
    _default_states: dict = field(default_factory=dict, repr=False)  # branch of calls without a context
    _branch_states: dict = field(default_factory=dict, repr=False)  # {name: states} seen this generation
    _layouts: dict = field(default_factory=dict, repr=False)  # TokenLayout per (grid, text_len, text_first)
    _fwd_masks: list = field(default_factory=list, repr=False)  # key masks resolved in this forward
    _fwd_sources: list = field(default_factory=list, repr=False)  # (model mask, key mask) of this forward
    _mask_entries: list = field(default_factory=list, repr=False)  # key masks seen lately (content, layouts)
    _gather_perms: list = field(default_factory=list, repr=False)  # context parallelism: composed perms
    _ring_plans: list = field(default_factory=list, repr=False)  # ring attention: host-built plans per rank
    _kinds: list | None = field(default=None, repr=False)  # plan kind per layer of this forward (logging)
    _last_kinds: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._states = self._default_states
        # sparsity variants plan first, so modifiers see the final layout and permutation (state keys keep the
        # variant's index in `variants`)
        rank = {"sparsity": 0, "modifier": 1, "guidance": 2}
        self._order = sorted(enumerate(self.variants), key=lambda iv: rank.get(iv[1].role, 1))

    # -- clock views ------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def step_source(self) -> str:
        return self.clock.source

    @property
    def num_steps(self) -> int | None:
        return self.clock.num_steps

    @property
    def states(self) -> dict:
        """Variant state of the current branch: {(variant index, layer): dict}."""
        return self._states

    def branch_states(self) -> dict:
        """Variant state per branch name of this generation (None = calls without a cache context)."""
        live = {None: self._default_states, **self._branch_states}
        # state dicts are emptied, not dropped, at a new generation (stable for compiled forwards): skip empty ones
        return {b: {k: v for k, v in st.items() if v} for b, st in live.items() if any(st.values())}

    def clear_states(self) -> None:
        """New generation: every branch's variant state cleared (static layout caches are kept)."""
        # keys stay, values are emptied: compiled forwards then find the same dicts (no new guard, no new graph)
        for st in (self._default_states, *self._branch_states.values()):
            for inner in st.values():
                inner.clear()
        self._last_kinds = None

    def reset(self) -> None:
        """New generation for the whole handle (the clock is shared by every denoiser)."""
        self.clock.reset()

    def begin_forward(self, branch: str | None, states: dict | None) -> None:
        """Called by the step hook at the start of every transformer forward."""
        self.branch = branch
        if states is None:
            self._states = self._default_states
        else:
            self._states = states
            if self._branch_states.get(branch) is not states:
                self._branch_states[branch] = states
        if self._fwd_masks or self._fwd_sources:
            self._fwd_masks.clear()
            self._fwd_sources.clear()
        self._kinds = None
        if not _compiling() and logger.isEnabledFor(logging.INFO):
            self._kinds = [None] * self.num_layers

    def end_forward(self) -> None:
        """Called after every transformer forward: log the plan per layer when it changed (a new phase)."""
        kinds = self._kinds
        if kinds is None:
            return
        self._kinds = None
        summary = tuple(kinds)
        if summary == self._last_kinds:
            return
        self._last_kinds = summary
        groups: list[tuple[int, int, str]] = []
        for i, k in enumerate(summary):
            k = "not called" if k is None else k
            if groups and groups[-1][2] == k and groups[-1][1] == i - 1:
                groups[-1] = (groups[-1][0], i, k)
            else:
                groups.append((i, i, k))
        parts = [f"{a}{'' if a == b else f'-{b}'}: {k}" for a, b, k in groups]
        logger.info(
            f"attnplug[{self.family}] {self.model_name} step {self.step}"
            f"{'' if self.branch is None else f' ({self.branch})'}: layers " + "; ".join(parts)
        )

    # -- per call -----------------------------------------------------------------------------
    def layout(self, text_len: int, text_first: bool) -> TokenLayout:
        """The TokenLayout of a call (one object per (grid, text_len, text_first), reused)."""
        grid = self.grid
        if grid is None:
            raise RuntimeError(
                "attnplug: the token grid is unknown: the transformer's forward was not seen by the step hook "
                "(was the attention module called outside the transformer?)"
            )
        key = (grid, text_len, text_first)
        hit = self._layouts.get(key)
        if hit is None:
            hit = self._layouts[key] = TokenLayout(
                grid=grid, text_len=text_len, text_first=text_first, family=self.family
            )
        return hit

    def plan(
        self,
        layer: int,
        layout: TokenLayout,
        batch: int,
        heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        head_offset: int = 0,
    ) -> AttnPlan:
        """The variants' plan for one call of `layer` (`heads` in this call, the first at `head_offset`)."""
        plan = AttnPlan()
        clock = self.clock
        for i, var in self._order:
            if layout.cross_len and not var.cross_attention:
                continue  # cross-attention calls are planned only by variants that ask for them
            ctx = AttnContext(
                layer=layer,
                num_layers=self.num_layers,
                step=clock.step,
                timestep=clock.timestep,
                layout=layout,
                batch=batch,
                heads=heads,
                head_dim=head_dim,
                device=device,
                dtype=dtype,
                state=self._states.setdefault((i, layer), {}),
                num_steps=clock.num_steps,
                head_offset=head_offset,
                branch=self.branch,
                perturbed=self.perturbed,
            )
            plan = var.plan(ctx, plan)
        plan = _dense_engine_if_nearly_dense(plan, self.variants)
        if self._kinds is not None and 0 <= layer < len(self._kinds):
            self._kinds[layer] = (
                "dense (model's processor)"
                if plan.is_dense
                else "attnplug kernel (" + ", ".join(v.name for v in self.variants) + ")"
            )
        return plan

    def run(
        self,
        plan: AttnPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: TokenLayout,
        key_mask: torch.Tensor | None = None,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        """Sparse attention of one call. q, k, v: [B, N, H, D] (diffusers' layout); returns [B, N, H, D].

        key_mask: bool [B, N] (False = padded key), the same tensor object for every layer of a
        forward (see `key_mask_of`). parallel_config: diffusers' ParallelConfig when the model runs
        with Ulysses context parallelism: q, k, v are this rank's sequence shard, and the kernel runs
        inside diffusers' all-to-all on the whole sequence and this rank's heads; with ring attention
        (`ring_degree > 1`, also Ulysses x ring) every ring rank's key chunk runs through the kernel and the
        chunks are merged by log-sum-exp (see `diffusion_attn.adapters.ring`)."""
        if parallel_config is not None:
            if layout.cross_len or plan.compute is not None:
                raise RuntimeError(
                    f"attnplug[{self.family}]: cross-attention plans and variants with their own computation "
                    "(AgentSD, Boundary) do not support context parallelism"
                )
            if parallel_config.context_parallel_config.ring_degree > 1:
                return self._run_ring(plan, q, k, v, layout, key_mask, parallel_config)
            return self._run_ulysses(plan, q, k, v, layout, key_mask, parallel_config)
        n = q.shape[1]
        if layout.seq_len != n or k.shape[1] != layout.key_len:
            raise RuntimeError(
                f"attnplug[{self.family}]: token layout {layout} has {layout.seq_len} tokens"
                f"{f' and {layout.key_len} keys' if layout.cross_len else ''} but the attention call has {n} queries "
                f"and {k.shape[1]} keys"
            )
        return self._kernel(plan, q, k, v, key_mask, None)

    def _kernel(
        self,
        plan: AttnPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        gather: tuple | None,
        *,
        run_after: bool = True,
    ) -> torch.Tensor:
        """The kernel on [B, N, H, D] inputs; `gather` = (key, canonical -> gathered index) under Ulysses."""
        from attn_kernels import attention

        self.calls += 1
        n = q.shape[1]
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        perm, inv = plan.perm, plan.inv
        if perm is not None:
            perm = perm.to(q.device)  # no-op for the variants here (cached on the call's device)
            inv = torch.argsort(perm) if inv is None else inv.to(q.device)  # argsort: uncached inverse
        if gather is not None:
            perm, inv = self._composed(gather, perm, inv)
        if perm is not None:
            qh, kh, vh = qh[:, :, perm], kh[:, :, perm], vh[:, :, perm]
        if plan.compute is not None:  # a variant's own computation replaces the kernel call (AgentSD, Boundary)
            if key_mask is not None:
                raise RuntimeError(f"attnplug[{self.family}]: key-padding masks are not supported with plan.compute")
            out = plan.compute(qh, kh, vh, self.kernel_backend)
            return (out if inv is None else out[:, :, inv]).transpose(1, 2)
        blayout = plan.layout
        if key_mask is not None:
            blayout = self._key_masked(blayout, key_mask, perm, n, q.device)
        out = attention(
            qh,
            kh,
            vh,
            blayout,
            modifiers=plan.modifiers,
            tile_stats=plan.tile_stats if run_after else None,
            backend=self.kernel_backend,
            return_lse=bool(plan.extra),
        )
        if plan.extra:
            out = self._merge_extra(plan, out, qh, kh, vh, key_mask, perm, n)
        if run_after:
            for cb in plan.after:
                cb(out, plan)
        if inv is not None:
            out = out[:, :, inv]
        return out.transpose(1, 2)

    def _merge_extra(self, plan, main, qh, kh, vh, key_mask, perm, n) -> torch.Tensor:
        """The main pass and `plan.extra`'s passes (disjoint pairs) merged by log-sum-exp: exactly the softmax
        over the union of their pairs (device ops only)."""
        from attn_kernels import attention

        out, lse = main
        acc = out.float()
        for lay, mods in plan.extra:
            if key_mask is not None:
                lay = self._key_masked(lay, key_mask, perm, n, qh.device)
            o2, l2 = attention(qh, kh, vh, lay, modifiers=mods, backend=self.kernel_backend, return_lse=True)
            m = torch.maximum(lse, l2)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows without any key: weights 0
            w1, w2 = torch.exp(lse - m), torch.exp(l2 - m)
            tot = w1 + w2
            acc = (acc * w1[..., None] + o2.float() * w2[..., None]) / tot.clamp_min(torch.finfo(tot.dtype).tiny)[
                ..., None
            ]
            lse = m + torch.log(tot)
        return acc.to(out.dtype)

    # -- context parallelism (diffusers' Ulysses) -------------------------------------------
    def _composed(self, gather: tuple, perm: Any, inv: Any) -> tuple[Any, Any]:
        """perm on the gathered sequence: the variant's perm of the canonical order, mapped through
        canonical -> gathered positions (cached per (gather key, perm object))."""
        gkey, c2g = gather
        if c2g is None:
            return perm, inv
        for key, p, combined, combined_inv in self._gather_perms:
            if key == gkey and p is perm:
                return combined, combined_inv
        combined = c2g if perm is None else c2g[perm]
        combined_inv = torch.argsort(combined)
        self._gather_perms.append((gkey, perm, combined, combined_inv))
        del self._gather_perms[:-8]
        return combined, combined_inv

    def _c2g(self, layout: TokenLayout, degree: int, device: torch.device) -> torch.Tensor | None:
        """Canonical -> gathered token index after Ulysses' all-to-all (None when they agree).

        Each rank holds an equal shard of every part of its local sequence ([text, visual] when
        text comes first, else [visual, text]); the all-to-all concatenates the ranks' sequences."""
        t, nv = layout.text_len, layout.num_visual
        if t == 0:
            return None
        parts = [("text", t), ("visual", nv)] if layout.text_first else [("visual", nv), ("text", t)]
        start = {"text": layout.text_slice.start, "visual": layout.visual_slice.start}
        g2c = []
        for r in range(degree):
            for name, size in parts:
                chunk = size // degree
                g2c.append(torch.arange(start[name] + r * chunk, start[name] + (r + 1) * chunk))
        return torch.argsort(torch.cat(g2c)).to(device)

    def _run_ulysses(self, plan, q, k, v, layout, key_mask, parallel_config) -> torch.Tensor:
        from diffusers.models.attention_dispatch import TemplatedUlyssesAttention

        cp = parallel_config.context_parallel_config
        degree = cp.ulysses_degree
        n_local = q.shape[1]
        if key_mask is not None:
            raise RuntimeError(
                f"attnplug[{self.family}]: key-padding masks are not supported with context parallelism "
                "(diffusers has no context-parallel plan for this model family)"
            )
        if n_local * degree != layout.seq_len or k.shape[1] != n_local:
            raise RuntimeError(
                f"attnplug[{self.family}]: with ulysses_degree={degree} each rank must hold 1/{degree} of the "
                f"{layout.seq_len} tokens of {layout}, got {n_local} queries and {k.shape[1]} keys"
            )
        for name, size in (("text", layout.text_len), ("visual", layout.num_visual)):
            if size % degree:
                raise RuntimeError(
                    f"attnplug[{self.family}]: the {size} {name} tokens cannot be split evenly over "
                    f"ulysses_degree={degree}"
                )
        gather = ((layout, degree, str(q.device)), self._c2g_cached(layout, degree, q.device))
        runtime = self

        def forward_op(
            ctx,
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            scale=None,
            enable_gqa=False,
            return_lse=False,
            _save_ctx=True,
            _parallel_config=None,
        ):
            if return_lse:
                raise RuntimeError("attnplug: ring attention (LSE) is not supported for sparse variants")
            if _save_ctx:
                ctx.save_for_backward(query, key, value)
            return runtime._kernel(plan, query, key, value, None, gather)

        def backward_op(ctx, grad_out, *args, **kwargs):
            query, key, value = ctx.saved_tensors
            with torch.enable_grad():
                qkv = [t.detach().requires_grad_(True) for t in (query, key, value)]
                out = runtime._kernel(plan, *qkv, None, gather, run_after=False)
                return torch.autograd.grad(out, qkv, grad_out)

        return TemplatedUlyssesAttention.apply(
            q, k, v, None, 0.0, False, None, False, False, forward_op, backward_op, parallel_config
        )

    # -- context parallelism (diffusers' ring attention, Ulysses x ring) ----------------------
    def _run_ring(self, plan, q, k, v, layout, key_mask, parallel_config) -> torch.Tensor:
        """Ring (and Ulysses x ring): Ulysses' all-to-all inside each Ulysses group when ulysses_degree > 1,
        then every ring rank's key chunk through the kernel, merged by log-sum-exp (`adapters.ring`)."""
        from .ring import build_ring_plan, ring_attention

        cp = parallel_config.context_parallel_config
        ring, uly = cp.ring_degree, cp.ulysses_degree
        world = ring * uly
        if key_mask is not None:
            raise RuntimeError(
                f"attnplug[{self.family}]: key-padding masks are not supported with context parallelism "
                "(diffusers has no context-parallel plan for this model family)"
            )
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise RuntimeError(
                f"attnplug[{self.family}]: ring attention with sparse variants is inference only (no backward); "
                "train with ContextParallelConfig(ulysses_degree=N) or data parallelism"
            )
        if plan.after and plan.tile_stats is None:
            raise RuntimeError(f"attnplug[{self.family}]: plans with `after` callbacks are not supported under ring")
        n_local = q.shape[1]
        if n_local * world != layout.seq_len or k.shape[1] != n_local:
            raise RuntimeError(
                f"attnplug[{self.family}]: with ring_degree={ring} x ulysses_degree={uly} each rank must hold "
                f"1/{world} of the {layout.seq_len} tokens of {layout}, got {n_local} queries and {k.shape[1]} keys"
            )
        for name, size in (("text", layout.text_len), ("visual", layout.num_visual)):
            if size % world:
                raise RuntimeError(
                    f"attnplug[{self.family}]: the {size} {name} tokens cannot be split evenly over "
                    f"ring_degree x ulysses_degree = {world}"
                )
        self.calls += 1
        perm, inv = plan.perm, plan.inv
        if perm is not None:
            perm = perm.to(q.device)
            inv = torch.argsort(perm) if inv is None else inv.to(q.device)
        gather = ((layout, world, str(q.device)), self._c2g_cached(layout, world, q.device))
        combined, combined_inv = self._composed(gather, perm, inv)
        rank = cp._ring_local_rank
        leaves = [plan.layout, *plan.modifiers]
        for lay, mods in plan.extra:
            leaves += [lay, *mods]
        scalars = (plan.tile_stats is None, ring, rank, len(plan.modifiers), len(plan.extra), str(q.device))
        leaves.append(combined)
        rplan = None
        for sc, lv, hit in self._ring_plans:  # cached per (scalars, objects by identity): no per-call host work
            if sc == scalars and len(lv) == len(leaves) and all(a is b for a, b in zip(lv, leaves)):
                rplan = hit
                break
        if rplan is None:
            rplan = build_ring_plan(plan, layout.seq_len, combined_inv, ring, rank, q.device)
            self._ring_plans.append((scalars, leaves, rplan))
            del self._ring_plans[:-16]
        group = cp._ulysses_mesh.get_group() if uly > 1 else None
        if group is not None:
            from diffusers.models.attention_dispatch import SeqAllToAllDim

            q, k, v = (SeqAllToAllDim.apply(group, t, 2, 1) for t in (q, k, v))  # sequence gathered, heads split
        out = ring_attention(self, plan, q, k, v, rplan, cp, combined)
        if group is not None:
            out = SeqAllToAllDim.apply(group, out, 1, 2)
        return out

    def _c2g_cached(self, layout: TokenLayout, degree: int, device: torch.device) -> torch.Tensor | None:
        key = ("c2g", layout, degree, str(device))
        if key not in self._layouts:
            self._layouts[key] = self._c2g(layout, degree, device)
        return self._layouts[key]

    # -- key-padding masks ------------------------------------------------------------------
    def key_mask_of(self, mask: torch.Tensor, derive: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`derive(mask)` (the key mask [B, N] of a model's attention mask), computed once per forward
        for each model mask object, so every layer passes the same key-mask tensor to `run`."""
        for src, km in self._fwd_sources:
            if src is mask:
                return km
        km = derive(mask)
        self._fwd_sources.append((mask, km))
        del self._fwd_sources[:-8]
        return km

    def _mask_entry(self, key_mask: torch.Tensor) -> dict:
        """The entry of a key mask: resolved at its first use in a forward, then by identity."""
        for km, entry in self._fwd_masks:
            if km is key_mask:
                return entry
        entry = None
        for e in self._mask_entries:  # same contents as a recent forward's mask: one comparison (sync)
            if e["mask"].shape == key_mask.shape and e["mask"].device == key_mask.device:
                if torch.equal(e["mask"], key_mask):
                    entry = e
                    break
        if entry is None:
            entry = {"mask": key_mask.clone(), "all": bool(key_mask.all()), "layouts": []}
            self._mask_entries.insert(0, entry)
            del self._mask_entries[4:]
        self._fwd_masks.append((key_mask, entry))
        del self._fwd_masks[:-8]
        return entry

    def _key_masked(self, blayout: Any, key_mask: torch.Tensor, perm: Any, n: int, device: torch.device) -> Any:
        """`blayout` restricted to the valid keys of `key_mask` (cached per mask contents, layout, perm)."""
        entry = self._mask_entry(key_mask)
        if entry["all"]:
            return blayout
        for base, p, masked in entry["layouts"]:
            if base is blayout and p is perm:
                return masked
        from attn_kernels import BlockLayout

        km = entry["mask"] if perm is None else entry["mask"][:, perm]
        base_layout = BlockLayout.dense(n, n, device=device) if blayout is None else blayout
        masked = base_layout.with_key_mask(km)
        entry["layouts"].append((blayout, perm, masked))
        del entry["layouts"][:-8]  # per-call layouts (LiteAttention) must not pile up
        return masked


def _forwarded(name: str) -> property:
    """An attribute of the original processor seen through ours (absent when the original lacks it),
    so diffusers' `set_attention_backend` / `enable_parallelism` set it where the model's own
    processor reads it, and `remove()` leaves the user's choice in place."""

    def get(self):
        original = self.__dict__.get("original")
        if original is None or not hasattr(original, name):
            raise AttributeError(name)
        return getattr(original, name)

    def set_(self, value):
        original = self.__dict__.get("original")
        if original is None or not hasattr(original, name):
            raise AttributeError(f"{type(original).__name__} has no attribute {name!r}")
        setattr(original, name, value)

    return property(get, set_)


class SparseProcessor:
    """Base of the adapters' processors: the model's own processor for dense plans, the kernel for sparse ones.

    `_attention_backend` / `_parallel_config` are the original processor's (read and written
    through), so they exist exactly when the original has them."""

    _attention_backend = _forwarded("_attention_backend")
    _parallel_config = _forwarded("_parallel_config")

    def __init__(self, runtime: AttnRuntime, layer: int, original: Any) -> None:
        self.__dict__["original"] = original  # plain attribute, also on nn.Module subclasses
        self.runtime = runtime
        self.layer = layer

    def _context_parallel(self) -> Any:
        """diffusers' ParallelConfig when this call runs with context parallelism, else None."""
        original = self.original
        pc = getattr(original, "_parallel_config", None)
        cp = getattr(pc, "context_parallel_config", None)
        if cp is None or cp.ring_degree * cp.ulysses_degree <= 1:
            return None
        return pc

    def plan(
        self, hidden_states: torch.Tensor, *, heads: int, head_dim: int, text_len: int, text_first: bool
    ) -> AttnPlan | None:
        """The variants' plan for this call from shapes only; None = dense (run the model's processor)."""
        rt = self.runtime
        layout = rt.layout(text_len, text_first)
        pc = self._context_parallel()
        offset = 0
        if pc is not None:
            cp = pc.context_parallel_config
            if cp.ulysses_anything or getattr(cp, "ring_anything", False):
                what = "ulysses_anything=True" if cp.ulysses_anything else "ring_anything=True"
                plan = rt.plan(
                    self.layer, layout, hidden_states.shape[0], heads, head_dim, hidden_states.device,
                    hidden_states.dtype,
                )  # fmt: skip
                if plan.is_dense:
                    return None
                raise RuntimeError(
                    f"attnplug[{rt.family}]: diffusers' context parallelism with {what} is not supported by "
                    "sparse variants; use equal shards: ContextParallelConfig(ulysses_degree=N) and/or ring_degree=M"
                )
            degree = cp.ulysses_degree
            if heads % degree:
                raise RuntimeError(f"attnplug[{rt.family}]: {heads} heads cannot be split over ulysses_degree={degree}")
            heads //= degree
            offset = cp._ulysses_local_rank * heads
        plan = rt.plan(
            self.layer, layout, hidden_states.shape[0], heads, head_dim, hidden_states.device, hidden_states.dtype,
            offset,
        )  # fmt: skip
        return None if plan.is_dense else plan

    def run(
        self,
        plan: AttnPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        text_len: int,
        text_first: bool,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Execute a sparse plan on q, k, v [B, N, H, D] (this rank's shard under context parallelism)."""
        rt = self.runtime
        return rt.run(
            plan,
            q,
            k,
            v,
            layout=rt.layout(text_len, text_first),
            key_mask=key_mask,
            parallel_config=self._context_parallel(),
        )


class WrappedModuleProcessor(nn.Module):
    """Mixin base for processors that replace an `nn.Module` processor (IP-Adapter): the original's
    submodules and parameters are registered under the same names, so the model's state_dict keys
    and `.to()` / dtype moves are unchanged while attnplug is applied."""

    def __init__(self, original: nn.Module) -> None:
        nn.Module.__init__(self)
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b)


class Adapter:
    """One model family: which modules to hook, which processors it reproduces, where the tokens are."""

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: original processor class name -> our processor class (a processor not listed is refused)
    processors: ClassVar[dict[str, type]] = {}
    #: forward arguments `grid()` reads (diffusers' context-parallel hooks must not shard them first)
    grid_inputs: ClassVar[tuple[str, ...]] = ("hidden_states",)
    #: as `processors`, for the modules of `cross_attention_modules` (hooked only for `Variant.cross_attention`)
    cross_processors: ClassVar[dict[str, type]] = {}
    _params: ClassVar[dict[type, dict[str, int]]] = {}
    # -- the family's facts (the CLI, show-mask, presets and variants ask the adapter) --------------------
    #: pixels -> latents -> tokens of the family's pipelines (None: not known before loading)
    latent: ClassVar[LatentRule | None] = None
    #: a pipeline directory's `transformer/config.json` patch size is the token patch (FLUX: False, its
    #: patch_size 1 is applied after the 2x2 latent packing)
    patch_from_config: ClassVar[bool] = True
    #: `vae/config.json`'s `scale_factor_temporal` / `scale_factor_spatial` give the VAE compression (Wan)
    vae_from_config: ClassVar[bool] = False
    #: frames per second of the family's videos (None: an image family)
    default_fps: ClassVar[int | None] = None
    #: joint self-attention sequences are [text, visual] (True) or [visual, text] (False)
    text_first: ClassVar[bool] = False

    @classmethod
    def latent_rule(cls, model_dir: Any = None) -> LatentRule | None:
        """The family's `latent` rule, with what a local pipeline directory's configs say (None: unknown)."""
        if cls.latent is None or model_dir is None:
            return cls.latent
        return rule_from_dir(
            cls.latent, model_dir, patch_from_config=cls.patch_from_config, vae_from_config=cls.vae_from_config
        )

    @classmethod
    def token_grid(cls, height: int, width: int, frames: int, model_dir: Any = None) -> tuple[int, int, int] | None:
        """(frames, height, width) of visual tokens of a `frames` x `height` x `width` generation (None: unknown)."""
        rule = cls.latent_rule(model_dir)
        return None if rule is None else token_grid(rule, height, width, frames)

    @classmethod
    def variant_defaults(cls, variant: Variant | type[Variant]) -> dict[str, Any]:
        """`variant`'s official defaults for this family (`Variant.family_defaults`); ValueError when the
        variant has a table and this family is not in it (never another family's values)."""
        return variant.defaults_for(cls.name)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, attention module) of every hooked layer, in execution order."""
        raise NotImplementedError

    def grid(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(frames, height, width) of visual tokens from the transformer's forward arguments."""
        raise NotImplementedError

    def cross_attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of the text cross-attention layers, in execution order (Wan's and UNets' `attn2`);
        they are layers `len(attention_modules) + i`, the i-th sitting in the block of self layer i."""
        return []

    def install(self, model: nn.Module, runtime: AttnRuntime) -> list[Callable[[], None]]:
        """Extra hooks this family needs on `model` (after patching); returns the callables that undo them."""
        return []

    @staticmethod
    def forward_arg(model: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
        """Argument `name` of the model's forward, given by keyword or by position (its signature)."""
        if name in kwargs:
            return kwargs[name]
        cls = type(model)
        index = Adapter._params.get(cls)
        if index is None:
            params = list(inspect.signature(cls.forward).parameters)[1:]  # without self
            index = Adapter._params[cls] = {p: i for i, p in enumerate(params)}
        i = index.get(name)
        return args[i] if i is not None and i < len(args) else None

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The forward's timestep argument (keyword or positional, per the family's signature)."""
        return self.forward_arg(model, args, kwargs, "timestep")

    def check_processor(self, name: str, module: nn.Module, model: nn.Module, cross: bool = False) -> None:
        """Refuse (before patching) a processor this adapter does not reproduce exactly."""
        proc = module.processor
        cls = type(proc)
        known = self.cross_processors if cross else self.processors
        if cls.__name__ not in known or not cls.__module__.startswith("diffusers."):
            raise ValueError(
                f"apply(): {name} of {type(model).__name__} uses {type(proc).__name__}, which attnplug does not "
                f"reproduce exactly (supported: {', '.join(known)}); nothing was patched. Restore the "
                "model's default processor (e.g. unfuse_qkv_projections(), or set_attn_processor with one of these) "
                "or remove the feature that installed it"
            )

    def make_processor(
        self, runtime: AttnRuntime, layer: int, module: nn.Module, cross: bool = False
    ) -> SparseProcessor:
        cls = (self.cross_processors if cross else self.processors)[type(module.processor).__name__]
        return cls(runtime, layer, module.processor)


def hidden_states_arg(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    hs = Adapter.forward_arg(model, args, kwargs, "hidden_states")
    if not isinstance(hs, torch.Tensor):
        raise RuntimeError("attnplug: the transformer was called without a hidden_states tensor")
    return hs


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`'s class, or a ValueError listing the supported families (`ADAPTERS` is complete:
    importing `diffusion_attn.adapters` imports every adapter module)."""
    for cls in ADAPTERS.values():
        if cls.matches(model):
            return cls()
    supported = ", ".join(f"{n} ({', '.join(c.model_classes)})" for n, c in ADAPTERS.items())
    raise ValueError(f"attnplug has no adapter for {type(model).__name__}; supported model families: {supported}")


ProcessorFactory = Callable[[AttnRuntime, int, Any], SparseProcessor]

"""Agent attention (Han et al., ECCV 2024; LeapLabTHU/Agent-Attention) for timm ViT/DeiT.

    A = AdaptiveAvgPool2d(a_h x a_w)(Q_patches)                  agent tokens, prefix tokens excluded
    O = softmax(Q·Aᵀ·s + B2) · softmax(A·Kᵀ·s + B1) · V + DWC(V)  s = head_dim^-0.5

B1 / B2 are position biases as in the paper's DeiT model: block biases (heads, n, 7, 7)
interpolated bilinearly to the patch grid plus row and column biases, and separate biases for
prefix (class / register / distillation) tokens; DWC is a depthwise 3x3 conv on V as a
(B, C, H, W) map, added to the patch tokens before `proj`. `qkv`, `q_norm`, `k_norm`, `proj`
are timm's own modules, reused, so pretrained weights carry over; the new biases and the DWC
start at zero. Agent attention approximates softmax attention: a converted model is close to,
not equal to, the original until it is fine-tuned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.swin_transformer import SwinTransformerBlock

from attn_spec import Range, Unique, check_options

from ..inject import make_view
from ._gates import fx_tracing, use_fused

__all__ = ["Agent", "AgentAttention", "AgentSwinBlock", "EvaAgentAttention", "agent_grid"]


def agent_grid(num_agents: int, grid: tuple[int, int]) -> tuple[int, int]:
    """(a_h, a_w) with a_h * a_w = num_agents and the patch grid's aspect (square grids: a perfect square)."""
    gh, gw = grid
    if num_agents > gh * gw:
        raise ValueError(
            f"Agent.num_agents={num_agents} is larger than the {gh}x{gw}={gh * gw} patch tokens; "
            f"allowed range [1, {gh * gw}]"
        )
    pairs = [(a, num_agents // a) for a in range(1, num_agents + 1) if num_agents % a == 0]
    pairs = [(a, b) for a, b in pairs if a <= gh and b <= gw]
    if gh == gw:
        r = math.isqrt(num_agents)
        if r * r != num_agents:
            raise ValueError(
                f"Agent.num_agents must be a perfect square for a square {gh}x{gw} patch grid, got {num_agents}"
            )
        return (r, r)
    if not pairs:
        raise ValueError(f"Agent.num_agents={num_agents} has no factorisation a_h x a_w that fits the {gh}x{gw} grid")
    return min(pairs, key=lambda p: abs(math.log((p[0] / p[1]) / (gh / gw))))


class AgentAttention(nn.Module):
    """Drop-in replacement of `timm.layers.Attention` (and Swin's `WindowAttention`) computing agent
    attention. `backend`: "auto" (fused Triton kernel on CUDA when it fits, the eager formula
    elsewhere), "triton", "reference" ("eager": deprecated alias); TorchScript, FX and torch.compile
    run the eager formula."""

    def __init__(
        self, attn: nn.Module, grid: tuple[int, int], num_prefix_tokens: int, num_agents: int, dwc_kernel: int = 3
    ) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = getattr(attn, "head_dim", attn.proj.in_features // attn.num_heads)
        self.scale = self.head_dim**-0.5
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.agent_hw = agent_grid(num_agents, self.grid)
        self.num_agents = num_agents
        self.backend = "auto"
        dim = self.num_heads * self.head_dim
        # timm's own modules, reused (pretrained weights carry over)
        self.qkv = getattr(attn, "qkv", None)  # EVA may use separate q/k/v projections instead
        self.q_norm = getattr(attn, "q_norm", None) or nn.Identity()  # Swin's WindowAttention has no qk norm
        self.k_norm = getattr(attn, "k_norm", None) or nn.Identity()
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", None) or nn.Identity()
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        h, n, (gh, gw), p = self.num_heads, num_agents, self.grid, num_prefix_tokens
        self.pool = nn.AdaptiveAvgPool2d(self.agent_hw)
        self.dwc = nn.Conv2d(dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim)
        nn.init.zeros_(self.dwc.weight)
        nn.init.zeros_(self.dwc.bias)
        # position biases, zero-initialised (agent -> tokens: B1; tokens -> agent: B2). The row / column biases
        # are the paper's (1, h, ...) tensors without the leading 1: 4-D, so `model.to(memory_format=
        # torch.channels_last)` (timm's train.py --channels-last) converts them; 5-D checkpoints still load.
        self.an_bias = nn.Parameter(torch.zeros(h, n, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(h, n, gh, 1))
        self.aw_bias = nn.Parameter(torch.zeros(h, n, 1, gw))
        self.na_bias = nn.Parameter(torch.zeros(h, n, 7, 7))
        self.ha_bias = nn.Parameter(torch.zeros(h, gh, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(h, 1, gw, n))
        self.ac_bias = nn.Parameter(torch.zeros(1, h, n, p)) if p else None
        self.ca_bias = nn.Parameter(torch.zeros(1, h, p, n)) if p else None

    @torch.jit.unused
    def set_grid(self, grid: tuple[int, int]) -> None:
        """Re-target the module to another patch grid (Swin `set_input_size`): the 7x7 block biases
        are interpolated anyway; row / column biases are resized linearly."""
        gh, gw = int(grid[0]), int(grid[1])
        agent_grid(self.num_agents, (gh, gw))  # validate first
        with torch.no_grad():
            for name, dim, size in (("ah_bias", 2, gh), ("aw_bias", 3, gw), ("ha_bias", 1, gh), ("wa_bias", 2, gw)):
                prm = getattr(self, name)
                if prm.shape[dim] != size:
                    t = prm.data.movedim(dim, -1)
                    shape = t.shape
                    t = F.interpolate(t.reshape(-1, 1, shape[-1]), size=size, mode="linear", align_corners=False)
                    prm.data = t.reshape(*shape[:-1], size).movedim(-1, dim).contiguous()
        self.grid = (gh, gw)
        self.agent_hw = agent_grid(self.num_agents, self.grid)
        self.pool = nn.AdaptiveAvgPool2d(self.agent_hw)

    @torch.jit.unused
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Checkpoints with the paper's 5-D row / column biases (1, h, ...) load into the 4-D parameters."""
        for name in ("ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            t = state_dict.get(prefix + name)
            if t is not None and t.dim() == 5 and t.shape[0] == 1:
                state_dict[prefix + name] = t[0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        h, n, (gh, gw) = self.num_heads, self.num_agents, self.grid
        b1 = F.interpolate(self.an_bias, size=(gh, gw), mode="bilinear", align_corners=False).unsqueeze(0)
        b1 = (b1 + self.ah_bias + self.aw_bias).reshape(1, h, n, gh * gw)
        b2 = F.interpolate(self.na_bias, size=(gh, gw), mode="bilinear", align_corners=False)
        b2 = b2.permute(0, 2, 3, 1).unsqueeze(0)  # [1, h, gh, gw, n]
        b2 = (b2 + self.ha_bias + self.wa_bias).reshape(1, h, gh * gw, n)
        ac, ca = self.ac_bias, self.ca_bias
        if ac is not None and ca is not None:
            b1 = torch.cat([ac, b1], dim=-1)
            b2 = torch.cat([ca, b2], dim=-2)
        return b1, b2

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045 (TorchScript needs Optional)
        is_causal: bool = False,
        mask: Optional[torch.Tensor] = None,  # noqa: UP045  Swin's keyword
    ) -> torch.Tensor:
        if not self._tracing():
            if is_causal:
                raise ValueError("AgentAttention does not support is_causal=True")
            if attn_mask is not None or mask is not None:
                raise ValueError("AgentAttention does not support attn_mask (agent attention has no token-pair scores)")
            self._check_tokens(x)
        q, k, v = self._project(x)
        return self._agent(x, q, k, v, None)

    def _tracing(self) -> bool:
        """True under FX symbolic tracing: arguments are proxies (a traced graph is for the traced shapes)."""
        if not torch.jit.is_scripting():
            return fx_tracing()
        return False

    def _check_tokens(self, x: torch.Tensor) -> None:
        n, p, gh, gw = x.shape[1], self.num_prefix_tokens, self.grid[0], self.grid[1]
        if n != p + gh * gw:
            raise ValueError(
                f"AgentAttention was built for a {gh}x{gw} patch grid + {p} prefix tokens = {p + gh * gw} tokens, "
                f"got {n} (image size changed? agent attention needs a fixed patch grid)"
            )

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, N, head_dim] exactly as timm's Attention computes them."""
        B, N, _ = x.shape
        qkv = self.qkv
        assert qkv is not None
        q, k, v = qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _agent(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: Optional[torch.Tensor],  # noqa: UP045
    ) -> torch.Tensor:
        B, N = x.shape[0], x.shape[1]
        C = self.num_heads * self.head_dim  # attention width (EVA may differ from the embedding width)
        p, gh, gw = self.num_prefix_tokens, self.grid[0], self.grid[1]
        qp = q[:, :, p:].reshape(B * self.num_heads, gh, gw, self.head_dim).permute(0, 3, 1, 2)
        agents = self.pool(qp).reshape(B, self.num_heads, self.head_dim, -1).transpose(-1, -2)  # [B,h,n,d]
        b1, b2 = self._biases()
        out = torch.empty(0)
        fused = False
        if not torch.jit.is_scripting():
            if not (self.training and self.attn_drop.p > 0) and use_fused(
                q, self.backend, "agent_attention", (self.head_dim, self.num_agents)
            ):
                out = self._fused(q, k, v, agents, b1, b2)
                fused = True
        if not fused:
            agent_attn = self.attn_drop(torch.softmax((agents * self.scale) @ k.transpose(-2, -1) + b1, dim=-1))
            agent_v = agent_attn @ v  # [B,h,n,d]
            q_attn = self.attn_drop(torch.softmax((q * self.scale) @ agents.transpose(-2, -1) + b2, dim=-1))
            out = q_attn @ agent_v
        out = out.transpose(1, 2).reshape(B, N, C)
        vp = v[:, :, p:].transpose(1, 2).reshape(B, gh, gw, C).permute(0, 3, 1, 2)
        dwc = self.dwc(vp).permute(0, 2, 3, 1).reshape(B, gh * gw, C)
        out = torch.cat([out[:, :p], out[:, p:] + dwc], dim=1)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    @torch.jit.unused
    def _fused(self, q, k, v, agents, b1, b2) -> torch.Tensor:
        from attn_kernels.agent_attn import agent_attention

        dt = q.dtype
        return agent_attention(q, k, v, agents.to(dt), b1.to(dt), b2.to(dt), self.scale, "triton")


class EvaAgentAttention(AgentAttention):
    """Agent attention for timm's `EvaAttention` (EVA-02, ViT-with-rope families): EVA's own
    projections (fused qkv with separate biases, or q/k/v projections), rotary embedding on the
    patch tokens, scale norm and output gate, reused by reference."""

    def __init__(self, attn: nn.Module, grid, num_prefix_tokens: int, num_agents: int, dwc_kernel: int = 3) -> None:
        super().__init__(attn, grid, num_prefix_tokens, num_agents, dwc_kernel)
        for name in ("q_bias", "k_bias", "v_bias", "q_proj", "k_proj", "v_proj", "gate"):
            setattr(self, name, getattr(attn, name, None))
        self.qkv_bias_separate = getattr(attn, "qkv_bias_separate", False)
        self.rotate_half = getattr(attn, "rotate_half", False)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,  # noqa: UP045 (TorchScript needs Optional)
        attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        is_causal: bool = False,
    ) -> torch.Tensor:  # EVA's signature
        if not self._tracing():
            if attn_mask is not None or is_causal:
                raise ValueError("AgentAttention does not support attn_mask / is_causal")
            self._check_tokens(x)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            p = self.num_prefix_tokens
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=self.rotate_half)], 2).type_as(v)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=self.rotate_half)], 2).type_as(v)
        return self._agent(x, q, k, v, gate)


class AgentSwinBlock(SwinTransformerBlock):
    """A view (`vision_attn.inject.make_view`) of a Swin block whose attention is agent attention
    over one global window, no shift. `set_input_size` keeps it global at the new resolution."""

    def set_input_size(self, feat_size, window_size=None, always_partition=None) -> None:
        self.input_resolution = tuple(int(s) for s in feat_size)
        if always_partition is not None:
            self.always_partition = always_partition
        self.attn.set_grid(self.input_resolution)
        self._global_window()

    def _global_window(self) -> None:
        self.window_size = tuple(self.input_resolution)
        self.shift_size = (0, 0)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.dynamic_mask = False
        self.attn_mask = None


def _resizing_set_input_size(model: nn.Module, agents: list, num_agents: int):
    """timm's `set_input_size(img_size, patch_size)` of a ViT-family model, then each agent module re-targeted
    to the new patch grid (its row / column biases resized as timm resizes the position embedding). The new
    grid is checked against `num_agents` before anything changes."""
    original = model.set_input_size  # the class's bound method
    from timm.layers import to_2tuple

    def set_input_size(img_size=None, patch_size=None, **kwargs):
        embed = model.patch_embed
        img = to_2tuple(img_size) if img_size is not None else tuple(embed.img_size)
        patch = to_2tuple(patch_size) if patch_size is not None else tuple(embed.patch_size)
        grid = (int(img[0]) // int(patch[0]), int(img[1]) // int(patch[1]))
        try:
            agent_grid(num_agents, grid)
        except ValueError as e:
            raise ValueError(f"set_input_size({img_size!r}): {e}; nothing was changed") from None
        original(img_size=img_size, patch_size=patch_size, **kwargs)
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        for agent in agents:
            agent.set_grid(grid)

    return set_input_size


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _indices(owner: str, value: object) -> tuple[int, ...] | None:
    """Any iterable of indices as a tuple (their range and uniqueness are declared on the field: `_Indices`)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(
            f"{owner} must be a tuple of indices or None, got {value!r} (e.g. {owner.split('.')[-1]}=(0, 1))"
        )
    return tuple(value)


#: Agent.blocks / Agent.stages: distinct int indices >= 0, or None
_Indices = Annotated[
    tuple[int, ...] | None,
    Range(0, None, words=True, message="{name} must hold int indices {bounds}, got {value!r}"),
    Unique(noun="indices", message="{name} has a repeated index: {value!r}"),
]


_SUPPORTED_MODELS = (
    "timm VisionTransformer-family models whose blocks use timm.layers.Attention or timm.models.eva.EvaAttention "
    "(vit_*, deit_*, eva02_*, vit_*_reg*, incl. register / distillation tokens) and SwinTransformer (swin_*)"
)


@dataclass
class Agent:
    """Agent attention for timm VisionTransformer-family models (ViT, DeiT, EVA, incl. register
    tokens) and Swin (the converted stages get one global window, as the paper's Agent-Swin).

    num_agents: agents per block (a perfect square for square grids; <= patch tokens);
    blocks: ViT block indices to convert (None = all); stages: Swin stages to convert
    (None = the first two, later stages keep window attention); dwc_kernel: odd DWC kernel size.
    New biases and the DWC start at zero (the paper's from-scratch configuration); to convert a
    trained model, see `vision_attn.calibrate`.
    """

    name: ClassVar[str] = "agent"
    num_agents: Annotated[int, Range(1, None, words=True)] = 49
    blocks: _Indices = None
    dwc_kernel: Annotated[int, Range(1, None, odd=True)] = 3
    stages: _Indices = None

    def __post_init__(self) -> None:
        self.blocks = _indices("Agent.blocks", self.blocks)
        self.stages = _indices("Agent.stages", self.stages)
        check_options(self)  # the ranges declared on the fields above

    def inject(self, model: nn.Module, handle) -> None:
        from timm.layers import Attention
        from timm.models.eva import EvaAttention
        from timm.models.swin_transformer import SwinTransformer

        if isinstance(model, SwinTransformer):
            return self._inject_swin(model, handle)
        if self.stages is not None:
            raise ValueError(f"Agent.stages applies to SwinTransformer only; {type(model).__name__} takes Agent.blocks")
        blocks = getattr(model, "blocks", None)
        embed = getattr(model, "patch_embed", None)
        if blocks is None or embed is None or not hasattr(embed, "grid_size"):
            raise ValueError(f"Agent: {type(model).__name__} is not supported; supported: {_SUPPORTED_MODELS}")
        if getattr(model, "dynamic_img_size", False):
            raise ValueError(
                "Agent: models created with dynamic_img_size=True are not supported: agent attention needs the patch "
                "grid, which timm does not pass to the blocks; create the model with a fixed img_size and change it "
                "with model.set_input_size(img_size) (the agent biases are resized with the position embedding)"
            )
        grid = tuple(int(g) for g in embed.grid_size)
        agent_grid(self.num_agents, grid)  # validate before patching anything
        idx = range(len(blocks)) if self.blocks is None else self.blocks
        for i in idx:
            if not 0 <= i < len(blocks):
                raise ValueError(f"Agent.blocks has index {i}; allowed range [0, {len(blocks)})")
            attn = getattr(blocks[i], "attn", None)
            if type(attn) not in (Attention, EvaAttention):
                raise ValueError(
                    f"Agent: block {i} of {type(model).__name__} uses {_qualname(attn)}, which is not supported; "
                    f"supported: {_SUPPORTED_MODELS}"
                )
        agents = []
        for i in idx:
            cls = EvaAgentAttention if type(blocks[i].attn) is EvaAttention else AgentAttention
            new = cls(blocks[i].attn, grid, model.num_prefix_tokens, self.num_agents, self.dwc_kernel)
            handle.replace(blocks[i], "attn", new.to(next(blocks[i].parameters()).device))
            agents.append(new)
        if callable(getattr(model, "set_input_size", None)):
            handle.set_method(model, "set_input_size", _resizing_set_input_size(model, agents, self.num_agents))

    def _inject_swin(self, model: nn.Module, handle) -> None:
        """Each block of the chosen stages: one global window (no shift) and agent attention over it."""
        if self.blocks is not None:
            raise ValueError("Agent.blocks applies to ViT-family models; for SwinTransformer use Agent.stages")
        stages = (0, 1) if self.stages is None else self.stages
        for s in stages:
            if not 0 <= s < len(model.layers):
                raise ValueError(f"Agent.stages has index {s}; allowed range [0, {len(model.layers)})")
            for blk in model.layers[s].blocks:
                if type(blk) is not SwinTransformerBlock:
                    raise ValueError(
                        f"Agent: Swin stage {s} has a {_qualname(blk)} block; expected SwinTransformerBlock"
                    )
                if getattr(blk, "dynamic_mask", False) or getattr(blk, "always_partition", False):
                    raise ValueError("Agent: Swin blocks with dynamic_mask/always_partition are not supported")
                agent_grid(self.num_agents, tuple(blk.input_resolution))  # validate before patching
        for s in stages:
            seq = model.layers[s].blocks
            for i, blk in enumerate(list(seq)):
                grid = tuple(int(r) for r in blk.input_resolution)
                view = make_view(blk, AgentSwinBlock)
                view._global_window()
                handle.replace(seq, str(i), view)
                new = AgentAttention(blk.attn, grid, 0, self.num_agents, self.dwc_kernel)
                handle.replace(view, "attn", new.to(next(blk.parameters()).device))

"""Mutation run for the layout-control and AgentSD code (Regional, Boundary, AgentSD, the UNet adapter and
their hooks in the shared files). Not collected by pytest; run by hand when these tests change:

    python tests/diffusion/mutation_layout.py [--only SUBSTRING] [--keep]

Same machinery as tests/diffusion/mutation.py (a copy of the tree in a temp dir, one snippet replaced
per mutation, the named tests run with -x): "killed" when a test fails, "SURVIVED" otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mutation_runner import main  # noqa: E402

T = "tests/diffusion/"
V = "diffusion_attn/variants/"
AG, RG, BD = T + "test_agentsd.py", T + "test_regional.py", T + "test_boundary.py"

MUTATIONS: list[tuple[str, str, str, str]] = [
    # AgentSD: ToMe matching, agents, formula, schedule, dispatch, options
    (V + "agentsd.py", "buf.scatter_(2, pick, -1)", "buf.scatter_(2, pick, 1)", AG),
    (V + "agentsd.py", "argsort(dim=-1, descending=True, stable=True)", "argsort(dim=-1, stable=True)", AG),
    (V + "agentsd.py", 'moved, reduce="mean")', 'moved, reduce="sum")', AG),
    (V + "agentsd.py", "self.has_agents = (N - agent_r) * 2 < N - r", "self.has_agents = N - agent_r < N - r", AG),
    (V + "agentsd.py", "out_m = out_m + shortcut * vm", "out_m = out_m + shortcut * km", AG),
    (V + "agentsd.py", "metric = ki.mean(dim=1)", "metric = qi.mean(dim=1)", AG + " -k dit"),
    (V + "agentsd.py", "            if ctx.layer == 0:\n", "            if ctx.layer == 1:\n", AG),
    (V + "agentsd.py", "rand = self.use_rand and ctx.batch % 2 == 0", "rand = self.use_rand", AG),
    (V + "agentsd.py", "* scale**exponent, dim=-1) @ agent_v", "* scale, dim=-1) @ agent_v", AG),
    (V + "agentsd.py", "qs = q * (scale ** (exponent - 1.0))", "qs = q", AG + " -k kernel_path"),
    (V + "agentsd.py", "out_t = attention(q[:, :, txt], k, v,", "out_t = attention(q[:, :, txt], kk, vv,", AG),
    (
        V + "agentsd.py",
        "return self.late_merge_ratio, self.late_agent_ratio, self.late_stride",
        "return self.late_merge_ratio, self.late_agent_ratio, self.stride",
        AG,
    ),
    (V + "agentsd.py", "Range(0.0, 1.0), Range(0, 1, lo_open=True)]", "Range(0.0, 1.0), Range(0, 1)]", AG),
    (V + "agentsd.py", 'if not agents and self.fallback == "softmax":', "if False:", AG),
    (V + "agentsd.py", "put(self.a_idx[self.unm_idx], unm)", "put(self.a_idx[self.unm_idx], unm.flip(2))", AG),
    # UNet adapter and the shared hooks
    ("diffusion_attn/adapters/unet.py", "            ds *= 2\n", "            ds *= 1\n", AG),
    ("diffusion_attn/adapters/unet.py", "self.processor.block_input = hs", "pass", AG),
    (
        "diffusion_attn/adapters/unet.py",
        "undo.append(lambda blk=blk: _remove_hook(blk, BLOCK_HOOK))",
        "undo.append(lambda: None)",
        AG + " -k remove",
    ),
    ("diffusion_attn/hooks.py", "handle._undo += adapter.install(model, runtime)", "pass", AG),
    (
        "diffusion_attn/hooks.py",
        "            for j, (name, module) in enumerate(crosses.get(id(model), ())):",
        "            for j, (name, module) in enumerate(()):",
        RG + " -k wan",
    ),
    (
        "diffusion_attn/runtime/planner.py",
        "            if layout.cross_len and not var.cross_attention:\n",
        "            if False:\n",
        RG + " -k never_see",
    ),
    (
        "diffusion_attn/runtime/engine.py",
        "out = plan.compute(qh, kh, vh, rt.kernel_backend)",
        "out = attention(qh, kh, vh, None, backend=rt.kernel_backend)",
        AG,
    ),
    # Regional: token rule, mask rules, inputs, CFG, checks
    (V + "regional.py", "return t.any(dim=3).any(dim=1)", "return t.all(dim=3).all(dim=1)", RG),
    (V + "regional.py", "allowed = allowed | (q_glob & k_ent) | (q_ent & k_glob)", "allowed = allowed", RG),
    (V + "regional.py", "own = q_ent & k_ent & (qs == ks)", "own = q_ent & k_ent", RG),
    (V + "regional.py", "| (q_ent & k_img & k_in)", "| (q_ent & k_img)", RG),
    (V + "regional.py", "return torch.where(negt[b], plain | own, allowed)", "return allowed", RG),
    (V + "regional.py", "allowed = (ks == G) | (k_ent & inside)", "allowed = (ks == G) | k_ent", RG),
    (V + "regional.py", 'if branch == "uncond" and not v.on_negative:', "if False:", RG + " -k wan"),
    (V + "regional.py", "torch.cat([ent, ehs], dim=1)", "torch.cat([ehs, ent], dim=1)", RG),
    (V + "regional.py", "            if key in seen:\n", "            if False:\n", RG),
    (V + "regional.py", "            if not px.any():\n", "            if False:\n", RG),
    (V + "regional.py", "            if (h * ppt, w * ppt) != (H, W):\n", "            if False:\n", RG),
    (V + "regional.py", "        self._first_batch = None\n\n    # -- apply", "        pass\n\n    # -- apply", RG),
    (V + "regional.py", "if H % ppt or W % ppt:", "if False:", RG),
    # Boundary: losses, update, capture, schedule, checks
    (V + "boundary.py", "frac = (m * inside)", "frac = (m * ~inside)", BD),
    (V + "boundary.py", "z = (z - self.loss_scale * sigma2 * grad)", "z = (z + self.loss_scale * sigma2 * grad)", BD),
    (V + "boundary.py", "* q.shape[-1] ** -0.5, dim=-1)", "* q.shape[-1] ** -0.5, dim=-2)", BD),
    (V + "boundary.py", "if q is not None and self.self_alignment:", "if False:", BD + " -k by_hand"),
    (V + "boundary.py", "            clock.source, clock.step = source, old_step\n", "            pass\n", BD),
    (V + "boundary.py", "if v._guided != (clock.generation, clock.step):", "if False:", BD),
    (
        V + "boundary.py",
        "if ours.shape[1:] != cond.shape[1:] or not torch.allclose(",
        "if False and not torch.allclose(",
        BD,
    ),
    (V + "boundary.py", "return x[in_batch // 2 :]", "return x[: in_batch // 2]", BD),
    (
        V + "boundary.py",
        "r0, r1 = int(math.floor(y0 * h)), int(math.ceil(y1 * h))",
        "r0, r1 = int(math.floor(y0 * h)), int(math.floor(y1 * h))",
        BD,
    ),
    (V + "boundary.py", "l_bd.append((1 - edges).mean())", "l_bd.append(edges.mean())", BD),
    (V + "boundary.py", "                if common:\n", "                if False:\n", BD),
    (V + "boundary.py", "or nxt > self.guidance_steps:", "or nxt > self.guidance_steps + 1:", BD),
    (
        V + "_pipes.py",
        "idx = list(range(offset + i, offset + i + len(ph_ids)))",
        "idx = list(range(offset + i + 1, offset + i + 1 + len(ph_ids)))",
        BD,
    ),
]


if __name__ == "__main__":
    raise SystemExit(main(MUTATIONS, __doc__))

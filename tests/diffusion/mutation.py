# ruff: noqa: E501  (a table of code snippets)
"""Small mutation run for the diffusion side (not collected by pytest; run by hand when tests change).

    python tests/diffusion/mutation.py [--only SUBSTRING] [--keep]

Copies the working tree to a temp dir (the shared checkout is never modified), then for each mutation
below replaces one snippet in one file, runs the named tests with `-x`, and reports whether a test
failed ("killed") or all passed ("SURVIVED"). Exit status 1 when a mutation survives or a snippet is
not found (the list is stale).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mutation_runner import main  # noqa: E402

T = "tests/diffusion/"

# (file, old snippet, new snippet, tests)
MUTATIONS: list[tuple[str, str, str, str]] = [
    # clock
    ("diffusion_attn/clock.py", "float(t.max())", "float(t.flatten()[0])", T + "test_clock.py"),
    ("diffusion_attn/clock.py", "(branch is not None and branch in self._branches)", "False", T + "test_clock.py"),
    ("diffusion_attn/clock.py", "sched is not None and sched != self._sched_index", "False", T + "test_clock.py"),
    ("diffusion_attn/clock.py", "if not self.fresh and index < self.step:", "if False:", T + "test_clock.py"),
    (
        "diffusion_attn/clock.py",
        "                self.run_num_steps = n\n",
        "                pass\n",
        T + "test_clock.py",
    ),
    ("diffusion_attn/clock.py", "if t > self.timestep:", "if t > 1e9:", T + "test_clock.py"),
    ("diffusion_attn/clock.py", 'n = getattr(pipe, "_num_timesteps", None)', "n = None", T + "test_clock.py"),
    # hooks
    (
        "diffusion_attn/hooks.py",
        "self._phases = self.handle.phase_steps()\n        rt.begin_forward(branch, None if context is None else self.branches.get_state().states)",
        "self._phases = self.handle.phase_steps()\n        rt.begin_forward(branch, None)",
        T + "test_branches.py",
    ),
    (
        "diffusion_attn/hooks.py",
        "clock=handle.clock,",
        "clock=StepClock(step_source, num_steps, pipe),",
        T + "test_clock.py",
    ),
    (
        "diffusion_attn/hooks.py",
        "            if module.processor is ours:",
        "            if True:",
        T + "test_processors.py",
    ),
    ("diffusion_attn/hooks.py", "self.runtime.clock.reset()  # diffusers", "pass  # diffusers", T + "test_clock.py"),
    (
        "diffusion_attn/hooks.py",
        '                    handle._warn_once(f"attnplug[{rt.family}] {rt.model_name}: {reason}")\n    except',
        "                    pass\n    except",
        T + "test_logging.py",
    ),
    ("diffusion_attn/hooks.py", "    return sharded\n", "    return []\n", T + "test_parallel.py"),
    ("diffusion_attn/hooks.py", "            if missing:", "            if False:", T + "test_apply.py"),
    # adapters/base
    (
        "diffusion_attn/adapters/base.py",
        "return args[i] if i is not None",
        "return args[i + 1] if i is not None",
        T + "test_clock.py",
    ),
    (
        "diffusion_attn/runtime/parallel.py",
        "    return torch.argsort(torch.cat(g2c)).to(device)",
        "        return None",
        T + "test_parallel.py",
    ),
    ("diffusion_attn/adapters/base.py", "            heads //= degree\n", "", T + "test_parallel.py"),
    (
        "diffusion_attn/adapters/base.py",
        "        return None if plan.is_dense else plan",
        "        return plan",
        T + "test_processors.py",
    ),
    (
        "diffusion_attn/adapters/base.py",
        "        setattr(original, name, value)",
        "        self.__dict__[name] = value",
        T + "test_apply.py",
    ),
    ("diffusion_attn/adapters/base.py", 'or not cls.__module__.startswith("diffusers.")', "", T + "test_processors.py"),
    (
        "diffusion_attn/runtime/branches.py",
        "            self.current = states\n",
        "            pass\n",
        T + "test_branches.py",
    ),
    ("diffusion_attn/runtime/planner.py", "if summary == self.last:", "if False:", T + "test_logging.py"),
    # adapters
    (
        "diffusion_attn/adapters/flux.py",
        "ip_attn_output += scale * current",
        "ip_attn_output += current",
        T + "test_processors.py",
    ),
    (
        "diffusion_attn/adapters/flux.py",
        "return encoder_hidden_states.shape[1] * degree",
        "return encoder_hidden_states.shape[1]",
        T + "test_parallel.py",
    ),
    ("diffusion_attn/adapters/flux.py", "query = attn.norm_q(query)\n        key", "key", T + "test_apply.py"),
    (
        "diffusion_attn/adapters/sd3.py",
        "hidden_states = hidden_states + ip_out * scale",
        "hidden_states = hidden_states",
        T + "test_processors.py",
    ),
    ("diffusion_attn/adapters/sd3.py", "query = self.norm_q(img_query)", "query = img_query", T + "test_processors.py"),
    (
        "diffusion_attn/adapters/ltx_video.py",
        "(self.forward_arg(model, args, kwargs, k) for",
        "(kwargs.get(k) for",
        T + "test_clock.py",
    ),
    ("diffusion_attn/adapters/hunyuan_video.py", "attention_mask.dtype != torch.bool or ", "", T + "test_apply.py"),
    ("diffusion_attn/adapters/wan.py", "or attention_mask is not None", "", T + "test_apply.py"),
    # variants
    ("diffusion_attn/variants/radial.py", "(count * 3 > n_tail)", "(count * 3 > b)", T + "test_radial.py"),
    ("diffusion_attn/variants/radial.py", "    if text_len == 0 and tail:", "    if False:", T + "test_radial.py"),
    (
        "diffusion_attn/variants/radial.py",
        "row |= high * 5 > nonzero * 3",
        "row |= high * 5 >= nonzero * 3",
        T + "test_radial.py",
    ),
    ("diffusion_attn/variants/radial.py", "max(r0, i * s) - i * s", "max(r0 + 1, i * s) - i * s", T + "test_radial.py"),
    (
        "diffusion_attn/variants/radial.py",
        'cfg["dense_steps"] + self.dense_last_steps >= total',
        'cfg["dense_steps"] > total',
        T + "test_logging.py",
    ),
    (
        "diffusion_attn/variants/lite.py",
        'unit = layout.tokens_per_frame if self.range_unit == "frame" else 1',
        "unit = layout.tokens_per_frame",
        T + "test_lite.py",
    ),
    (
        "diffusion_attn/variants/lite.py",
        "if num_steps is not None and self.warmup_steps >= num_steps:",
        "if False:",
        T + "test_logging.py",
    ),
    (
        "diffusion_attn/variants/neighborhood.py",
        "leader = torch.minimum((q_di // stride) * stride + stride // 2, n_g - 1)",
        "leader = torch.minimum((q_di // stride) * stride, n_g - 1)",
        T + "test_variants_e2e.py -k oracle",
    ),
]
MUTATIONS += [
    (
        "diffusion_attn/variants/lite.py",
        "newly = visit & ~needed.to(",
        "newly = ~needed.to(",
        T + "test_lite.py",
    ),
    (
        "diffusion_attn/variants/radial.py",
        "    if sink and j == 0:\n        return math.inf",
        "    if sink and j == 1:\n        return math.inf",
        T + "test_variants_e2e.py -k oracle",
    ),
]

if __name__ == "__main__":
    raise SystemExit(main(MUTATIONS, __doc__))

"""Mutation run for issue 11 (SoftPAG, SoftPAGGuidance, HeadHunter, UltraViCo, RIFLEx, attnplug headhunt and
their extension points); not collected by pytest, run by hand when these tests change.

    python tests/diffusion/mutation_guidance.py [--only SUBSTRING] [--keep]

Same runner as `tests/diffusion/mutation.py` (a temp copy of the working tree, one snippet replaced per run, the
named tests with -x): "killed" when a test fails, "SURVIVED" otherwise; exit status 1 on a survivor or a stale
snippet.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mutation_runner import main  # noqa: E402

T = "tests/diffusion/"
SP, UV, RF = (
    "diffusion_attn/variants/softpag.py",
    "diffusion_attn/variants/ultravico.py",
    "diffusion_attn/variants/riflex.py",
)
GD, HH, CLI = "diffusion_attn/guidance.py", "diffusion_attn/headhunter.py", "attn_pipelines/commands/headhunt.py"
TS, TU, TG, TH = T + "test_softpag.py", T + "test_ultravico.py", T + "test_guider.py", T + "test_headhunter.py"

MUTATIONS: list[tuple[str, str, str, str]] = [
    # SoftPAG
    (SP, "u[chosen] = self.u", "u[chosen] = 1.0", TS + " -k heads_select"),
    (
        SP,
        "            return _with_sample(out, sample + d)\n",
        "            return out\n",
        TS + " -k sequential",
    ),
    (SP, "d = v.scale * (eps_c - pert)", "d = v.scale * (pert - eps_c)", TS + " -k without_cfg"),
    (SP, "eps_c = sample[total // 2 :] if batched", "eps_c = sample[: total // 2] if batched", TS + " -k sd3"),
    (SP, "if branch in _UNCOND or (branch not in _COND and have):", "if branch in _UNCOND:", TS + " -k sd3"),
    (SP, "flag = bool(pipe.do_classifier_free_guidance)", "flag = False", TS + " -k sd3"),
    (SP, "if rt.perturbed or v.scale == 0 or v.u == 0", "if rt.perturbed or v.u == 0", TS + " -k bit_identical"),
    (SP, "<= step < int(self.stop * num_steps)", "<= step <= int(self.stop * num_steps)", TS + " -k schedule"),
    (SP, "            if head >= heads:", "            if head > heads:", TS + " -k unknown_heads"),
    (SP, "            return list(range(heads))", "            return list(range(heads - 1))", TS + " -k identity"),
    (SP, "value[total // 2 :] if value.dim() > 0", "value[: total // 2] if value.dim() > 0", TS + " -k sd3"),
    (SP, '        if self.mode == "guider":  # the guider\'s', "        if False:  # the guider's", TG),
    # extension points (hooks.py, adapters/base.py)
    (
        "diffusion_attn/hooks.py",
        "        if rt.perturbed:  # a guidance",
        "        if False:  # a guidance",
        TS + " -k sequential",
    ),  # fmt: skip
    (
        "diffusion_attn/hooks.py",
        "                registry.remove_hook(name, recurse=False)\n        self._variant_hooks",
        "                pass\n        self._variant_hooks",
        TS + " -k remove_restores",
    ),  # fmt: skip
    (
        "diffusion_attn/hooks.py",
        "            v.check_apply(adapter.name, mods, tuple(variants))",
        "            pass",
        TS + " -k unknown_heads",
    ),  # fmt: skip
    (
        "diffusion_attn/runtime/engine.py",
        "acc = (acc * w1[..., None] + o2.float() * w2[..., None])",
        "acc = (acc * w1[..., None] + 0 * w2[..., None])",
        TU + " -k beta_band",
    ),  # fmt: skip
    (
        "diffusion_attn/runtime/planner.py",
        "key=lambda iv: _ROLE_RANK.get(iv[1].role, 1))",
        "key=lambda iv: 0)",
        TU + " -k composes",
    ),  # fmt: skip
    ("diffusion_attn/runtime/planner.py", "                perturbed=perturbed,\n", "", TS + " -k identity"),
    # UltraViCo
    (
        UV,
        'return layout.tokens_per_frame * self.resolved(layout.family)["train_frames"] // 2',
        'return layout.tokens_per_frame * self.resolved(layout.family)["train_frames"] // 4',
        TU + " -k rule",
    ),  # fmt: skip
    (
        UV,
        "pos = torch.full((layout.seq_len,), -1, dtype=torch.int32)",
        "pos = torch.zeros((layout.seq_len,), dtype=torch.int32)",
        TU + " -k rule",
    ),  # fmt: skip
    (
        UV,
        'layout.frames <= self.resolved(layout.family)["train_frames"])',
        'layout.frames < self.resolved(layout.family)["train_frames"])',
        TU + " -k within",
    ),  # fmt: skip
    (UV, "    in_band &= (pq >= 0) & (pk >= 0)\n", "", TU + " -k partition"),
    (UV, "        inside |= (dmin >= a) & (dmax <= b)", "        inside |= dmin >= a", TU + " -k partition"),
    (UV, "            pos = pos[perm.cpu()]\n", "", TU + " -k composes"),
    (
        UV,
        "(j * period + width) * tokens_per_frame))",
        "(j * period + width - 1) * tokens_per_frame))",
        TU + " -k window",
    ),  # fmt: skip
    (UV, "        if sparse and beta is not None", "        if False and beta is not None", TU + " -k refusals"),
    (UV, "            plan.extra = (*plan.extra, *extra)\n", "", TU + " -k beta_band"),
    # RIFLEx
    (
        RF,
        "omega = torch.tensor(self.factor * 2 * math.pi / length",
        "omega = torch.tensor(self.factor * 2 * math.pi / (length + 1)",
        TU + " -k riflex",
    ),  # fmt: skip
    (RF, "self.col = 2 * (k - 1)", "self.col = 2 * k", TU + " -k riflex_sets"),
    (RF, "if not self.always and length <= self.period(d_t, theta, family):", "if False:", TU + " -k riflex"),
    (
        RF,
        '                registry.remove_hook("attnplug_riflex", recurse=False)\n',
        "                pass\n",
        TU + " -k riflex_sets",
    ),  # fmt: skip
    # SoftPAGGuidance
    (
        GD,
        "pred = pred + self.perturbed_guidance_scale * (pred_cond - pred_cond_perturbed)",
        "pred = pred + self.perturbed_guidance_scale * (pred_uncond - pred_cond_perturbed)",
        TG + " -k formula",
    ),  # fmt: skip
    (
        GD,
        "if self._is_pag_enabled() and self._count_prepared == self.num_conditions:\n            rt",
        "if self._is_pag_enabled() and self._count_prepared == 1:\n            rt",
        TG + " -k formula",
    ),  # fmt: skip
    (GD, "self._flagged.pop().perturbed = False", "self._flagged.pop()", TG + " -k formula"),
    (GD, "v.scale != 0 and v.u != 0", "v.u != 0", TG + " -k bit_for_bit"),
    # HeadHunter and attnplug headhunt
    (HH, "key=lambda kv: (-kv[1], _unkey(kv[0])))", "key=lambda kv: (kv[1], _unkey(kv[0])))", TH + " -k planted"),
    (HH, "self.score([*selected, head])", "self.score([head])", TH + " -k greedy"),
    (HH, 'and _key(h) not in rnd["scores"]]', "]", TH + " -k resumes"),
    (
        HH,
        "                    if p is not None:\n                        self._save(state, p)\n",
        "                pass\n",
        TH + " -k saved_after",
    ),  # fmt: skip
    (
        HH,
        'vals.append(float(tv(x, reduction="sum")) / x.numel())',
        'vals.append(float(tv(x, reduction="sum")) / x[0].numel())',
        TH + " -k exact",
    ),  # fmt: skip
    (
        HH,
        "vals.append(float(metric(list(x), [prompt] * x.shape[0])))",
        "vals.append(float(metric(list(x[:1]), [prompt])))",
        TH + " -k clip",
    ),  # fmt: skip
    (
        HH,
        "if max_evaluations is not None and done_here >= max_evaluations:",
        "if max_evaluations is not None and done_here > max_evaluations:",
        TH + " -k resumes",
    ),  # fmt: skip
    (
        HH,
        '    return [k for k, v in settings.items() if (state.get("settings") or {}).get(k) != v]',
        "    return []",
        TH + " -k refuses",
    ),  # fmt: skip
    (CLI, "    if len(seeds) != len(prompts):", "    if False:", "tests/pipelines/test_cli_headhunt.py -k bad_input"),
    (
        CLI,
        "diff = [] if args.restart else resume_conflicts(target.path, settings)",
        "diff = []",
        "tests/pipelines/test_cli_headhunt.py -k before_loading",
    ),  # fmt: skip
]

if __name__ == "__main__":
    raise SystemExit(main(MUTATIONS, __doc__))

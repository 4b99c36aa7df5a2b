# ruff: noqa: E501  (a table of code snippets)
"""Small mutation run for the timm side (not collected by pytest; run by hand when these tests change).

    python tests/vision/mutation.py [--only SUBSTRING]

Copies the working tree to a temp dir (the shared checkout is never modified), then for each mutation
below replaces one snippet in one file, runs the named tests with `-x`, and reports "killed" (a test
failed) or "SURVIVED". Exit status 1 when a mutation survives or a snippet is not found (stale list).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mutation_runner import main  # noqa: E402

V = "tests/vision/"
AGENT, AA, CE, FT, TC = V + "test_agent.py", V + "test_agent_attention.py", V + "test_coord_eca.py", V + "test_finetune.py", V + "test_timm_conventions.py"  # fmt: skip
ORACLE = AGENT + " -k independent_reference"
PLACE = CE + " -k placement"

# (file, old snippet, new snippet, pytest arguments)
MUTATIONS: list[tuple[str, str, str, str]] = [
    # agent attention: biases, pooling, scale, DWC, prefix tokens
    ("vision_attn/variants/agent.py", "b1 = (b1 + self.ah_bias + self.aw_bias)", "b1 = (b1 + self.ah_bias)", ORACLE),
    ("vision_attn/variants/agent.py", "b2 = (b2 + self.ha_bias + self.wa_bias)", "b2 = (b2 + self.wa_bias)", ORACLE),
    ("vision_attn/variants/agent.py", "b1 = torch.cat([ac, b1], dim=-1)", "b1 = torch.cat([b1, ac], dim=-1)", ORACLE),
    ("vision_attn/variants/agent.py", "b2 = torch.cat([ca, b2], dim=-2)", "b2 = torch.cat([b2, ca], dim=-2)", ORACLE),
    (
        "vision_attn/variants/agent.py",
        'b1 = F.interpolate(self.an_bias, size=(gh, gw), mode="bilinear", align_corners=False)',
        'b1 = F.interpolate(self.an_bias, size=(gh, gw), mode="bilinear", align_corners=True)',
        ORACLE,
    ),
    ("vision_attn/variants/agent.py", "(agents * self.scale) @ k.transpose", "agents @ k.transpose", ORACLE),
    ("vision_attn/variants/agent.py", "qp = q[:, :, p:].reshape", "qp = k[:, :, p:].reshape", ORACLE),
    ("vision_attn/variants/agent.py", "out[:, p:] + dwc], dim=1)", "out[:, p:] + 0 * dwc], dim=1)", ORACLE),
    ("vision_attn/variants/agent.py", "return min(pairs, key=", "return max(pairs, key=", AA + " -k rectangular"),
    # EVA: rope, gate, separate biases; Swin: global window
    ("vision_attn/variants/agent.py", "        if rope is not None:\n", "        if False:\n", AGENT + " -k eva"),
    ("vision_attn/variants/agent.py", "gate = self.gate(x).sigmoid()", "gate = self.gate(x)", AGENT + " -k eva"),
    (
        "vision_attn/variants/agent.py",
        "bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))",
        "bias = torch.cat((self.q_bias, self.q_bias, self.v_bias))",
        AGENT + " -k eva",
    ),
    ("vision_attn/variants/agent.py", "self.shift_size = (0, 0)", "self.shift_size = (1, 1)", AGENT + " -k swin"),
    ("vision_attn/variants/agent.py", "        self.attn.set_grid(self.input_resolution)\n", "", AGENT + " -k swin"),
    # CNN placement rules (block views)
    (
        "vision_attn/adapters/cnn.py",
        "        x = self.bn3(x)\n        x = self.eca(x)\n        if self.has_skip:",
        "        x = self.eca(x)\n        x = self.bn3(x)\n        if self.has_skip:",
        PLACE,
    ),
    (
        "vision_attn/adapters/cnn.py",
        "        x = self.se(x)\n        x = self.coord(x)\n        x = self.conv_pwl(x)",
        "        x = self.se(x)\n        x = self.conv_pwl(x)",
        PLACE,
    ),
    (
        "vision_attn/adapters/cnn.py",
        "        x = self.eca(x)\n        if self.gamma is not None:\n            x = x.mul(self.gamma.reshape(1, -1, 1, 1))\n",
        "        if self.gamma is not None:\n            x = x.mul(self.gamma.reshape(1, -1, 1, 1))\n        x = self.eca(x)\n",
        PLACE,
    ),
    ("vision_attn/adapters/cnn.py", "        x = self.conv_dw(x)\n        x = self.coord(x)\n", "        x = self.conv_dw(x)\n", PLACE),
    (
        "vision_attn/adapters/cnn.py",
        "        x = self.conv3(x)\n        x = self.eca(x)\n",
        "        x = self.eca(x)\n        x = self.conv3(x)\n",
        PLACE,
    ),
    ("vision_attn/adapters/cnn.py", "if block.conv_pw.out_channels == block.conv_pw.in_channels:", "if False:", PLACE),
    (
        "vision_attn/adapters/cnn.py",
        'return [Placement("view", "eca", block.bn2.num_features)] if kind == "eca" else []',
        'return [Placement("view", kind, block.bn2.num_features)]',
        PLACE,
    ),
    ("vision_attn/adapters/cnn.py", 'slot = "se" if _empty(getattr(block, "se", None)) else None', 'slot = "se"', PLACE),
    # injection bookkeeping
    ("vision_attn/inject.py", "if live and self in live and live[-1] is not self:", "if False:", AGENT + " -k second"),
    ("vision_attn/inject.py", "if not h.removed and type(h.variant) is type(variant):", "if False:", AGENT + " -k second"),
    ("vision_attn/inject.py", "if id(p) not in before]", "]", FT + " -k agent_train_only"),
    # channel modules and gates
    ("vision_attn/variants/_gates.py", "return 2.0 * torch.sigmoid(x)", "return torch.sigmoid(x)", CE + " -k 'identity and resnet18'"),
    ("vision_attn/variants/eca.py", "y = x.mean((2, 3)).view", "y = x.amax((2, 3)).view", CE + " -k interchange"),
    ("vision_attn/variants/coord.py", "out = identity * a_w * a_h", "out = identity * a_h", CE + " -k interchange"),
    ("vision_attn/variants/eca.py", "return max(t if t % 2 else t + 1, 3)", "return max(t if t % 2 else t - 1, 3)", CE + " -k 'paper or interchange'"),
    # checkpoint loading
    (
        "vision_attn/checkpoint.py",
        "if k in own and own[k].shape != state[k].shape:",
        "if k in own and (own[k].shape != state[k].shape or is_cls(k)):",
        FT + " -k classifier",
    ),
    ("vision_attn/checkpoint.py", "state[k] = adapt_input_conv(own[k].shape[1], state[k])", "pass", TC + " -k 'in_chans1 and eca_mobilenet'"),
    # fine-tuning
    ("vision_attn/finetune.py", "p.requires_grad_(n in keep or n.startswith(also))", "p.requires_grad_(True)", FT + " -k agent_train_only"),
    ("vision_attn/finetune.py", 'kind = "timm" if _imagenet_like(train_dir) else "simple"', 'kind = "timm"', FT + " -k img_size"),
    ("vision_attn/finetune.py", "min(im.size) < 128", "min(im.size) < 16", FT + " -k img_size"),
    ("vision_attn/finetune.py", "if args.epochs < 1 and not args.eval_only:", "if False:", FT + " -k clear_errors"),
    ("vision_attn/finetune.py", '    model.load_state_dict(load_file(str(run / "model.safetensors")))\n', "", FT + " -k round_trip"),
    ("vision_attn/finetune.py", "return timm.create_model(name, img_size=img_size, **kwargs)", "pass", FT + " -k img_size"),
    # calibration, spec
    ("vision_attn/calibrate.py", "            opt.step()\n            sched.step()\n            if step % 50 == 0 or step == distill_steps - 1:", "            sched.step()\n            if step % 50 == 0 or step == distill_steps - 1:", AGENT + " -k calibration"),
    ("vision_attn/spec.py", "if f.init and getattr(variant, f.name) != f.default", "if f.init", FT + " -k parse_variant"),
]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main(MUTATIONS, __doc__))

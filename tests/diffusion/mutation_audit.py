# ruff: noqa: E501  (a table of code snippets)
"""Mutations of the six bug classes the audit planted and the suite missed (issue 21), each against the test
written for its class in tests/diffusion/test_audit_classes.py (not collected by pytest).

    python tests/diffusion/mutation_audit.py [--only SUBSTRING]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mutation_runner import main  # noqa: E402

A = "tests/diffusion/test_audit_classes.py"
MUTATIONS = [
    # a family's default for a modifier changed
    ("diffusion_attn/variants/riflex.py", '{"wan": 6, "hunyuan_video": 4', '{"wan": 5, "hunyuan_video": 4', A + " -k pinned"),
    ("diffusion_attn/variants/ultravico.py", '"hunyuan_video": (33, 0.6, 50)', '"hunyuan_video": (33, 0.5, 50)', A + " -k pinned"),
    # a cache keyed on a tensor's shape instead of its contents
    ("diffusion_attn/runtime/key_masks.py", "                if torch.equal(e[\"mask\"], key_mask):", "                if True:", A + " -k key_mask"),
    # a greedy search visiting candidates in the wrong order
    ("diffusion_attn/headhunter.py", "            for head in range(self.signature[\"heads\"][layer])", "            for head in reversed(range(self.signature[\"heads\"][layer]))", A + " -k greedy"),
    ("diffusion_attn/headhunter.py", "key=lambda kv: (-kv[1], _unkey(kv[0]))", "key=lambda kv: (-kv[1], tuple(-x for x in _unkey(kv[0])))", A + " -k greedy"),
    # an output file's permissions
    ("attn_pipelines/io.py", "            os.chmod(tmp, 0o666 & ~umask)", "            pass", A + " -k permissions"),
    # a zero or empty CLI value not overriding a preset
    ("attn_pipelines/commands/generate.py", "    if cli is not None:\n        return cli", "    if cli:\n        return cli", A + " -k preset"),
    # a guidance shift applied to half of a mixed batch
    ("diffusion_attn/variants/softpag.py", "sample + (torch.cat([d, d]) if batched else d)", "sample + (torch.cat([torch.zeros_like(d), d]) if batched else d)", A + " -k halves"),
]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main(MUTATIONS, __doc__))

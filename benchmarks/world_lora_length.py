"""Length-extension LoRA on the world's text-to-video model: radial-trained vs dense-trained vs the plain
model, UltraViCo and RIFLEx at 17 and 33 frames (issue 22). One command, every stage skipped when done:

    python benchmarks/world_lora_length.py --work runs/world/lora_length            # the run in docs/world.md
    python benchmarks/world_lora_length.py --work /tmp/x --steps 2 --clips 2 --prompts 1 --inference-steps 2 \
        --results /tmp/x --assets ""                                                   # a smoke run, ~2 min

Writes benchmarks/results/world_lora_length.{json,png} and the two LoRAs with their model cards to
assets/world/lora/{radial,dense}/. What each stage does: attn_pipelines/world/lora_length.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_pipelines.world.lora_length import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""Data shipped inside the wheel as `attn_pipelines.assets` (pyproject maps this folder there): the world's
trained checkpoints and samples (`world/`, found by `attn_pipelines.world.models.world_dir`) and the mask
drawings of the docs (`masks/`). No code lives here."""

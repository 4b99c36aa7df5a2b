"""YAML presets for real checkpoints; shipped in the wheel as `attn_pipelines.configs`."""

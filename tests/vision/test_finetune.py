"""The accelerate fine-tuning script on a tiny generated ImageFolder (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vision_attn.finetune import main, parse_variant


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three learnable classes: red, green, blue squares with noise."""
    root = tmp_path_factory.mktemp("imagefolder")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(32, 32, 3, generator=g) * 60).to(torch.uint8)
                arr[..., c] += 180
                Image.fromarray(arr.numpy()).save(d / f"{i}.png")
    return root


def _args(data, out, variant, *extra):
    return ["--model", "resnet10t", "--variant", variant, "--data", str(data), "--out", str(out), "--num-classes", "3",
            "--img-size", "32", "--batch-size", "8", "--lr", "3e-3", "--no-augment", "--cpu", *extra]  # fmt: skip


@pytest.mark.parametrize("variant", ["eca", "coord:reduction=8"])
def test_finetune_learns_and_checkpoint_reloads(data, tmp_path, variant):
    out = tmp_path / "run"
    assert main(_args(data, out, variant, "--max-steps", "12")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["loss_last"] < metrics["loss_first"]  # it learns
    assert "val_top1" in metrics
    import timm
    from safetensors.torch import load_file

    import vision_attn as va

    model = timm.create_model("resnet10t", num_classes=3)
    va.inject(model, parse_variant(variant))
    model.load_state_dict(load_file(out / "model.safetensors"))  # strict: same keys as the trained one


def test_train_only_new_freezes_the_backbone(data, tmp_path):
    out = tmp_path / "run"
    # timm zero-inits each block's last BN, which would feed ECA all-zero maps: start like a pretrained net
    kwargs = ["--model-kwargs", '{"zero_init_last": false}']
    assert main(_args(data, out, "eca", "--max-steps", "2", "--train-only-new", *kwargs)) == 0
    import timm
    from safetensors.torch import load_file

    trained = load_file(out / "model.safetensors")
    torch.manual_seed(0)
    fresh = timm.create_model("resnet10t", num_classes=3, zero_init_last=False).state_dict()
    assert torch.equal(trained["fc.weight"], fresh["fc.weight"])  # backbone frozen
    assert any(k.endswith("se.conv.weight") and trained[k].abs().sum() > 0 for k in trained)  # ECA trained


def test_bad_variant_and_missing_data_are_clear_errors(data, tmp_path, capsys):
    assert main(_args(data, tmp_path, "eca:kernel=3", "--max-steps", "1")) == 2
    assert "valid options: ['kernel_size', 'mode']" in capsys.readouterr().err
    assert main(_args(tmp_path / "nope", tmp_path, "eca", "--max-steps", "1")) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown variant 'se'"):
        parse_variant("se")


def test_cli_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "vision_attn.finetune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--variant" in r.stdout

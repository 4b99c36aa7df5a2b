"""`python -m vision_attn.finetune` on a tiny generated ImageFolder, on the CPU: the injected modules
learn, the checkpoint's classifier survives loading, `--train-only-new` trains exactly the injected
parameters, `--eval-only`, `load_finetuned` round trip, transforms, clear errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vision_attn as va
from vision_attn.finetune import _imagenet_like, main, make_transform
from vision_attn.spec import parse_variant, variant_spec

CLASSES = ("blue", "green", "red")
TINY_VIT = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
RESNET = {"zero_init_last": False}  # timm zero-inits each block's last BN: ECA would see all-zero maps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three learnable classes: noisy 32x32 images dominated by one colour, with a class stripe."""
    root = tmp_path_factory.mktemp("imagefolder")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(32, 32, 3, generator=g) * 60).to(torch.uint8)
                arr[..., c] += 160
                arr[4 * c : 4 * c + 4, :, :] = 255
                Image.fromarray(arr.numpy()).save(d / f"{i}.png")
    return root


def _args(data, out, model, variant=None, kwargs=None, *extra):
    args = ["--model", model, "--data", str(data), "--out", str(out), "--img-size", "32", "--no-augment", "--cpu",
            "--quiet"]  # fmt: skip
    if variant:
        args += ["--variant", variant]
    if kwargs:
        args += ["--model-kwargs", json.dumps(kwargs)]
    return [*args, *extra]


def _read(out):
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("variant", ["eca", "coord:reduction=8"])
def test_injected_modules_learn_alone(data, tmp_path, variant):
    """Only the injected parameters train (backbone and head frozen, zero_init_last off): the loss on
    the fixed batch falls, so the modules themselves learn; everything else is bit-identical."""
    out = tmp_path / "run"
    extra = ["--batch-size", "24", "--lr", "3e-2", "--max-steps", "15", "--weight-decay", "0", "--train-only-new"]
    assert main(_args(data, out, "resnet10t", variant, RESNET, *extra)) == 0
    metrics, config = _read(out)
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < 0.93 * losses[0] and losses[-1] < min(losses[:5]), losses
    state = load_file(out / "model.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask  # not safetensors' 0600
    torch.manual_seed(0)
    fresh = timm.create_model("resnet10t", num_classes=3, **RESNET)
    h = va.inject(fresh, parse_variant(variant))
    new = set(h.new_parameter_names)
    assert set(config["new_parameters"]) == new and metrics["params_trained"] == sum(state[k].numel() for k in new)
    init = fresh.state_dict()
    params = [n for n, _ in fresh.named_parameters()]  # (BN running statistics are buffers: they update)
    assert all(torch.equal(state[k], init[k]) for k in params if k not in new)  # frozen
    gates = [k for k in new if k.split(".")[-2] in ("conv", "conv_h", "conv_w")]
    moved = [k for k in gates if not torch.equal(state[k], init[k])]
    assert len(moved) >= 0.75 * len(gates), sorted(set(gates) - set(moved))  # (1x1 maps in the last stage)


def test_agent_train_only_new_counts_exactly_the_new_parameters(data, tmp_path):
    """Agent attention reuses timm's qkv / proj: --train-only-new trains biases + DWC only."""
    out = tmp_path / "run"
    args = ["--max-steps", "2", "--train-only-new", "--batch-size", "12", "--lr", "1e-2"]
    assert main(_args(data, out, "vit_tiny_patch16_224", "agent:num_agents=4", TINY_VIT, *args)) == 0
    metrics, config = _read(out)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, **TINY_VIT)
    h = va.inject(model, va.Agent(num_agents=4))
    expected = sum(p.numel() for p in h.new_parameters().values())
    assert metrics["params_trained"] == expected
    assert set(config["new_parameters"]) == set(h.new_parameter_names)
    assert not any(k.endswith(("qkv.weight", "proj.weight")) for k in config["new_parameters"])
    # a registered name: its built-in injection counts the same way
    out2 = tmp_path / "run2"
    kw = {**TINY_VIT, "num_agents": 4}
    assert main(_args(data, out2, "agent_deit_tiny_patch16_224", None, kw, *args)) == 0
    assert _read(out2)[0]["params_trained"] == expected


def test_classifier_survives_loading_and_round_trip(data, tmp_path, capsys):
    """Train -> reload three ways (load_finetuned, --eval-only with the file, timm + load_checkpoint):
    same accuracy; the checkpoint's classifier is kept (and the run says so)."""
    out = tmp_path / "run"
    extra = ["--batch-size", "24", "--lr", "3e-3", "--max-steps", "12"]
    assert main(_args(data, out, "resnet10t", "eca", RESNET, *extra)) == 0
    metrics, config = _read(out)
    assert isinstance(config["num_classes"], int) and isinstance(config["img_size"], int)
    assert config["variant"] == "eca" and config["classes"] == sorted(CLASSES) and config["args"]["max_steps"] == 12
    model = va.load_finetuned(out)
    from vision_attn.finetune import evaluate

    ds = __import__("torchvision").datasets.ImageFolder(
        str(data / "val"), transform=make_transform(config["data_config"], config["transform"], training=False)
    )
    acc = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=5))
    assert acc == pytest.approx(metrics["val_top1"], abs=1e-9) and acc > 1 / 3
    capsys.readouterr()
    ev = tmp_path / "eval"
    args = ["--pretrained-file", str(out / "model.safetensors"), "--eval-only", "--seed", "7"]
    assert main(_args(data, ev, "resnet10t", "eca", RESNET, *args)) == 0
    assert "classifier is kept" in capsys.readouterr().out
    assert json.loads((ev / "metrics.json").read_text())["val_top1"] == pytest.approx(metrics["val_top1"], abs=1e-9)
    # a checkpoint whose classifier does not fit is replaced, loudly
    other = timm.create_model("resnet10t", num_classes=5, **RESNET)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "five.safetensors"))
    with pytest.warns(UserWarning, match="REPLACED"):
        assert main(_args(data, ev, "resnet10t", None, RESNET, "--pretrained-file", str(tmp_path / "five.safetensors"),
                          "--eval-only")) == 0  # fmt: skip
    assert "REPLACED by a freshly initialised one" in capsys.readouterr().out


def test_img_size_reaches_the_model_and_transforms(data, tmp_path):
    out = tmp_path / "run"
    kw = {k: v for k, v in TINY_VIT.items()}
    assert main(_args(data, out, "vit_tiny_patch16_224", "agent:num_agents=4,blocks=(0,)", kw, "--max-steps", "1")) == 0
    _, config = _read(out)
    assert config["data_config"]["input_size"] == [3, 32, 32] and config["transform"] == "simple"
    assert config["variant"] == "agent:num_agents=4,blocks=(0,)"  # typed JSON, a spec that parses back
    model = va.load_finetuned(out)
    assert tuple(model.patch_embed.img_size) == (32, 32)
    assert [type(b.attn).__name__ for b in model.blocks] == ["AgentAttention", "Attention"]
    assert not _imagenet_like(data / "train")  # 32 px images: the simple transform
    big = tmp_path / "big" / "a"
    big.mkdir(parents=True)
    Image.new("RGB", (160, 200)).save(big / "0.jpg")
    assert _imagenet_like(tmp_path / "big")
    cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.9}
    simple = make_transform(cfg, "simple", training=True)
    img = Image.open(next((data / "train" / "red").iterdir()))
    assert torch.equal(simple(img), simple(img))  # deterministic: no random ops
    assert "RandomResizedCrop" in repr(make_transform(cfg, "timm", training=True))


def test_parse_variant_round_trips():
    a = parse_variant("agent:num_agents=49,blocks=(0,1,2,3),dwc_kernel=5")
    assert a == va.Agent(num_agents=49, blocks=(0, 1, 2, 3), dwc_kernel=5)
    assert parse_variant(variant_spec(a)) == a
    e = parse_variant("eca:kernel_size=None,mode=original")
    assert e == va.ECA(kernel_size=None, mode="original") and variant_spec(e) == "eca:mode=original"
    assert variant_spec(va.Agent(num_agents=4, blocks=(0,))) == "agent:num_agents=4,blocks=(0,)"
    for bad, msg in [
        ("eca:kernel_size", "is not key=value"),
        ("agent:blocks=3", r"agent.blocks: expected tuple\[int, ...\] \| None, got 3"),
        ("agent:blocks=(-1,)", r"Agent.blocks must hold int indices >= 0"),
        ("agent:num_agents=4,num_agents=9", "given twice"),
        ("", "empty variant spec"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_variant(bad)


def test_clear_errors(data, tmp_path, capsys):
    def err(*argv) -> str:
        assert main(list(argv)) == 2
        msg = capsys.readouterr().err
        assert msg.startswith("error: ") and len(msg) > 12
        return msg

    base = ("--data", str(data), "--out", str(tmp_path / "o"), "--cpu", "--max-steps", "1", "--img-size", "32")
    assert "unknown option 'kernel' for variant 'eca'; valid options: kernel_size, mode" in err(
        "--model", "resnet10t", "--variant", "eca:kernel=3", *base
    )
    assert "unknown variant 'se'; valid variants: agent, coord, eca" in err(
        "--model", "resnet10t", "--variant", "se", *base
    )
    assert "ECA.kernel_size must be an odd int" in err("--model", "resnet10t", "--variant", "eca:kernel_size=4", *base)
    assert "unknown timm model 'resnet_nope'" in err("--model", "resnet_nope", "--variant", "eca", *base)
    assert "--pretrained-file: '/no/such.pth' does not exist" in err(
        "--model", "resnet10t", "--pretrained-file", "/no/such.pth", *base
    )
    assert "--epochs must be >= 1, got 0 (use --eval-only" in err("--model", "resnet10t", "--epochs", "0", *base[:-4])
    assert "is not a directory" in err("--model", "resnet10t", "--data", str(tmp_path / "nope"), "--cpu")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    assert "no images under" in err("--model", "resnet10t", "--data", str(tmp_path / "empty"), "--cpu")
    assert "--num-classes 5 but the dataset has 3 classes" in err("--model", "resnet10t", "--num-classes", "5", *base)
    assert "--model-kwargs must be a JSON object" in err("--model", "resnet10t", "--model-kwargs", "{img", *base)
    assert "--train-only-new needs an injection" in err("--model", "resnet10t", "--train-only-new", *base)


def test_cli_subprocess(data, tmp_path):
    """`python -m vision_attn.finetune`: --help exits 0; a bad variant exits 2 with the message."""
    r = subprocess.run([sys.executable, "-m", "vision_attn.finetune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--variant" in r.stdout and "--train-only-new" in r.stdout and "--eval-only" in r.stdout
    cmd = [sys.executable, "-m", "vision_attn.finetune", *_args(data, tmp_path, "resnet10t", "agent:agents=4")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert (
        "unknown option 'agents' for variant 'agent'; valid options: num_agents, blocks, dwc_kernel, stages" in r.stderr
    )

"""timm's own per-model checks over every model name attnplug registers.

Mirrors timm's tests/test_models.py (huggingface/pytorch-image-models): test_model_forward
(+ grad checkpointing), test_model_backward, test_model_default_cfgs(_non_std),
test_model_forward_features, test_model_forward_intermediates, test_model_forward_fx /
backward_fx, test_model_forward_torchscript, and test_model_load_pretrained (with a local file
through `pretrained_cfg_overlay=dict(file=...)`, as attnplug publishes no weights), plus
torch.compile. Differences from timm, to keep the file fast on a 2-core CPU:

* tiny inputs: agent models are built with `img_size=48, num_agents=4` (3x3 patch grid), CNNs
  get 64x64 inputs except where timm checks `pool_size`, which needs the cfg's 224x224;
* every name gets the forward check; the other checks run on the smallest model of each family
  (variant x timm model class: the larger names differ only in width and depth); torch.compile
  uses backend="aot_eager" (dynamo + AOT autograd graphs, no inductor codegen: inductor takes
  minutes on 2 cores).

timm's own exclusions are applied: ViT/DeiT are "non-std" models (no pool_size / 4-D features
checks). A convention an attnplug model fails is a failing test here, never skipped silently.
"""

from __future__ import annotations

import fnmatch
import math
from functools import cache

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim

from vision_attn.models import registered_names

NAMES = registered_names()
EXPECTED = {"coord_mobilenetv2_100", "eca_mobilenetv2_100", "eca_efficientnet_b0", "eca_convnext_tiny",
            "agent_deit_tiny_patch16_224", "agent_deit_small_patch16_224", "agent_deit_base_patch16_224"}  # fmt: skip
NON_STD_FILTERS = ["agent_deit*"]  # as timm's 'deit*' / 'vit_*': transformer, no spatial pooled features
AGENT_SIZE = 48
CNN_SIZE = 64


def _is_std(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, f) for f in NON_STD_FILTERS)


def _kwargs(name: str) -> dict:
    return {"img_size": AGENT_SIZE, "num_agents": 4} if name.startswith("agent_") else {}


def _size(name: str) -> int:
    return CNN_SIZE if _is_std(name) else AGENT_SIZE


def _create(name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model(name, tiny kwargs, **kwargs), seeded."""
    torch.manual_seed(0)
    return timm.create_model(name, **_kwargs(name), **kwargs)


def _live(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb the injected parameters: at their identity / zero init a traced or scripted model that
    dropped the attention modules would still match."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for h in model._attnplug_handles:
            for p in h.new_parameters().values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@cache
def _meta(name: str) -> tuple[str, int]:
    with torch.device("meta"):
        m = timm.create_model(name, **_kwargs(name))
    return type(m).__name__, sum(p.numel() for p in m.parameters())


def _smallest_per_family() -> list[str]:
    """Family = (variant, timm model class); the smallest registered model of each."""
    best: dict[tuple[str, str], str] = {}
    for n in NAMES:
        fam = (n.split("_")[0], _meta(n)[0])
        if fam not in best or _meta(n)[1] < _meta(best[fam])[1]:
            best[fam] = n
    return sorted(best.values())


HEAVY = _smallest_per_family() if NAMES else []


def _x(name: str, batch: int = 1, size: int | None = None) -> torch.Tensor:
    s = size or _size(name)
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------- registry


def test_registry_is_not_empty():
    """Fails (instead of every parametrised test being skipped) if nothing got registered."""
    assert NAMES, "vision_attn.models.registered_names() is empty"
    assert EXPECTED <= set(NAMES), f"missing: {sorted(EXPECTED - set(NAMES))}; registered: {NAMES}"
    assert len(NAMES) == len(set(NAMES))
    for n in NAMES:
        assert timm.is_model(n), n
        assert timm.models.get_pretrained_cfg(n) is not None, f"{n} has no default cfg"
    assert HEAVY


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", NAMES)
def test_model_forward(name):
    """timm test_model_forward: no NaN; grad checkpointing gives the same output."""
    model = _create(name).eval()
    x = _x(name)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, model.num_classes)
        assert not torch.isnan(out).any(), "Output included NaNs"
        model.set_grad_checkpointing()
        out2 = model(x)
    assert torch.allclose(out, out2, rtol=1e-4, atol=1e-5), "grad checkpointing changed the output"


@pytest.mark.parametrize("name", HEAVY)
def test_model_backward(name):
    """timm test_model_backward: every parameter gets a gradient (also with grad checkpointing)."""
    model = _create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    x = _x(name, batch=2)
    out = model(x)
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"No gradient for {missing[:8]}"
    assert num_params == sum(p.grad.numel() for p in model.parameters())
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the same gradients through checkpointed blocks (train mode: dropout/droppath are 0)
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing()
    model(x).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# --------------------------------------------------------------------------------------------- default cfg


@pytest.mark.parametrize("name", HEAVY)
def test_model_default_cfgs(name):
    """timm test_model_default_cfgs (CNNs) / test_model_default_cfgs_non_std (agent DeiT)."""
    model = _create(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg or cfg == model.pretrained_cfg
    for key in ("num_classes", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std",
                "first_conv", "classifier", "license"):  # fmt: skip
        assert key in cfg, f"default cfg lacks {key!r}"
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]
    assert cfg["num_classes"] == timm.models.get_pretrained_cfg(name).num_classes
    state_dict = model.state_dict()
    classifier = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
    for c in classifier if cfg.get("num_classes") else ():
        assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]
    for fc in first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"
        assert state_dict[fc + ".weight"].shape[1] == cfg["input_size"][0]

    if _is_std(name):
        # std models: forward_features at the cfg input size has the cfg's pool_size
        x = torch.randn(1, *cfg["input_size"])
        pool_size = cfg["pool_size"]
        output_fmt = getattr(model, "output_fmt", "NCHW")
        sp, feat = get_spatial_dim(output_fmt), get_channel_dim(output_fmt)
        with torch.no_grad():
            outputs = model.forward_features(x)
            pre = model.forward_head(outputs, pre_logits=True)
            assert (outputs.shape[sp[0]], outputs.shape[sp[1]]) == tuple(pool_size), f"{outputs.shape} vs {pool_size}"
            assert outputs.shape[feat] == model.num_features
            assert pre.shape[1] == model.head_hidden_size
            model.reset_classifier(0)
            assert model.num_classes == 0
            out = model(x)
            assert out.shape == pre.shape == (1, model.head_hidden_size)
            model.reset_classifier(0, "")
            out = model(x)
            assert out.ndim == 4 and (out.shape[sp[0]], out.shape[sp[1]]) == tuple(pool_size)
            model = timm.create_model(name, num_classes=0, global_pool="").eval()
            out = model(x)
            assert out.ndim == 4 and (out.shape[sp[0]], out.shape[sp[1]]) == tuple(pool_size)
    else:
        x = _x(name)
        with torch.no_grad():
            outputs = model.forward_features(x)
            pre = model.forward_head(outputs, pre_logits=True)
            assert outputs.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size
            model.reset_classifier(0)
            assert model.num_classes == 0
            out = model(x)
            assert out.shape == pre.shape == (1, model.head_hidden_size)
            out = _create(name, num_classes=0).eval()(x)
            assert out.shape == (1, model.num_features)


# --------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", HEAVY)
def test_model_forward_features(name):
    """timm test_model_forward_features / _intermediates_features: features_only, >= 3 levels,
    feature_info channels and reductions matching the outputs (for ViT/DeiT timm builds the
    features_only model on forward_intermediates, feature_cls='getter')."""
    model = timm.create_model(name, features_only=True, **_kwargs(name)).eval()
    channels, reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    size = _size(name)
    with torch.no_grad():
        outputs = model(_x(name, size=size))
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reduction, outputs):
        assert o.shape[0] == 1 and o.shape[1] == c
        assert math.floor(size / r) <= o.shape[-1] <= math.ceil(size / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("name", HEAVY)
def test_model_forward_intermediates(name):
    """timm test_model_forward_intermediates: levels match model.feature_info; the final output
    equals forward_features (also with grad checkpointing)."""
    model = _create(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reduction = info.channels(), info.reduction()
    assert len(channels) >= 3
    x = _x(name)
    size = x.shape[-1]
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == len(channels)
        for c, r, o in zip(channels, reduction, intermediates):
            assert o.shape[1] == c and o.shape[-1] <= math.ceil(size / r) + 1 and not torch.isnan(o).any()
        assert torch.allclose(output, model.forward_features(x))
        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(x, output_fmt="NCHW")
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- local pretrained file


@pytest.mark.parametrize("name", HEAVY)
def test_model_load_pretrained_file(name, tmp_path):
    """pretrained=True with pretrained_cfg_overlay=dict(file=...): a state_dict saved from a
    pretrained=False instance loads back and gives equal outputs; as timm's
    test_model_load_pretrained, num_classes=5 / 0 (fresh or no head) load too."""
    from safetensors.torch import save_file

    src = _create(name).eval()
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(file))
    overlay = dict(file=str(file))
    torch.manual_seed(123)  # a different init: equality below comes from the file
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **_kwargs(name)).eval()
    assert model.pretrained_cfg["file"] == str(file)
    x = _x(name, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    for nc in (5, 0):
        m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=nc, **_kwargs(name))
        head = ("head", "classifier", "fc")
        body = {k: v for k, v in m.state_dict().items() if k in src.state_dict() and not k.startswith(head)}
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in body.items())


@pytest.mark.parametrize("name", HEAVY)
def test_model_load_pretrained_file_in_chans1(name, tmp_path):
    """timm's test_model_load_pretrained uses in_chans=1: timm adapts the pretrained first conv
    (`adapt_input_conv`: sums the RGB filters) instead of dropping it."""
    from safetensors.torch import save_file

    src = _create(name)
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(file))
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), in_chans=1, num_classes=5, **_kwargs(name)
    )
    fc = model.pretrained_cfg["first_conv"]
    w, w_src = model.state_dict()[fc + ".weight"], src.state_dict()[fc + ".weight"]
    assert w.shape[1] == 1
    torch.testing.assert_close(w, w_src.sum(dim=1, keepdim=True), msg=f"{fc}.weight was not adapted from the file")


# ------------------------------------------------------------------------------------ compile / FX / TorchScript


@pytest.mark.parametrize("name", HEAVY)
def test_torch_compile(name):
    """torch.compile (backend aot_eager: dynamo + AOT autograd, no inductor codegen), forward and backward."""
    torch._dynamo.reset()
    model = _create(name, num_classes=7).train()
    compiled = torch.compile(model, backend="aot_eager")
    x = _x(name, batch=2)
    out = compiled(x)
    out.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = model(x)
    ref.mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def _create_fx_model(model, train=False):
    """timm's tests/test_models.py `_create_fx_model`."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return create_feature_extractor(
        model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes, tracer_kwargs=tracer_kwargs
    )


@pytest.mark.parametrize("name", HEAVY)
def test_model_forward_fx(name):
    """timm test_model_forward_fx: the FX-traced model gives exactly the module's output (timm
    runs FX on deit*, efficientnet, mobilenetv2, convnext alike)."""
    model = _live(_create(name)).eval()
    x = _x(name)
    with torch.inference_mode():
        outputs = model(x)
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(x).values()))
    assert torch.equal(fx_outputs, outputs), "FX-traced model output differs from the module's"


@pytest.mark.parametrize("name", HEAVY)
def test_model_backward_fx(name):
    """timm test_model_backward_fx: every parameter of the traced model gets a gradient."""
    model = _create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx(_x(name, batch=2)).values()))
    outputs.mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, f"No gradient for {missing[:8]}"
    assert outputs.shape[-1] == 42 and num_params == sum(p.grad.numel() for p in fx.parameters())


@pytest.mark.parametrize("name", HEAVY)
def test_model_forward_torchscript(name):
    """timm test_model_forward_torchscript: scriptable under timm.set_scriptable(True), same output."""
    with timm.set_scriptable(True):
        model = _live(timm.create_model(name, **_kwargs(name))).eval()
    x = _x(name)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        out = scripted(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

"""End to end: radial / GNA / LiteAttention applied to tiny real diffusers transformers (full
window == dense, sparse settings really change the output), and the benchmark's --smoke mode."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from diffusion_attn import apply
from diffusion_attn.variants import LiteAttention, Neighborhood, Radial
from diffusion_attn.variants.base import Variant
from tests.diffusion.tiny import BUILDERS, run

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("diffusion_bench", ROOT / "benchmarks" / "diffusion_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_smoke(tmp_path):
    """The benchmark runs end to end on CPU with tiny shapes and writes JSON + PNG."""
    bench = _bench()
    res = bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "diffusion_bench_smoke.json").read_text())
    assert (tmp_path / "diffusion_bench_smoke.png").stat().st_size > 1000
    assert data["device"]["type"] == "cpu" and data["versions"]["torch"]
    op = data["op"]
    assert op["ms"]["sdpa"] > 0 and op["ms"]["na"] > 0 and op["ms"]["gna"] > 0
    # same window size per query, but stride groups share windows: fewer blocks to visit
    assert op["density"]["gna"] == pytest.approx(op["density"]["na"]) and op["density"]["na"] < 1
    assert op["block_density"]["gna"] < op["block_density"]["na"]
    assert "e2e" in res  # the end-to-end part always runs (no "until implemented" guard)
    e2e = data["e2e"]["runs"]["1x"]
    assert set(e2e["ms"]) == {"dense", "radial", "na", "gna", "lite"}, e2e["notes"]
    assert "4x" in data["e2e"]["runs"]


# -- tiny real transformers (tests/diffusion/tiny.py) -------------------------------------------------
FAMILIES = ["wan", "hunyuan_video", "cogvideox"]


class Recorder(Variant):
    """Test-only: the token layouts and layer count a forward sees (plan left dense)."""

    name = "layout_recorder"
    role = "modifier"

    def __init__(self) -> None:
        self.layouts: set = set()
        self.num_layers = 0

    def plan(self, ctx, plan):
        self.layouts.add(ctx.layout)
        self.num_layers = ctx.num_layers
        return plan


def _steps(model, inputs, handle, n):
    """n forwards as denoising steps 0..n-1 (the same input; the step is set explicitly)."""
    from tests.diffusion.tiny import run

    outs = []
    for step in range(n):
        handle.set_step(step)
        outs.append(run(model, inputs))
    return outs


def _no_borrowed_defaults(var, family):
    """Radial without official settings for `family` (CogVideoX) is refused: give the sink explicitly (off, as
    the HunyuanVideo setting these tests ran with before)."""
    if isinstance(var, Radial) and family not in Radial.family_defaults and var.attention_sink is None:
        return dataclasses.replace(var, attention_sink=False)
    return var


def _full_window(name):
    from diffusion_attn.variants import LiteAttention, Neighborhood, Radial

    return {
        # 3 frames: every radial frame pair survives thinning at block 16; huge decay = all blocks
        "radial": Radial(decay_factor=1e6, dense_steps=0, dense_layers=0, block_size=16),
        "gna": Neighborhood(kernel_size=(3, 4, 6), block_size=16),  # = the whole 3 x 4 x (4|6) grid
        "lite": LiteAttention(threshold=-1e4, block_size=16),  # nothing is ever negligible
    }[name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["radial", "gna", "lite"])
def test_full_window_equals_dense(family, name):
    model, inputs = BUILDERS[family](frames=3)
    dense = run(model, inputs)
    var = _no_borrowed_defaults(_full_window(name), family)
    if name == "gna" and family != "wan":
        var = type(var)(kernel_size=(3, 4, 4), block_size=16)
    handle = apply(model, var)
    try:
        outs = _steps(model, inputs, handle, 3)  # lite: step 0 dense, then the (empty) skip set
        assert handle.attention_calls > 0  # really went through the variant's plan
    finally:
        handle.remove()
    for out in outs:
        torch.testing.assert_close(out, dense, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(run(model, inputs), dense, atol=0, rtol=0)  # removed: bit-identical


# -- independent oracle: the model's OWN processors, their attention masked here -------------------
class MaskedSDPA(TorchFunctionMode):
    """Runs the model unchanged (diffusers' own processors) and ANDs a mask into every
    `F.scaled_dot_product_attention` call whose query and key length is the joint sequence length n
    (the hooked self / joint attention; cross-attention and the text refiner have other lengths).
    `mask_fn(layer, q, k, existing_mask)` returns a bool mask broadcastable to [B, H, n, n] or None."""

    def __init__(self, n: int, num_layers: int, mask_fn) -> None:
        super().__init__()
        self.n, self.num_layers, self.mask_fn, self.calls = n, num_layers, mask_fn, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            bound = dict(zip(names, args))
            bound.update({k: kwargs.pop(k) for k in names if k in kwargs})
            q, k = bound["query"], bound["key"]
            if q.shape[-2] == k.shape[-2] == self.n:
                existing = bound.get("attn_mask")
                mask = self.mask_fn(self.calls % self.num_layers, q, k, existing)
                self.calls += 1
                if mask is not None:
                    if existing is not None:
                        assert existing.dtype == torch.bool
                        mask = mask & existing
                    bound["attn_mask"] = mask
            return func(**bound, **kwargs)
        return func(*args, **kwargs)


def _block_to_tokens(block_mask: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """[..., nb, nb] block mask -> [..., n, n] token mask."""
    return block_mask.repeat_interleave(b, -2).repeat_interleave(b, -1)[..., :n, :n]


def _to_original_order(mask: torch.Tensor, layout) -> torch.Tensor:
    """A mask on [visual, text] -> the layout's own order (text first for CogVideoX)."""
    if not layout.text_first or not layout.text_len:
        return mask
    nv, t = layout.num_visual, layout.text_len
    pos = torch.cat([torch.arange(t, t + nv), torch.arange(t)])  # original index of each [visual, text] slot
    out = torch.zeros_like(mask)
    out[..., pos[:, None], pos[None, :]] = mask
    return out


def _lite_needed(q, k, visit, key_valid, thr, b, margins):
    """LiteAttention's tile rule from its definition: per (query block, visited key block in ascending order),
    needed when some real row's tile max beats its running max by more than thr (log2 domain); records the
    distance of every decision to the threshold in `margins`."""
    bsz, h, n, d = q.shape
    nb = math.ceil(n / b)
    s = (q.double() @ k.double().transpose(-1, -2)) * d**-0.5
    s = s.masked_fill(~key_valid[:, None, None, :], -math.inf)
    need = torch.zeros(bsz, h, nb, nb, dtype=torch.bool)
    for bi, hi, i in itertools.product(range(bsz), range(h), range(nb)):
        rows = s[bi, hi, i * b : (i + 1) * b]
        run = torch.full((rows.shape[0],), -math.inf, dtype=torch.float64)
        for j in range(nb):
            if not visit[bi, hi, i, j]:
                continue
            tmax = rows[:, j * b : (j + 1) * b].max(1).values
            gap = (tmax - run) * math.log2(math.e)
            ok = torch.isfinite(gap)
            if ok.any():
                margins.append(float((gap[ok] - thr).abs().min()))
            need[bi, hi, i, j] = bool((gap > thr).any())
            run = torch.maximum(run, tmax)
    return need


def _oracle(name: str, family: str, layout, var, key_valid, margins):
    """mask_fn(layer, q, k, existing) for one denoising step; LiteAttention keeps its skip sets in a closure."""
    b = 16
    n = layout.seq_len
    if name == "radial":
        from tests.diffusion.test_radial import _expected

        f, hh, ww = layout.grid
        bm = _expected(f, hh, ww, layout.text_len, var.decay_factor, family == "wan", b)
        tok = _to_original_order(_block_to_tokens(bm, n, b), layout)
        return lambda step: lambda layer, q, k, existing: None if step < var.dense_steps else tok
    if name == "gna":
        from tests.diffusion.test_neighborhood import _brute_mask

        k = var.kernel_size
        tok = _brute_mask(layout, k, var.stride, (1, 1, 1), (False, False, False))
        return lambda step: lambda layer, q, kk, existing: tok
    # LiteAttention: warm-up step 0 visits every tile; later steps visit the survivors; text blocks always
    nb = math.ceil(n / b)
    text = torch.zeros(n, dtype=torch.bool)
    text[layout.text_slice] = True
    text_blk = torch.nn.functional.pad(text, (0, nb * b - n)).view(nb, b).any(1)
    always = text_blk[:, None] | text_blk[None, :]
    skips: dict[int, torch.Tensor] = {}

    def for_step(step):
        def mask_fn(layer, q, k, existing):
            bsz, h = q.shape[:2]
            skip = skips.setdefault(layer, torch.zeros(bsz, h, nb, nb, dtype=torch.bool))
            visit = torch.ones_like(skip) if step < var.warmup_steps else (~skip | always)
            need = _lite_needed(q, k, visit, key_valid, var.threshold, b, margins)
            skip |= visit & ~need & ~always
            return None if step < var.warmup_steps else _block_to_tokens(visit, n, b)

        return mask_fn

    return for_step


SPARSE = {
    "radial": lambda: Radial(decay_factor=0.2, dense_steps=1, dense_layers=0, block_size=16),
    "gna": lambda: Neighborhood(kernel_size=(3, 3, 3), stride=(1, 1, 3), block_size=16),
    "lite": lambda: LiteAttention(threshold=-0.3, block_size=16),  # tiny random models: flat attention
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["radial", "gna", "lite"])
def test_sparse_variant_equals_masked_dense_oracle(family, name):
    """Each step of attnplug's sparse run equals the model run with its OWN processors and the variant's mask
    (built here from the papers' rules: radial's official mask, NATTEN's windows, LiteAttention's tile rule on
    the model's q and k) applied through a dense masked attention."""
    model, inputs = BUILDERS[family](frames=8)
    var = _no_borrowed_defaults(SPARSE[name](), family)
    layout_probe = Recorder()
    with apply(model, layout_probe):
        run(model, inputs)
    layout = layout_probe.layouts.pop()
    key_valid = torch.ones(1, layout.seq_len, dtype=torch.bool)
    if family == "hunyuan_video":  # padded text tokens are masked as keys by the model itself
        key_valid[0, layout.num_visual :] = inputs["encoder_attention_mask"][0].bool()
    margins: list[float] = []
    oracle = _oracle(name, family, layout, var, key_valid, margins)
    num_layers = layout_probe.num_layers
    expected = []
    for step in range(3):
        with MaskedSDPA(layout.seq_len, num_layers, oracle(step)) as mode:
            expected.append(run(model, inputs))
        assert mode.calls == num_layers
    handle = apply(model, var)
    try:
        outs = _steps(model, inputs, handle, 3)
        assert handle.attention_calls > 0
    finally:
        handle.remove()
    dense = run(model, inputs)
    if margins:  # LiteAttention: no decision within rounding of the threshold (else the oracle could flip)
        assert min(margins) > 1e-5  # fp32 logits are within ~1e-6 of the float64 oracle here
    for step, (out, ref) in enumerate(zip(outs, expected)):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4, msg=f"{name} on {family}, step {step}")
    assert (outs[-1] - dense).abs().max() > 1e-3  # the mask really changes the output


# -- drawing --------------------------------------------------------------------------------------
def test_draw_layout_and_variant_mask():
    import numpy as np
    import torch

    from attn_pipelines.maskdraw import draw_layout, render_variant_mask, variant_token_mask
    from diffusion_attn.variants import Neighborhood, Radial, TokenLayout

    m = torch.eye(10, dtype=torch.bool)
    img = np.asarray(draw_layout(m, max_size=100))
    assert img.shape == (100, 100, 3)
    assert (img[5, 5] != img[5, 95]).any()  # diagonal drawn differently from the off-diagonal
    lay = TokenLayout((4, 3, 4), text_len=5, text_first=True, family="cogvideox")
    na = Neighborhood(kernel_size=(2, 3, 3), block_size=16)
    tok = variant_token_mask(na, lay)
    assert torch.equal(tok, na.token_mask(lay))  # un-permuted back to the original order
    radial = Radial(dense_steps=0, dense_layers=0, decay_factor=1.0, attention_sink=False, block_size=16)
    im = render_variant_mask(radial, lay, step=3, layer=2)  # CogVideoX: no official Radial defaults
    assert im.width >= lay.seq_len and im.height > im.width  # caption strip on top


def test_committed_mask_pictures_are_current(tmp_path):
    """benchmarks/draw_masks.py regenerates exactly the PNGs under assets/masks/."""
    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("draw_masks", ROOT / "benchmarks" / "draw_masks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = mod.main(["--out", str(tmp_path)])
    assert len(written) == 6
    for path in written:
        committed = ROOT / "assets" / "masks" / path.name
        assert committed.exists(), f"{committed} missing: run python benchmarks/draw_masks.py"
        with Image.open(path) as a, Image.open(committed) as b:
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))), path.name

"""End to end: radial / GNA / LiteAttention applied to tiny real diffusers transformers (full
window == dense, sparse settings really change the output), and the benchmark's --smoke mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("diffusion_bench", ROOT / "benchmarks" / "diffusion_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_smoke(tmp_path):
    """The benchmark runs end to end on CPU with tiny shapes and writes JSON + PNG."""
    import diffusion_attn

    bench = _bench()
    argv = ["--smoke", "--out", str(tmp_path)]
    if not callable(getattr(diffusion_attn, "apply", None)):
        argv.append("--no-e2e")
    res = bench.main(argv)
    data = json.loads((tmp_path / "diffusion_bench_smoke.json").read_text())
    assert (tmp_path / "diffusion_bench_smoke.png").stat().st_size > 1000
    assert data["device"]["type"] == "cpu" and data["versions"]["torch"]
    op = data["op"]
    assert op["ms"]["sdpa"] > 0 and op["ms"]["na"] > 0 and op["ms"]["gna"] > 0
    # same window size per query, but stride groups share windows: fewer blocks to visit
    assert op["density"]["gna"] == pytest.approx(op["density"]["na"]) and op["density"]["na"] < 1
    assert op["block_density"]["gna"] < op["block_density"]["na"]
    if "e2e" in res:
        run = data["e2e"]["runs"]["1x"]
        assert set(run["ms"]) == {"dense", "radial", "na", "gna", "lite"}, run["notes"]
        assert "4x" in data["e2e"]["runs"]


# -- tiny real transformers (tests/diffusion/tiny.py) -------------------------------------------------
FAMILIES = ["wan", "hunyuan_video", "cogvideox"]


def _apply():
    import diffusion_attn

    if not callable(getattr(diffusion_attn, "apply", None)):
        pytest.skip("diffusion_attn.apply not available yet")
    return diffusion_attn.apply


def _steps(model, inputs, handle, n):
    """n forwards as denoising steps 0..n-1 (the same input; the step is set explicitly)."""
    from tests.diffusion.tiny import run

    outs = []
    for step in range(n):
        handle.set_step(step)
        outs.append(run(model, inputs))
    return outs


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
    import torch

    from tests.diffusion.tiny import BUILDERS, run

    apply = _apply()
    model, inputs = BUILDERS[family](frames=3)
    dense = run(model, inputs)
    var = _full_window(name)
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["radial", "gna", "lite"])
def test_sparse_variant_changes_output(family, name):
    import torch

    from diffusion_attn.variants import LiteAttention, Neighborhood, Radial
    from tests.diffusion.tiny import BUILDERS, run

    apply = _apply()
    model, inputs = BUILDERS[family](frames=8)
    dense = run(model, inputs)
    var = {
        "radial": Radial(decay_factor=0.2, dense_steps=1, dense_layers=0, block_size=16),
        "gna": Neighborhood(kernel_size=(3, 3, 3), stride=(1, 1, 3), block_size=16),
        "lite": LiteAttention(threshold=-0.05, block_size=16),  # tiny random models: flat attention
    }[name]
    handle = apply(model, var)
    try:
        outs = _steps(model, inputs, handle, 3)
    finally:
        handle.remove()
    if name in ("radial", "lite"):  # step 0 is dense (radial: dense_steps=1; lite: warm-up)
        torch.testing.assert_close(outs[0], dense, atol=2e-4, rtol=2e-4)
    out = outs[-1]
    assert torch.isfinite(out).all()
    diff = (out - dense).abs().max().item()
    assert diff > 1e-3, f"{name} on {family} did not change the output"
    assert diff < 10 * dense.abs().max().item()


# -- drawing --------------------------------------------------------------------------------------
def test_draw_layout_and_variant_mask():
    import numpy as np
    import torch

    from diffusion_attn.variants import Neighborhood, Radial, TokenLayout
    from diffusion_attn.variants.draw import draw_layout, render_variant_mask, variant_token_mask

    m = torch.eye(10, dtype=torch.bool)
    img = np.asarray(draw_layout(m, max_size=100))
    assert img.shape == (100, 100, 3)
    assert (img[5, 5] != img[5, 95]).any()  # diagonal drawn differently from the off-diagonal
    lay = TokenLayout((4, 3, 4), text_len=5, text_first=True, family="cogvideox")
    na = Neighborhood(kernel_size=(2, 3, 3), block_size=16)
    tok = variant_token_mask(na, lay)
    assert torch.equal(tok, na.token_mask(lay))  # un-permuted back to the original order
    im = render_variant_mask(Radial(dense_steps=0, block_size=16), lay, step=3, layer=2)
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

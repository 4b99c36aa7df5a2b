"""Boundary attention (BACON) on tiny real pipelines: the phrases' attention mass inside their boxes
rises over the updates (SD 1.5, SDXL, SD3); zero loss scale and zero loss weights leave the
generation bit-identical; no N x N map is ever made; the losses on hand-made maps; clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import diffusion_attn as da
from diffusion_attn.variants.boundary import boundary_losses, box_cells
from tests.diffusion.tiny_layout import PROMPT, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

G = lambda: torch.Generator().manual_seed(0)  # noqa: E731
PHRASES = ("red fox", "blue car")
BOXES = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.25, 1.0, 1.0))
KW = dict(height=128, width=128, num_inference_steps=4, output_type="latent")


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


def _boundary(**kw):
    opts = dict(prompt=PROMPT, phrases=PHRASES, boxes=BOXES, downsample=2, guidance_steps=2, max_iterations=3,
                loss_threshold=0.0)  # fmt: skip
    opts.update(kw)
    return da.Boundary(**opts)


def _rises(history) -> None:
    """Within every guided step the inside mass of each phrase rises from the first to the last update."""
    steps = sorted({h["step"] for h in history})
    assert steps
    for s in steps:
        rows = [h for h in history if h["step"] == s]
        assert len(rows) >= 2
        for p in range(len(PHRASES)):
            assert rows[-1]["inside"][p] > rows[0]["inside"][p], (s, p, rows)
        assert rows[-1]["loss"] < rows[0]["loss"]


def test_box_cells_and_losses_on_hand_made_maps():
    assert box_cells((0.0, 0.0, 0.5, 0.5), 8, 8) == (0, 4, 0, 4)
    assert box_cells((0.3, 0.1, 0.31, 0.2), 8, 8) == (0, 2, 2, 3)  # any overlap counts
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, :4, :4] = 1.0  # phrase 0 fills its box exactly
    maps[0, 1, 6:, :2] = 1.0  # phrase 1 sits outside its box
    l_in, l_out, l_bd, mass = boundary_losses(maps, ((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)), 0.2)
    assert mass.tolist() == [1.0, 0.0] and l_in.tolist() == [0.0, 1.0]
    assert l_out[0] == 0 and l_out[1] > 0 and l_bd[0] == 0 and l_bd[1] == 1


def test_inside_mass_rises_over_the_updates_sd15(sd):
    b = _boundary()
    base = sd(PROMPT, generator=G(), **KW).images
    with da.apply(sd, b):
        out = sd(PROMPT, generator=G(), callback_on_step_end=b.callback, **KW).images
    assert [h["step"] for h in b.history] == [1, 1, 1, 2, 2, 2]  # steps 1..guidance_steps, 3 updates each
    _rises(b.history)
    assert not torch.equal(out, base)
    assert torch.equal(sd(PROMPT, generator=G(), **KW).images, base)  # removed: bit-identical again


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_inside_mass_rises_sdxl_and_sd3(kind):
    if kind == "sdxl":
        pipe, b, kw = tiny_sdxl_pipeline(), _boundary(downsample=4, loss_scale=3e3), dict(KW)
    else:
        pipe, b = tiny_sd3_pipeline(), _boundary(loss_scale=3e4, downsample=1)
        kw = {**KW, "max_sequence_length": 16}
    with da.apply(pipe, b):
        pipe(PROMPT, generator=G(), callback_on_step_end=b.callback, **kw)
    _rises(b.history)


def test_zero_scale_and_zero_weights_are_bit_identical(sd):
    base = sd(PROMPT, generator=G(), **KW).images
    off = _boundary(loss_scale=0.0)
    with da.apply(sd, off):
        assert torch.equal(sd(PROMPT, generator=G(), callback_on_step_end=off.callback, **KW).images, base)
    assert off.history == []
    # weights 0: the guidance forwards and backward passes run, the update is exactly zero
    zero = _boundary(inside_weight=0.0, outside_weight=0.0, boundary_weight=0.0)
    with da.apply(sd, zero) as handle:
        out = sd(PROMPT, generator=G(), callback_on_step_end=zero.callback, **KW).images
        assert handle.step == KW["num_inference_steps"] - 1  # guidance forwards did not move the clock
    assert len(zero.history) == 2 and torch.equal(out, base)  # loss 0 meets the threshold: one update per step


_SCORES = {torch.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm, torch.einsum, torch.softmax,
           torch.Tensor.softmax, torch.nn.functional.softmax}  # fmt: skip


class _NoSquareMap(TorchFunctionMode):
    """Fails when a score / probability op (matmul, bmm, einsum, softmax) makes a tensor whose last two
    dimensions are both one of the image token counts: an N x N attention map."""

    def __init__(self, counts: set[int]) -> None:
        super().__init__()
        self.counts, self.ops = counts, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func in _SCORES and isinstance(out, torch.Tensor) and out.dim() >= 2:
            if out.shape[-1] == out.shape[-2] and out.shape[-1] in self.counts:
                raise AssertionError(f"{func} made an N x N tensor {tuple(out.shape)}")
        return out


def test_no_n_by_n_attention_map_is_made(sd):
    b = _boundary(guidance_steps=1, max_iterations=1)
    ops: list[int] = []
    with da.apply(sd, b):
        orig = b.callback

        def guarded(*a):
            with _NoSquareMap({256, 64}) as mode:  # tokens of the 16 x 16 and 8 x 8 attention levels
                out = orig(*a)
            ops.append(mode.ops)
            return out

        sd(PROMPT, generator=G(), callback_on_step_end=guarded, **KW)
    assert len(b.history) == 1 and max(ops) > 100


def test_missing_callback_and_wrong_prompt_are_clear_errors(sd):
    b = _boundary()
    with da.apply(sd, b):
        with pytest.raises(RuntimeError, match=r"step 1 ran without it: call the pipeline with callback_on_step_end"):
            sd(PROMPT, generator=G(), **KW)
    b = _boundary()
    with da.apply(sd, b):
        with pytest.raises(ValueError, match=r"is not the prompt the pipeline encodes"):
            sd("a red fox and a blue car in the rain", generator=G(), callback_on_step_end=b.callback, **KW)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boxes": ((0.0, 0.0, 1.2, 0.5), BOXES[1])}, r"Boundary.boxes\[0\] coordinate must be in \[0.0, 1.0\]"),
        ({"boxes": ((0.5, 0.0, 0.5, 0.5), BOXES[1])}, r"Boundary.boxes\[0\].*x0 < x1"),
        ({"boxes": (BOXES[0],)}, r"2 phrases but 1 boxes"),
        ({"phrases": ("red fox", "Red Fox")}, r"phrases\[1\] 'Red Fox' repeats phrases\[0\]"),
        ({"phrases": ("red fox", "green car")}, r"phrases\[1\] 'green car' is not part of the prompt"),
        ({"loss_scale": float("nan")}, r"Boundary.loss_scale must be in .*nan"),
        ({"downsample": 3}, r"Boundary.downsample must be a power of two"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _boundary(**kwargs)


def test_overlapping_phrases_and_bare_models_are_refused_model_untouched(sd):
    procs = dict(sd.unet.attn_processors)
    with pytest.raises(ValueError, match=r"phrases\[1\] 'fox' and phrases\[0\] 'red fox' overlap"):
        da.apply(sd, _boundary(phrases=("red fox", "fox")))
    with pytest.raises(ValueError, match=r"Boundary needs the diffusers pipeline, not a bare model"):
        da.apply(sd.unet, _boundary())
    with pytest.raises(RuntimeError, match=r"captured no attention map: no cross-attention layer at downsample=8"):
        b = _boundary(downsample=8)
        with da.apply(sd, b):
            sd(PROMPT, generator=G(), callback_on_step_end=b.callback, **KW)
    assert dict(sd.unet.attn_processors) == procs
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in sd.unet.modules())


def test_phrase_tokens_and_self_alignment_by_hand(sd):
    from diffusion_attn.variants._pipes import phrase_token_indices

    ids = sd.tokenizer(PROMPT)["input_ids"]  # [BOS, a, red, fox, and, a, blue, car, ...]
    fox = phrase_token_indices(sd.tokenizer, PROMPT, "red fox", 1, "p")
    car = phrase_token_indices(sd.tokenizer, PROMPT, "blue car", 1, "p")
    assert [ids[i] for i in fox] == sd.tokenizer("red fox", add_special_tokens=False)["input_ids"]
    assert fox == [2, 3] and car == [6, 7]
    b = _boundary()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    maps = torch.rand(1, 2, 12, 3, generator=g)
    s = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, -1)  # the N x N map, here only as the oracle
    torch.testing.assert_close(b._aligned(maps, q, k, "reference"), (s @ maps).mean(1))
    torch.testing.assert_close(_boundary(self_alignment=False)._aligned(maps, q, k, "reference"), maps.mean(1))
    # phrase maps: softmax over the text keys (not over the pixels), averaged over each phrase's tokens
    k_txt = torch.randn(1, 2, 5, 8, generator=g)
    probs, pm = b._phrase_maps(q, k_txt, [[1, 2], [4]])
    ref = torch.softmax(q @ k_txt.transpose(-1, -2) / 8**0.5, dim=-1)
    torch.testing.assert_close(probs, ref)
    torch.testing.assert_close(pm, torch.stack([ref[..., [1, 2]].mean(-1), ref[..., 4]], dim=-1))

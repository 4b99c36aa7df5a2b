"""Regional attention (EliGen) on tiny real pipelines: the attention probabilities read from the kernel
path (the kernel itself with V = identity) are exactly zero from an entity's tokens to image tokens
outside its mask and between entities; the layout equals a token mask built here from the pixels;
SD3's batched CFG hides the entities from its negative half; Wan's regional cross-attention; no
entities -> bit-identical; remove() restores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attn_kernels
import diffusion_attn as da
from attn_pipelines.tiny import build_tiny_pipeline
from diffusion_attn.variants.regional import token_membership
from tests.diffusion.tiny_layout import PROMPT, tiny_sd3_pipeline

G = lambda: torch.Generator().manual_seed(0)  # noqa: E731
L_ENT = 6  # tokens per entity prompt in these tests


@pytest.fixture(scope="module")
def flux():
    return build_tiny_pipeline("flux")


def _masks(size: int) -> tuple[np.ndarray, tuple]:
    """An L-shaped mask image with a one-pixel stroke, and a box (pixels)."""
    m = np.zeros((size, size), dtype=np.uint8)
    m[: size // 2, : size // 4] = 255
    m[size // 2 - 16 : size // 2, : size // 2] = 255
    m[size - 1, size - 1] = 255  # one pixel: its token belongs to the entity (any-pixel rule)
    return m, (size // 2 + 3, size // 2, size, size - 20)


def _expected_tokens(pixels: np.ndarray, ppt: int) -> torch.Tensor:
    """Token membership written out: a token belongs when any pixel of its ppt x ppt patch is covered."""
    h, w = pixels.shape[0] // ppt, pixels.shape[1] // ppt
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            out[i, j] = bool(pixels[i * ppt : (i + 1) * ppt, j * ppt : (j + 1) * ppt].any())
    return out


class KernelSpy:
    """Wraps attn_kernels.attention: records each call and the kernel's probabilities (V = identity)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._orig = attn_kernels.attention

    def __call__(self, q, k, v, layout=None, **kw):
        nk = k.shape[2]
        eye = torch.eye(nk, dtype=q.dtype).expand(q.shape[0], q.shape[1], nk, nk).contiguous()
        probs = self._orig(q, k, eye, layout, backend=kw.get("backend", "auto"))
        self.calls.append({"layout": layout, "probs": probs, "nq": q.shape[2], "nk": nk})
        return self._orig(q, k, v, layout, **kw)


def test_token_membership_is_the_any_pixel_rule():
    px = np.zeros((64, 48), dtype=bool)
    px[0, 0] = px[17, 47] = True
    px[40:44, 20:30] = True
    assert torch.equal(token_membership(px, 16), _expected_tokens(px, 16))
    assert token_membership(px, 16).sum() == 3  # tokens (0, 0), (1, 2) and (2, 1)
    from diffusion_attn.variants.regional import mask_to_pixels

    box = mask_to_pixels((10.5, 3, 20, 9), "m", (16, 32))
    assert box[3:9, 10:20].all() and box.sum() == 6 * 10  # x0 10.5 -> pixel 10 (a covered pixel counts)


def test_flux_entities_see_only_their_region_from_the_kernel_path(flux, monkeypatch):
    size = 128
    mask_img, box = _masks(size)
    from PIL import Image

    ents = [da.Entity("a red fox", Image.fromarray(mask_img)), ("a blue car", box)]
    reg = da.Regional(entities=ents, max_sequence_length=L_ENT, block_size=16)
    spy = KernelSpy()
    monkeypatch.setattr(attn_kernels, "attention", spy)
    kw = dict(height=size, width=size, num_inference_steps=1, output_type="latent", max_sequence_length=8)
    with da.apply(flux, reg) as handle:
        flux(PROMPT, generator=G(), **kw)
        assert handle.attention_calls == 2  # the dual- and the single-stream block
    ppt = 16
    inside = [_expected_tokens(mask_img >= 128, ppt).reshape(-1)]
    bx = np.zeros((size, size), dtype=bool)
    bx[box[1] : box[3], box[0] : box[2]] = True
    inside.append(_expected_tokens(bx, ppt).reshape(-1))
    n_img = (size // ppt) ** 2
    text = 2 * L_ENT + 8
    assert len(spy.calls) == 2
    for call in spy.calls:
        assert call["nq"] == call["nk"] == text + n_img
        p = call["probs"][0]  # [H, N, N]: [entity 0, entity 1, global, image]
        img = slice(text, text + n_img)
        for e in range(2):
            rows = slice(e * L_ENT, (e + 1) * L_ENT)
            to_img = p[:, rows, img]
            assert torch.all(to_img[:, :, ~inside[e]] == 0), "entity -> image outside its mask"
            assert torch.all(to_img[:, :, inside[e]] > 0)
            other = slice((1 - e) * L_ENT, (2 - e) * L_ENT)
            assert torch.all(p[:, rows, other] == 0), "entity -> other entity"
            assert torch.all(p[:, img, rows][:, ~inside[e]] == 0), "image outside the mask -> entity"
            assert torch.all(p[:, rows, 2 * L_ENT : text] > 0)  # entity <-> global prompt (entity_global)
        assert torch.all(p[:, 2 * L_ENT : text, :] > 0)  # the global prompt sees everything
        # the layout is the token mask written here from the pixels
        seg = torch.tensor([0] * L_ENT + [1] * L_ENT + [2] * 8 + [3] * n_img)
        n = text + n_img
        expect = torch.zeros(n, n, dtype=torch.bool)
        for qi in range(n):
            for ki in range(n):
                a, b = int(seg[qi]), int(seg[ki])
                if a == b or 2 in (a, b) or (a == 3 and b == 3):
                    expect[qi, ki] = True
                elif a == 3 and b < 2:
                    expect[qi, ki] = bool(inside[b][qi - text])
                elif b == 3 and a < 2:
                    expect[qi, ki] = bool(inside[a][ki - text])
        assert torch.equal(call["layout"].to_token_mask(), expect)
        assert call["layout"].has_element_mask  # partial blocks carry element masks, not a dense bias


def test_flux_text_stream_is_entities_then_global_prompt(flux):
    """The transformer's text input is [entity 0, entity 1, global prompt] (EliGen's order, which the layout's
    segments assume), each encoded by the pipeline's own encode_prompt; txt_ids grow by the entity tokens."""
    seen = {}
    hook = flux.transformer.context_embedder.register_forward_pre_hook(lambda m, a: seen.setdefault("ehs", a[0]))
    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64)), ("a blue car", (32, 0, 64, 64))], height=64,
                      width=64, max_sequence_length=L_ENT, block_size=16)  # fmt: skip
    try:
        with da.apply(flux, reg):
            flux(PROMPT, generator=G(), height=64, width=64, num_inference_steps=1, output_type="latent",
                 max_sequence_length=8)  # fmt: skip
    finally:
        hook.remove()
    enc = lambda p, n: flux.encode_prompt(p, prompt_2=None, max_sequence_length=n)[0]  # noqa: E731
    expect = torch.cat([enc("a red fox", L_ENT), enc("a blue car", L_ENT), enc(PROMPT, 8)], dim=1)
    torch.testing.assert_close(seen["ehs"], expect.to(seen["ehs"].dtype))


def test_entity_global_false_is_diffsynths_mask(flux, monkeypatch):
    spy = KernelSpy()
    monkeypatch.setattr(attn_kernels, "attention", spy)
    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64))], height=64, width=64, entity_global=False,
                      max_sequence_length=L_ENT, block_size=16)  # fmt: skip
    with da.apply(flux, reg):
        flux(PROMPT, generator=G(), height=64, width=64, num_inference_steps=1, output_type="latent",
             max_sequence_length=8)  # fmt: skip
    p = spy.calls[0]["probs"][0]
    assert torch.all(p[:, :L_ENT, L_ENT : L_ENT + 8] == 0) and torch.all(p[:, L_ENT : L_ENT + 8, :L_ENT] == 0)


def test_no_entities_and_remove_are_bit_identical(flux):
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="latent", max_sequence_length=8)
    base = flux(PROMPT, generator=G(), **kw).images
    with da.apply(flux, da.Regional()) as handle:
        assert torch.equal(flux(PROMPT, generator=G(), **kw).images, base)
        assert handle.attention_calls == 0
    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 32))], height=64, width=64, max_sequence_length=L_ENT)
    procs = dict(flux.transformer.attn_processors)
    with da.apply(flux, reg):
        changed = flux(PROMPT, generator=G(), **kw).images
    assert not torch.equal(changed, base)
    assert torch.equal(flux(PROMPT, generator=G(), **kw).images, base)
    assert dict(flux.transformer.attn_processors) == procs
    assert not getattr(flux.transformer, "_diffusers_hook", None) or not flux.transformer._diffusers_hook.hooks


def test_sd3_batched_cfg_negative_half_sees_no_entity(monkeypatch):
    pipe = tiny_sd3_pipeline()
    spy = KernelSpy()
    monkeypatch.setattr(attn_kernels, "attention", spy)
    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64)), ("a blue car", (32, 0, 64, 64))],
                      max_sequence_length=L_ENT, height=64, width=64, block_size=16)  # fmt: skip
    kw = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=8, output_type="latent")
    with da.apply(pipe, reg):
        pipe(PROMPT, generator=G(), guidance_scale=1.0, **kw)  # no CFG first: batch 1, then a CFG generation
        spy.calls.clear()
        pipe(PROMPT, generator=G(), guidance_scale=4.0, **kw)
    n_img = 16
    ent = 77 + L_ENT  # SD3 encodes an entity prompt as 77 CLIP + max_sequence_length T5 tokens
    for call in spy.calls:  # sequence [image, entity 0, entity 1, global]
        p = call["probs"]
        assert p.shape[0] == 2 and call["layout"].batch == 2
        neg, pos = p[0], p[1]
        assert torch.all(neg[:, :n_img, n_img : n_img + 2 * ent] == 0)  # negative: image never sees an entity
        assert torch.all(neg[:, n_img + 2 * ent :, n_img : n_img + 2 * ent] == 0)  # nor does its global prompt
        left = torch.arange(n_img) % 4 < 2
        assert torch.all(pos[:, :n_img][:, ~left][:, :, n_img : n_img + ent] == 0)  # right half -> entity 0
        assert torch.all(pos[:, :n_img][:, left][:, :, n_img : n_img + ent] > 0)


def test_wan_regional_cross_attention():
    pipe = build_tiny_pipeline("wan")
    spy = KernelSpy()
    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64))], height=64, width=64, max_sequence_length=L_ENT,
                      block_size=16)  # fmt: skip
    kw = dict(height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
              max_sequence_length=8)  # fmt: skip
    base = pipe(PROMPT, generator=G(), **kw).frames
    with pytest.MonkeyPatch.context() as mp, da.apply(pipe, reg) as handle:
        mp.setattr(attn_kernels, "attention", spy)
        out = pipe(PROMPT, generator=G(), **kw).frames
        assert handle.attention_calls == 2 * 2  # cond branch only: 2 steps x 2 attn2 layers (uncond untouched)
    assert not torch.equal(out, base)
    call = spy.calls[0]
    frames, h, w = 2, 4, 4
    assert call["nq"] == frames * h * w and call["nk"] == L_ENT + 8
    p = call["probs"][0]  # [H, image tokens, [entity, global]]
    left = (torch.arange(frames * h * w) % w) < 2
    assert torch.all(p[:, ~left, :L_ENT] == 0)  # outside the mask: the global prompt only
    assert torch.all(p[:, left, :L_ENT] > 0) and torch.all(p[:, :, L_ENT:] > 0)


# -- bad inputs: clear errors, model untouched ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("entities", "extra", "match"),
    [
        ([("a", np.ones((64, 64), bool)), ("b", np.ones((64, 32), bool))], {},
         r"entities\[1\].mask is 32 x 64 pixels \(width x height\) but the image is 64 x 64"),
        ([("a", np.zeros((64, 64), np.uint8))], {}, r"entities\[0\].mask \('a'\) covers no pixel"),
        ([("a", (0, 0, 80, 10))], {"height": 64, "width": 64}, r"entities\[0\].mask box .* 0 <= x0 < x1 <= 64"),
        ([("a", (10, 10, 5, 20))], {"height": 64, "width": 64}, r"0 <= x0 < x1"),
        ([("a", (0, 0, 8, 8))], {}, r"is a box; give Regional\(height=..., width=...\)"),
        ([("a cat", (0, 0, 8, 8)), ("A cat ", (8, 8, 16, 16))], {"height": 64, "width": 64},
         r"entities\[1\].name 'A cat ' is also the name of entities\[0\]"),
        ([da.Entity("x", (0, 0, 8, 8), name="cat"), da.Entity("y", (8, 8, 16, 16), name="cat")],
         {"height": 64, "width": 64}, r"entity names .* must be unique"),
        ([("", (0, 0, 8, 8))], {"height": 64, "width": 64}, r"entities\[0\].prompt must be a non-empty string"),
        ([("a", np.full((64, 64), np.nan))], {}, r"entities\[0\].mask has non-finite values"),
        ([("a", (0, 0, 8, 8))], {"height": 64}, r"height and Regional.width must be given together"),
    ],
)  # fmt: skip
def test_bad_entities_are_refused(entities, extra, match):
    with pytest.raises(ValueError, match=match):
        da.Regional(entities=entities, **extra)


def _untouched(model) -> bool:
    registry = getattr(model, "_diffusers_hook", None)
    return registry is None or not registry.hooks


def test_refused_against_the_pipeline_model_untouched(flux):
    procs = dict(flux.transformer.attn_processors)
    with pytest.raises(ValueError, match=r"masks are 64 x 72 pixels, not a multiple of the 16 pixels per token"):
        da.apply(flux, da.Regional(entities=[("a", np.ones((72, 64), bool))]))
    ok = da.Regional(entities=[("a", (0, 0, 8, 8))], height=64, width=64)
    with pytest.raises(ValueError, match=r"Regional needs the diffusers pipeline, not a bare model"):
        da.apply(flux.transformer, ok)
    with pytest.raises(ValueError, match=r"at most one sparsity variant"):
        da.apply(flux, ok, da.Radial())
    assert dict(flux.transformer.attn_processors) == procs and _untouched(flux.transformer)
    with da.apply(flux, ok):  # masks of 64 x 64 px, a generation of 128 x 128 px: the first call says so
        with pytest.raises(ValueError, match=r"masks are 64 x 64 pixels .* but the pipeline generates 8 x 8 tokens"):
            flux(PROMPT, height=128, width=128, num_inference_steps=1, output_type="latent", max_sequence_length=8)
    assert dict(flux.transformer.attn_processors) == procs and _untouched(flux.transformer)


def test_wan_image_to_video_is_refused():
    from tests.diffusion.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline("i2v")
    with pytest.raises(
        ValueError, match=r"Regional supports the wan pipelines WanPipeline; got WanImageToVideoPipeline"
    ):
        da.apply(pipe, da.Regional(entities=[("a", (0, 0, 8, 8))], height=48, width=64))
    assert _untouched(pipe.transformer)


def test_other_variants_never_see_cross_attention_calls():
    from tests.diffusion.probes import Recorder

    pipe = build_tiny_pipeline("wan")
    rec = Recorder()
    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64))], height=64, width=64, max_sequence_length=L_ENT)
    with da.apply(pipe, reg, rec) as handle:
        pipe(PROMPT, generator=G(), height=64, width=64, num_frames=5, num_inference_steps=1, guidance_scale=1.0,
             output_type="latent", max_sequence_length=8)  # fmt: skip
        assert handle.attention_calls == 2  # Regional planned both attn2 layers (layers 2 and 3)
    assert {s[1] for s in rec.seen} == {0, 1}  # the recorder saw the two self-attention layers only


def test_steady_state_reads_nothing_on_the_host(flux):
    """After the first forward (entity prompts encoded, layouts built), a FLUX forward with entities
    reads no tensor value on the host (step fed by set_step; see test_sync_free)."""
    from tests.diffusion.test_sync_free import NoHostSync

    seen: list[dict] = []
    hook = flux.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        flux(PROMPT, height=64, width=64, num_inference_steps=1, output_type="latent", max_sequence_length=8)
    finally:
        hook.remove()
    inputs = {k: v for k, v in seen[0].items() if k != "return_dict"}
    reg = da.Regional(entities=[("a red fox", (0, 0, 32, 64))], height=64, width=64, max_sequence_length=L_ENT)
    with da.apply(flux, reg, step_source="callback") as handle, torch.no_grad():
        flux.transformer(**inputs, return_dict=False)
        calls = handle.attention_calls
        guard = NoHostSync(tolerate=("attn_kernels/reference.py",))
        with guard:
            flux.transformer(**inputs, return_dict=False)
        assert handle.attention_calls - calls == 2 and guard.calls > 100

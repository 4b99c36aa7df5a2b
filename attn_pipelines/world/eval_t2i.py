"""Attention variants on the world's text-to-image model, each against the plain model on the same prompts and seeds.

    python -m attn_pipelines.world.eval_t2i                     # -> benchmarks/results/world_t2i_eval.json
    python -m attn_pipelines.world.eval_t2i --model runs/world_t2i/best --out /tmp/e.json --layout-prompts 2 --prompts 2

* **regional** (`Regional`, SD3 joint attention): two-object prompts ("a red circle at the top left and a
  blue square at the bottom right"), each object given as an entity with its requested box (a 12 x 12 px box
  centred in the named quadrant, about a drawn shape's extent). Per object: the IoU of the pixels of its
  colour with its box, and the share of those pixels inside the box; plain vs regional.
* **boundary** (`Boundary`, BACON layout guidance): the same prompts, each object's phrase with its box;
  the same two measures.
* **agentsd** (`AgentSD(dit=True)`): one-object prompts; CPU seconds per image (process time), PSNR and
  SSIM (torchmetrics) against the dense image of the same prompt and seed, and the classifier's accuracy.
* **softpag** (`SoftPAG`, u = 0.5 on all heads of layer 2, scale 1): one-object prompts; the classifier's
  colour+shape accuracy on the requested quadrant, shape crispness (edge gradient) and colour error of the
  foreground, plain vs SoftPAG.

Generation: seed per job, 20 steps, guidance 5, 32 x 32 px (the CLI's defaults for this model) and the
model's own `max_sequence_length` (`t2i.t2i_call_kwargs`), one image per call, exactly as
`attnplug generate --prompt P --seed S` draws it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffusion_attn as da

from .common import environment, setup_threads, write_json
from .data import COLORS, PLACES, SHAPES
from .models import world_dir
from .score import AttributeScorer, color_error, color_mask, crispness, iou_by_color
from .t2i import (
    IMAGE_SIZE,
    T2I_DEFAULTS,
    load_t2i_pipeline,
    one_object_prompts,
    quadrant_box,
    score_image,
    t2i_call_kwargs,
)

__all__ = ["layout_jobs", "object_box", "mass_inside", "markdown", "main"]

BOX_SIDE = 12  # px: a drawn shape spans 9-12 px (radius 0.28-0.36 of a 16 px quadrant)
SOFTPAG = {"scale": 1.0, "u": 0.5, "layers": (2,)}
_PLAIN: dict[tuple[str, int], np.ndarray] = {}


def object_box(place: str, size: int = IMAGE_SIZE, side: int = BOX_SIDE) -> tuple[float, float, float, float]:
    """A `side` x `side` px box centred in the quadrant `place`: where the object is requested."""
    x0, y0, x1, y1 = quadrant_box(place, size)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def layout_jobs(n: int) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """`n` two-object prompts, fixed: (prompt, [(phrase, colour, place), ...]); colours, shapes and places vary."""
    colors, places = list(COLORS), list(PLACES)
    pairs = [(0, 3), (1, 2), (2, 1), (3, 0), (0, 1), (2, 3), (0, 2), (1, 3)]  # (first place, second place)
    jobs = []
    for i in range(n):
        c1, c2 = colors[i % 6], colors[(i + 3) % 6]
        s1, s2 = SHAPES[i % 3], SHAPES[(i + 1) % 3]
        p1, p2 = (places[j] for j in pairs[i % len(pairs)])
        objs = [(f"a {c1} {s1}", c1, p1), (f"a {c2} {s2}", c2, p2)]
        jobs.append((" and ".join(f"{ph} at the {p}" for ph, _, p in objs), objs))
    return jobs


def mass_inside(image: np.ndarray, color: str, box: tuple[float, float, float, float]) -> float:
    """Share of the pixels of `color` that lie inside `box` (NaN when the colour is absent)."""

    m = color_mask(image, color)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return float(m[y0:y1, x0:x1].sum() / m.sum()) if m.sum() else float("nan")


def _generate(pipe: Any, prompt: str, seed: int, a: argparse.Namespace, variants: list | None = None,
              callback: Any = None) -> tuple[np.ndarray, float]:  # fmt: skip
    """One image [H, W, 3] in [0, 1] with `variants` applied, and its CPU seconds (this process)."""

    handle = da.apply(pipe, *variants, num_steps=a.steps) if variants else None
    t0 = time.process_time()
    try:
        kw = {"callback_on_step_end": callback} if callback is not None else {}
        kw.update(t2i_call_kwargs(pipe))  # the zero T5 positions the model was trained with
        img = pipe(prompt=prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, height=IMAGE_SIZE,
                   width=IMAGE_SIZE, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                   **kw).images[0]  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()
    return np.asarray(img, dtype=np.float32), time.process_time() - t0


def _mean(values: list[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return round(float(np.mean(vals)), 4) if vals else None


def _layout(pipe: Any, a: argparse.Namespace, which: str) -> dict[str, Any]:
    """Plain vs `which` ("regional" / "boundary") on the two-object prompts: per object IoU and mass inside its box."""

    rows = []
    for prompt, objs in layout_jobs(a.layout_prompts):
        boxes = [object_box(p) for _, _, p in objs]
        for seed in a.seeds:
            if (prompt, seed) not in _PLAIN:  # the plain image is shared by regional and boundary
                _PLAIN[(prompt, seed)] = _generate(pipe, prompt, seed, a)[0]
            plain = _PLAIN[(prompt, seed)]
            if which == "regional":
                v = da.Regional(entities=[(ph, b) for (ph, _, _), b in zip(objs, boxes)], height=IMAGE_SIZE,
                                width=IMAGE_SIZE, block_size=16)  # fmt: skip
                img, sec = _generate(pipe, prompt, seed, a, [v])
            else:
                v = da.Boundary(prompt=prompt, phrases=tuple(ph for ph, _, _ in objs),
                                boxes=tuple(tuple(x / IMAGE_SIZE for x in b) for b in boxes))  # fmt: skip
                img, sec = _generate(pipe, prompt, seed, a, [v], callback=v.callback)
            for (ph, color, place), box in zip(objs, boxes):
                rows.append({"prompt": prompt, "object": ph, "place": place, "box": list(box), "seed": seed,
                             "iou_plain": iou_by_color(plain, color, box), "iou": iou_by_color(img, color, box),
                             "inside_plain": mass_inside(plain, color, box), "inside": mass_inside(img, color, box),
                             "cpu_s": round(sec, 3)})  # fmt: skip
    keys = ("iou_plain", "iou", "inside_plain", "inside")
    return {"summary": {**{k: _mean([r[k] for r in rows]) for k in keys}, "objects": len(rows)}, "rows": rows}


def _image_metrics(img: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    x, y = (torch.from_numpy(v).permute(2, 0, 1)[None] for v in (img, ref))
    return {"psnr": min(float(peak_signal_noise_ratio(x, y, data_range=1.0)), 100.0),
            "ssim": float(structural_similarity_index_measure(x, y, data_range=1.0))}  # fmt: skip


def _single(pipe: Any, scorer: Any, a: argparse.Namespace) -> dict[str, Any]:
    """Dense, AgentSD and SoftPAG on the one-object prompts (same prompts and seeds)."""

    prompts = one_object_prompts()[:: max(1, len(one_object_prompts()) // a.prompts)][: a.prompts]
    rows: dict[str, list[dict]] = {"dense": [], "agentsd": [], "softpag": []}
    for prompt in prompts:
        color = prompt.split()[1]
        for seed in a.seeds:
            imgs: dict[str, tuple[np.ndarray, float]] = {"dense": _generate(pipe, prompt, seed, a)}
            imgs["agentsd"] = _generate(pipe, prompt, seed, a, [da.AgentSD(dit=True)])
            imgs["softpag"] = _generate(pipe, prompt, seed, a, [da.SoftPAG(**SOFTPAG)])
            for name, (img, sec) in imgs.items():
                s = score_image(scorer, img, prompt)[0]
                r = {"prompt": prompt, "seed": seed, "cpu_s": round(sec, 3), "attr_ok": s["attr_ok"],
                     "place_ok": s["place_ok"], "crispness": crispness(img[None]),
                     "color_error": color_error(img[None], color)}  # fmt: skip
                if name != "dense":
                    r.update(_image_metrics(img, imgs["dense"][0]))
                rows[name].append(r)
    out = {}
    for name, rs in rows.items():
        keys = ["cpu_s", "attr_ok", "place_ok", "crispness", "color_error"]
        keys += ["psnr", "ssim"] if name != "dense" else []
        out[name] = {"summary": {**{k: _mean([r[k] for r in rs]) for k in keys}, "images": len(rs)}, "rows": rs}
    return out


def markdown(res: dict[str, Any]) -> str:
    """The tables of docs/world.md from a result of this module (missing parts are left out)."""

    def f(v: Any, pct: bool = False) -> str:
        return "n/a" if v is None else f"{v:.0%}" if pct else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"

    out = []
    lay = [k for k in ("regional", "boundary") if k in res]
    if lay:
        out += ["| variant | objects | IoU with the box: plain | variant | colour mass in the box: plain | variant |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for k in lay:
            m = res[k]["summary"]
            out.append(f"| {k} | {m['objects']} | {f(m['iou_plain'])} | {f(m['iou'])} | {f(m['inside_plain'])} "
                       f"| {f(m['inside'])} |")  # fmt: skip
        out.append("")
    if "dense" in res:
        out += ["| case | images | CPU s / image | PSNR vs dense (dB) | SSIM vs dense | colour+shape | in its quadrant "
                "| crispness | colour error |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in ("dense", "agentsd", "softpag"):
            m = res[k]["summary"]
            out.append(f"| {k} | {m['images']} | {f(m['cpu_s'])} | {f(m.get('psnr'))} | {f(m.get('ssim'))} "
                       f"| {f(m['attr_ok'], True)} | {f(m['place_ok'], True)} | {f(m['crispness'])} "
                       f"| {f(m['color_error'])} |")  # fmt: skip
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.eval_t2i", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the shipped assets/world/t2i)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/world_t2i_eval.json"))
    p.add_argument("--layout-prompts", type=int, default=8, help="two-object prompts for regional / boundary (1-8)")
    p.add_argument("--prompts", type=int, default=12, help="one-object prompts for agentsd / softpag (1-72)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=T2I_DEFAULTS["steps"])
    p.add_argument("--guidance", type=float, default=T2I_DEFAULTS["guidance_scale"])
    p.add_argument("--parts", default="regional,boundary,single", help="comma list of regional, boundary, single")
    p.add_argument("--classifier", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if not 1 <= a.layout_prompts <= 8:
        raise SystemExit(f"--layout-prompts must be in 1..8, got {a.layout_prompts}")
    if not 1 <= a.prompts <= len(one_object_prompts()):
        raise SystemExit(f"--prompts must be in 1..{len(one_object_prompts())}, got {a.prompts}")
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}")
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("regional", "boundary", "single")]
    if bad or not parts:
        raise SystemExit(f"--parts must be a comma list of regional, boundary, single; got {a.parts!r}")
    setup_threads(a.threads)

    pipe = load_t2i_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    scorer = AttributeScorer(a.classifier or world_dir() / "classifier")
    t0 = time.perf_counter()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    res: dict[str, Any] = {"model": str(a.model or "assets/world/t2i"), "settings": settings, "box_side_px": BOX_SIDE,
                           "softpag": SOFTPAG, "pipeline_call": t2i_call_kwargs(pipe)}  # fmt: skip
    for part in parts:
        if part == "single":
            res.update(_single(pipe, scorer, a))
        else:
            res[part] = _layout(pipe, a, part)
        names = ("dense", "agentsd", "softpag") if part == "single" else (part,)
        print({n: res[n]["summary"] for n in names}, flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res.update(environment())
    write_json(a.out, res)
    print(markdown(res))
    print(f"wrote {a.out} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ground-truth evaluation of attnplug's variants on the world's trained models (`attnplug eval`).

Diffusion (the trained text-to-video `WanPipeline`, `assets/world/t2v`): every case of `SUITE` runs
on the same prompts and seeds as the plain (dense) model. A case names its variants in `--attn`
syntax and a kind, which decides what is measured:

* `sparse` (radial, GNA, LiteAttention): PSNR / SSIM (torchmetrics) of each video against the dense
  video of the same prompt and seed, attribute accuracy (the attribute classifier's colour and
  shape, the tracked direction), attention density (visited query-key pairs / all pairs over every
  self-attention call; dense calls count 1) and seconds per video;
* `guidance` (SoftPAG): the same attribute accuracy plus shape crispness (edge gradient) and colour
  error of the foreground, against the plain model;
* `length` (UltraViCo, RIFLEx): videos of 2x and 4x the training length; centroid error along the
  captioned straight path (speed fitted on the training-length window) and the fraction of frames
  beyond the training length that are lost (no shape) or drift against the caption.

A case whose variant is not in `diffusion_attn.VARIANTS` when the eval runs is reported as
`not available` (it is picked up by the next run once it lands); one whose variant does not apply
to the Wan family (UNet-only or FLUX/SD3-only variants such as AgentSD and boundary attention, measured
on the world's text-to-image model by `attn_pipelines.world.eval_t2i` instead) as `not applicable`.
Adding a variant is one `Case(...)` line in `SUITE` with an existing kind (see docs/world.md).

Vision: the shipped classifiers (a resnet10t CNN and a 6-block ViT, each trained on the world's
18-class shapes and on scikit-learn's digits): top-1 of the original, of the model right after
injecting a variant (ECA / coordinate attention / agent attention), after a short fine-tune of the
injected model, and after the same fine-tune of the original (the control).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffusion_attn as da
import vision_attn as va
from attn_spec import parse_spec
from diffusion_attn.adapters import family_of_class
from diffusion_attn.runtime import planner
from vision_attn.finetune import main as finetune

from ..config import build_variant
from .accuracy import colour_check
from .common import Timer, environment, write_json
from .data import COLORS, DIRECTIONS, SHAPES, parse_caption, single_prompts
from .models import CLASSIFIERS, VIDEO, load_world_pipeline, world_dir
from .score import AttributeScorer, color_error, color_mask, crispness, iou_by_color, track
from .vision import digits_available, load_tensors, write_dataset

__all__ = ["Case", "SUITE", "VISION_SUITE", "EvalSettings", "case_status", "run_diffusion", "run_vision", "plot"]


#: the family of the world's video model, read from the adapters (`models.build_transformer` builds this class)
WORLD_FAMILY = family_of_class("WanTransformer3DModel")

#: where the image-only variants (AgentSD, boundary attention) are measured instead
T2I_EVAL = "python -m attn_pipelines.world.eval_t2i -> benchmarks/results/world_t2i_eval.json"

#: The eval measures what each layout does to the output, so a nearly dense layout runs through the sparse
#: kernel too: the planner would otherwise hand it to the dense engine (`planner.DENSE_ENGINE_BLOCK_DENSITY`,
#: 0.78 of the blocks), and radial at the world's 320 tokens (density 0.92) would read identical to dense.
EVAL_DENSE_ENGINE_BLOCK_DENSITY = 1.01


@contextlib.contextmanager
def layouts_always_sparse(threshold: float = EVAL_DENSE_ENGINE_BLOCK_DENSITY) -> Iterator[None]:
    """Within the block, the planner's dense-engine crossover is `threshold` (> 1: never), then restored."""
    old = planner.DENSE_ENGINE_BLOCK_DENSITY
    planner.DENSE_ENGINE_BLOCK_DENSITY = threshold
    try:
        yield
    finally:
        planner.DENSE_ENGINE_BLOCK_DENSITY = old


@dataclass(frozen=True)
class Case:
    """One diffusion evaluation: a row name, a kind (what is measured) and variant specs (`--attn` syntax)."""

    name: str
    kind: str  # "sparse" | "guidance" | "length"
    attn: tuple[str, ...]
    note: str = ""


#: the diffusion cases, in report order; options fit the world's 5 x 8 x 8 token grid and 20 steps
SUITE: tuple[Case, ...] = (
    Case("radial", "sparse", ("radial:dense_steps=5,dense_layers=1,block_size=16",),
         "dense warm-up 5 of 20 steps and layer 0; 16-token blocks"),
    Case("gna", "sparse", ("gna:kernel_size=(3,5,5),block_size=16",), "3 x 5 x 5 token neighbourhood"),
    Case("lite", "sparse", ("lite:threshold=-6.0,warmup_steps=3,block_size=16",),
         "tiles skipped from step 3 on; threshold -6 (log2)"),
    Case("agentsd", "sparse", ("agentsd:dit=True",), "ToMe + agent attention"),
    Case("softpag", "guidance", ("softpag:scale=1.0,u=0.5,layers=(2,)",), "perturbed heads: all of layer 2"),
    Case("ultravico", "length", ("ultravico:train_frames=5",), "decay beyond the 5 training token frames"),
    Case("riflex", "length", ("riflex:k=1",), "k=1: period 6 token frames, just above the 5 trained"),
    Case("regional", "layout", ("regional",), "entity 'a <colour> <shape>' in a left or right half box (Python API)"),
    Case("boundary", "layout", ("boundary",), "layout guidance: UNet / SD3 only"),
)  # fmt: skip

#: vision cases: checkpoint folder -> variant specs (vision_attn syntax)
VISION_SUITE: dict[str, tuple[str, ...]] = {
    "classifier": ("eca", "coord"),
    "cnn_digits": ("eca", "coord"),
    "vit_shapes": ("agent:num_agents=16",),
    "vit_digits": ("agent:num_agents=16",),
}


@dataclass
class EvalSettings:
    """What one eval run generates: prompts (first `prompts` of `single_prompts()`), seeds, steps, sizes."""

    prompts: int = 72
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance: float = 5.0
    frames: int = VIDEO["frames"]
    size: int = VIDEO["size"]
    length_factors: tuple[int, ...] = (2, 4)
    length_prompts: int = 24
    finetune_steps: int = 150
    smoke: bool = False
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- diffusion
def case_status(case: Case, family: str = WORLD_FAMILY) -> tuple[str, list | None]:
    """("ok", variants) when every variant of `case` exists and applies to `family`, else (reason, None)."""
    if case.kind == "layout":  # structured inputs (masks, boxes): built by the eval through the Python API
        cls = {"regional": "Regional", "boundary": "Boundary"}[case.name]
        if not hasattr(da, cls):
            return f"not available: diffusion_attn.{cls} does not exist yet", None
        if case.name == "boundary":
            why = "boundary attention guides UNet (SD 1.x/XL) and SD3 pipelines, the world's model is"
            return f"not applicable: {why} {family} (measured on the world's text-to-image model: {T2I_EVAL})", None
        return "ok", []
    variants = []
    for spec in case.attn:
        name = spec.split(":")[0]
        if name not in da.VARIANTS:
            return f"not available: {name!r} not in diffusion_attn.VARIANTS yet", None
        try:
            v = build_variant(parse_spec(spec, where=case.name), where=case.name)
        except ValueError as e:
            return f"error: {e}", None
        fams = getattr(v, "families", None)
        if fams is not None and family not in fams:
            why = f"{name} supports {', '.join(fams)}, the world's video model is {family}"
            return f"not applicable: {why} (image variants: {T2I_EVAL})", None
        variants.append(v)
    return "ok", variants


class _Density:
    """Records the density of every self-attention call of a handle (dense plans count 1)."""

    def __init__(self, handle: Any) -> None:
        self.values: list[float] = []
        self.sparse_values: list[float] = []  # the calls that ran sparse: the layouts the kernel saw
        # density walks every block row on the host: once per layout object (the runtimes cache their layouts),
        # not once per attention call inside the timed generation. Only a weak reference is kept: a variant that
        # builds a layout per call (LiteAttention) must not have every layout, and the kernel plans cached on it,
        # kept alive by the recorder (at 2,112 tokens that grew one eval process to 20 GB)
        self._seen: dict[int, tuple[weakref.ref, float]] = {}
        for rt in getattr(handle, "runtimes", []):
            rt.plan = self._wrap(rt.plan)

    def _density(self, layout: Any) -> float:
        hit = self._seen.get(id(layout))
        if hit is None or hit[0]() is not layout:  # new, or a dead layout's id reused
            hit = self._seen[id(layout)] = (weakref.ref(layout), float(layout.density))
        return hit[1]

    def _wrap(self, plan_fn: Any) -> Any:
        def plan(layer: int, layout: Any, *args: Any, **kwargs: Any) -> Any:
            p = plan_fn(layer, layout, *args, **kwargs)
            if not getattr(layout, "cross_len", 0):
                sparse = not (p.is_dense or p.layout is None)
                self.values.append(self._density(p.layout) if sparse else 1.0)
                if sparse:
                    self.sparse_values.append(self.values[-1])
            return p

        return plan

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else 1.0

    @property
    def sparse_mean(self) -> float | None:
        """Mean density of the calls that ran sparse (None when every call ran dense)."""
        return float(np.mean(self.sparse_values)) if self.sparse_values else None


def generate(pipe: Any, prompt: str, seed: int, s: EvalSettings, variants: list | None = None,
             frames: int | None = None, record: list | None = None) -> tuple[np.ndarray, float, float]:  # fmt: skip
    """One video [F, H, W, 3] in [0, 1], its seconds and attention density, with `variants` applied
    (`record`: a list the call's `_Density` is appended to, for its per-call and sparse-call densities)."""
    handle = da.apply(pipe, *variants, num_steps=s.steps) if variants else None
    dens = _Density(handle) if handle is not None else None
    if record is not None and dens is not None:
        record.append(dens)
    t0 = time.perf_counter()
    try:
        out = pipe(prompt=prompt, num_inference_steps=s.steps, num_frames=frames or s.frames, height=s.size,
                   width=s.size, guidance_scale=s.guidance, generator=torch.Generator().manual_seed(seed),
                   output_type="np").frames[0]  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()
    return np.asarray(out, dtype=np.float32), time.perf_counter() - t0, (dens.mean if dens else 1.0)


def _video_metrics(video: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = torch.from_numpy(video).permute(0, 3, 1, 2)
    b = torch.from_numpy(ref).permute(0, 3, 1, 2)
    psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity_index_measure(a, b, data_range=1.0))
    return {"psnr": min(psnr, 100.0), "ssim": ssim}


def _mean_finite(values: list[float]) -> float | None:
    """Mean of the finite values; None (JSON null, "n/a" in tables) when there is none, instead of
    numpy's "Mean of empty slice" warning and a NaN row."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _rates(rows: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k.replace("_ok", "_acc")] = float(np.mean(vals))
    return out


def _summary(rows: list[dict]) -> dict[str, Any]:
    s: dict[str, Any] = _rates(rows, ("color_ok", "shape_ok", "attr_ok", "direction_ok", "present", "moves"))
    for k in ("psnr", "ssim", "density", "seconds", "crispness", "color_error"):
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        if vals:
            s[k] = float(np.mean(vals))
    s["videos"] = len(rows)
    return s


def _length_metrics(video: np.ndarray, caption: str, train_frames: int) -> dict[str, float | None]:
    """Centroid error along the caption's straight path beyond the training length, and lost / drifting frames
    (`lost_inside_frac`: lost while the straight path is still inside the frame, so a shape that correctly
    left the frame does not count)."""
    want = parse_caption(caption)[0]
    ux, uy = DIRECTIONS[want["direction"]]
    c = track(video)
    head = c[:train_frames]
    ok = ~np.isnan(head[:, 0])
    if ok.sum() < 2:
        return {"centroid_error": None, "lost_frac": 1.0, "lost_inside_frac": None,
                "drift_frac": None}  # nothing tracked: no error to give  # fmt: skip
    t = np.arange(train_frames)[ok]
    along = head[ok] @ np.array([ux, uy], dtype=np.float32)
    speed, start = np.polyfit(t, along, 1)
    speed = max(float(speed), 0.0)
    c0 = head[ok][0] - np.array([ux, uy]) * speed * t[0]
    errs, lost, lost_inside, drift = [], 0, 0, 0
    size = video.shape[1]
    prev = head[ok][-1]
    for k in range(train_frames, len(video)):
        expect = c0 + np.array([ux, uy]) * speed * k
        inside = 2 <= expect[0] <= size - 2 and 2 <= expect[1] <= size - 2  # the shape is still in the frame
        if np.isnan(c[k, 0]):
            lost += 1
            lost_inside += inside
            continue
        if inside:
            errs.append(float(np.linalg.norm(c[k] - expect)))
        if float((c[k] - prev) @ np.array([ux, uy])) < -0.5:
            drift += 1
        prev = c[k]
    n = max(1, len(video) - train_frames)
    return {"centroid_error": float(np.mean(errs)) if errs else None, "lost_frac": lost / n,
            "lost_inside_frac": lost_inside / n, "drift_frac": drift / n}  # fmt: skip


def run_diffusion(s: EvalSettings, cases: tuple[Case, ...] = SUITE, log: Any = print) -> dict[str, Any]:
    """Every case of `cases` against the plain model on the same prompts and seeds, each layout through the
    sparse kernel (`layouts_always_sparse`); returns the results dict."""
    with layouts_always_sparse():
        out = _run_diffusion(s, cases, log)
    return {**out, "dense_engine_block_density": EVAL_DENSE_ENGINE_BLOCK_DENSITY}


def _run_diffusion(s: EvalSettings, cases: tuple[Case, ...], log: Any) -> dict[str, Any]:
    pipe = load_world_pipeline()
    scorer = AttributeScorer(world_dir() / "classifier")
    prompts = single_prompts()[: s.prompts]
    jobs = [(p, seed) for seed in s.seeds for p in prompts]
    timer = Timer()
    dense: dict[tuple[str, int], np.ndarray] = {}
    rows = []
    for p, seed in jobs:
        video, sec, _ = generate(pipe, p, seed, s)
        dense[(p, seed)] = video
        rows.append({"prompt": p, "seed": seed, "seconds": sec, "density": 1.0, "crispness": crispness(video),
                     "color_error": color_error(video, p.split()[1]), **scorer.score(video, p),
                     **colour_check(video, p.split()[1], p.split()[-1])})  # fmt: skip
    results: dict[str, Any] = {"dense": {"status": "ok", "kind": "baseline", "summary": _summary(rows), "rows": rows}}
    log(f"dense: {json.dumps(results['dense']['summary'])} ({timer.elapsed:.0f} s)")
    for case in cases:
        status, variants = case_status(case)
        entry: dict[str, Any] = {"status": status, "kind": case.kind, "attn": list(case.attn), "note": case.note}
        results[case.name] = entry
        if variants is None:
            log(f"{case.name}: {status}")
            continue
        rows = []
        try:
            if case.kind in ("sparse", "guidance"):
                for p, seed in jobs:
                    video, sec, dens = generate(pipe, p, seed, s, variants)
                    row = {"prompt": p, "seed": seed, "seconds": sec, "density": dens, **scorer.score(video, p),
                           **colour_check(video, p.split()[1], p.split()[-1]),
                           **_video_metrics(video, dense[(p, seed)])}  # fmt: skip
                    if case.kind == "guidance":
                        row |= {"crispness": crispness(video), "color_error": color_error(video, p.split()[1])}
                    rows.append(row)
                entry["summary"] = _summary(rows)
            elif case.kind == "length":
                entry["summary"] = _run_length(pipe, s, variants, scorer, rows)
            elif case.kind == "layout":
                entry["summary"] = _run_regional(pipe, s, rows)
            entry["rows"] = rows
        except Exception as e:  # a variant that fails on this model is a result, not a crash of the eval
            entry["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        log(f"{case.name}: {entry['status']} {json.dumps(entry.get('summary', {}))} ({timer.elapsed:.0f} s)")
    if any(c.kind == "length" for c in cases):
        base_rows: list[dict] = []
        summary = _run_length(pipe, s, None, scorer, base_rows)
        results["dense_length"] = {"status": "ok", "kind": "length baseline", "summary": summary, "rows": base_rows}
    return {"cases": results, "seconds": round(timer.elapsed, 1)}


def regional_jobs(n: int) -> list[tuple[str, str, tuple[float, float, float, float]]]:
    """(global prompt, entity prompt, box in px) for the regional case: colour x shape moving up or down, the
    entity's box the left or the right half of the frame (alternating), so the shape can keep to it all clip."""
    half = VIDEO["size"] / 2
    jobs = []
    for i, (c, sh) in enumerate((c, sh) for c in COLORS for sh in SHAPES):
        box = (0.0, 0.0, half, 2 * half) if i % 2 == 0 else (half, 0.0, 2 * half, 2 * half)
        jobs.append((f"a {c} {sh} moving {'down' if i % 4 < 2 else 'up'}", f"a {c} {sh}", box))
    return jobs[:n]


def _inside_fraction(video: np.ndarray, color: str, box: tuple[float, float, float, float]) -> float:
    """Share of the requested colour's pixels (over every frame) that lie inside `box`."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    got = np.stack([color_mask(f, color) for f in video])
    total = got.sum()
    return float(got[:, y0:y1, x0:x1].sum() / total) if total else float("nan")


def _run_regional(pipe: Any, s: EvalSettings, rows: list) -> dict[str, Any]:
    """Regional attention (Wan regional cross-attention): the requested colour's pixels inside the entity's box
    and their IoU with it, plain model vs regional, same prompts and seeds."""
    for prompt, entity, box in regional_jobs(max(2, s.prompts // 4)):
        color = entity.split()[1]
        for seed in s.seeds:
            base, _, _ = generate(pipe, prompt, seed, s)
            reg = da.Regional(entities=[(entity, box)], height=s.size, width=s.size, block_size=16)
            video, sec, _ = generate(pipe, prompt, seed, s, [reg])
            rows.append({"prompt": prompt, "entity": entity, "box": list(box), "seed": seed, "seconds": sec,
                         "inside_plain": _inside_fraction(base, color, box),
                         "inside": _inside_fraction(video, color, box),
                         "iou_plain": float(np.mean([iou_by_color(f, color, box) for f in base])),
                         "iou": float(np.mean([iou_by_color(f, color, box) for f in video]))})  # fmt: skip
    names = {"inside_frac_plain": "inside_plain", "inside_frac": "inside", "iou_plain": "iou_plain", "iou": "iou"}
    return {**{n: _mean_finite([r[k] for r in rows]) for n, k in names.items()}, "videos": len(rows)}


def _run_length(pipe: Any, s: EvalSettings, variants: list | None, scorer: Any, rows: list) -> dict[str, Any]:
    """Videos at each factor of `length_factors` x the training length (latent frames), scored along the caption."""
    vae_t = pipe.vae_scale_factor_temporal
    train_lat = (s.frames - 1) // vae_t + 1
    summary: dict[str, Any] = {}
    prompts = single_prompts()[:: max(1, len(single_prompts()) // s.length_prompts)][: s.length_prompts]
    for f in s.length_factors:
        frames = (train_lat * f - 1) * vae_t + 1
        part = []
        for p in prompts:
            video, sec, dens = generate(pipe, p, s.seeds[0], s, variants, frames=frames)
            row = {"prompt": p, "factor": f, "frames": frames, "seconds": sec, "density": dens,
                   **_length_metrics(video, p, s.frames), **scorer.score(video[: s.frames], p)}  # fmt: skip
            part.append(row)
        rows += part
        agg = {k: _mean_finite([r[k] for r in part]) for k in ("centroid_error", "lost_frac", "drift_frac")}
        summary[f"x{f}"] = {**agg, "frames": frames, **_rates(part, ("attr_ok", "direction_ok"))}
    return summary


# ----------------------------------------------------------------------------------------------- vision
def _finetune(name: str, data: Path, work: Path, steps: int, variant: str | None) -> dict[str, Any]:
    """A short fine-tune (finetune's own loop) of checkpoint `name` with `variant` injected; its val top-1."""
    cfg = json.loads((world_dir() / name / "config.json").read_text())
    out = work / f"{name}_{variant or 'original'}".replace(":", "_").replace(",", "_").replace("=", "")
    argv = ["--model", cfg["model"], "--model-kwargs", json.dumps(cfg.get("model_kwargs") or {}), "--img-size",
            str(cfg.get("img_size") or 32), "--data", str(data), "--transform", "simple", "--batch-size", "64",
            "--seed", "0", "--out", str(out), "--cpu", "--quiet", "--max-steps", str(steps), "--lr", "5e-4",
            "--warmup-steps", str(min(20, steps - 1)), "--weight-decay", "0.01",
            "--pretrained-file", str(world_dir() / name / "model.safetensors")]  # fmt: skip
    if variant:
        argv += ["--variant", variant]
    t0 = time.perf_counter()
    if finetune(argv) != 0:
        raise RuntimeError(f"finetune failed: {argv}")
    m = json.loads((out / "metrics.json").read_text())
    return {"top1": m["val_top1"], "steps": m["steps"], "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def _top1(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def run_vision(s: EvalSettings, names: tuple[str, ...] | None = None, log: Any = print) -> dict[str, Any]:
    """Original / injected / fine-tuned-injected / fine-tuned-original top-1 for every `VISION_SUITE` checkpoint."""
    timer = Timer()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        written: dict[str, Path] = {}
        for name in names or tuple(VISION_SUITE):
            spec = CLASSIFIERS[name]
            folder = world_dir() / name
            entry: dict[str, Any] = {"model": spec["model"], "data": spec["data"], "role": spec["role"]}
            out[name] = entry
            if spec["data"] == "digits" and not digits_available():
                entry["status"] = "not available: the digits need scikit-learn (pip install -e '.[eval]')"
                continue
            if not (folder / "model.safetensors").is_file():
                entry["status"] = f"not available: no checkpoint at {folder}"
                continue
            if spec["data"] not in written:
                written[spec["data"]] = Path(tmp) / spec["data"]
                entry["dataset_sizes"] = write_dataset(spec["data"], written[spec["data"]], smoke=s.smoke)
            data = written[spec["data"]]
            model = va.load_finetuned(folder)
            x, y = load_tensors(data / "val", model)
            entry |= {"status": "ok", "val_images": len(y), "original": {"top1": _top1(model, x, y)}}
            entry["finetuned_original"] = _finetune(name, data, Path(tmp), s.finetune_steps, None)
            entry["variants"] = {}
            for v in VISION_SUITE[name]:
                m = va.load_finetuned(folder)
                h = va.inject(m, va.parse_variant(v))
                added = sum(p.numel() for p in h.new_parameters().values())
                row = {"injected": {"top1": _top1(m, x, y)}, "params_added": added}
                row["finetuned"] = _finetune(name, data, Path(tmp), s.finetune_steps, v)
                entry["variants"][v] = row
            log(f"{name}: {json.dumps({k: entry[k] for k in ('original', 'finetuned_original', 'variants')})} "
                f"({timer.elapsed:.0f} s)")  # fmt: skip
    return {"models": out, "finetune_steps": s.finetune_steps, "seconds": round(timer.elapsed, 1)}


# ----------------------------------------------------------------------------------------------- report
def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Bar charts of the diffusion cases (PSNR, SSIM, attribute accuracy, density) and the vision top-1s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = (results.get("diffusion") or {}).get("cases", {})
    vis = (results.get("vision") or {}).get("models", {})
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    ok = [k for k, v in diff.items() if v.get("summary") and v["kind"] in ("baseline", "sparse", "guidance")]
    titles = ("PSNR vs dense (dB)", "SSIM vs dense", "attribute accuracy", "attention density")
    for ax, key, title in zip(axes[:4], ("psnr", "ssim", "attr_acc", "density"), titles):
        vals = [diff[k]["summary"].get(key, np.nan) for k in ok]
        ax.bar(ok, vals, color=["#777" if k == "dense" else "#3a7" for k in ok])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    ax = axes[4]
    labels, vals = [], []
    for name, e in vis.items():
        if e.get("status") != "ok":
            continue
        labels += [f"{name}\noriginal", f"{name}\nft original"]
        vals += [e["original"]["top1"], e["finetuned_original"]["top1"]]
        for v, r in e["variants"].items():
            labels += [f"{name}\n{v.split(':')[0]} inj", f"{name}\n{v.split(':')[0]} ft"]
            vals += [r["injected"]["top1"], r["finetuned"]["top1"]]
    ax.barh(labels, vals, color="#37a")
    ax.set_xlim(0, 1)
    ax.set_title("vision top-1 (val)")
    ax.tick_params(axis="y", labelsize=6)
    fig.suptitle(f"attnplug eval on the synthetic world ({results.get('command', '')})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: Any) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _num(x: Any, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def _top1_of(entry: dict, key: str) -> Any:
    return (entry.get(key) or {}).get("top1")


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/world.md's "Variants on the world" section, from a results dict (`world_eval.json`):
    the diffusion cases, the length cases, regional, the not-applicable ones and the vision checkpoints."""
    out: list[str] = []
    cases = results.get("diffusion", {}).get("cases", {})
    if cases:
        out += [
            "| case | PSNR vs dense (dB) | SSIM | colour | shape | colour+shape | direction | colour present "
            "| colour moves as named | density | s / video |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in cases.items():
            sm = c.get("summary") or {}
            if c.get("kind") not in ("baseline", "sparse", "guidance") or c.get("status") != "ok":
                continue
            out.append(
                f"| {name} | {_num(sm.get('psnr'), '.1f')} | {_num(sm.get('ssim'), '.3f')} "
                f"| {_pct(sm.get('color_acc'))} | {_pct(sm.get('shape_acc'))} | {_pct(sm.get('attr_acc'))} "
                f"| {_pct(sm.get('direction_acc'))} "
                f"| {_pct(sm.get('present'))} | {_pct(sm.get('moves'))} | {_num(sm.get('density'), '.3f')} "
                f"| {_num(sm.get('seconds'), '.2f')} |"
            )
        length = [
            (n, c) for n, c in cases.items() if c.get("kind") in ("length", "length baseline") and c.get("summary")
        ]
        if length:
            out += [
                "",
                "| length case | factor | frames | centroid error (px) | lost frames | frames against the caption "
                "| colour+shape | direction (first 9 frames) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for name, c in sorted(length, key=lambda nc: nc[1]["kind"] != "length baseline"):
                for factor, sm in c["summary"].items():
                    out.append(
                        f"| {name} | {factor} | {sm.get('frames')} | {_num(sm.get('centroid_error'), '.2f')} "
                        f"| {_num(sm.get('lost_frac'), '.2f')} | {_num(sm.get('drift_frac'), '.2f')} "
                        f"| {_pct(sm.get('attr_acc'))} | {_pct(sm.get('direction_acc'))} |"
                    )
        for name, c in cases.items():
            sm = c.get("summary") or {}
            if c.get("kind") == "layout" and c.get("status") == "ok":
                inside = f"{_num(sm.get('inside_frac_plain'), '.2f')} plain -> {_num(sm.get('inside_frac'), '.2f')}"
                iou = f"{_num(sm.get('iou_plain'), '.3f')} -> {_num(sm.get('iou'), '.3f')}"
                out += ["", f"{name} ({sm.get('videos')} videos): share of the entity colour's pixels inside its box "
                        f"{inside}; IoU with the box {iou}."]  # fmt: skip
        soft, dense = cases.get("softpag", {}).get("summary"), cases.get("dense", {}).get("summary")
        if soft and dense and "crispness" in soft:
            out += ["", f"SoftPAG vs plain: crispness {soft['crispness']:.4f} vs {dense['crispness']:.4f}, colour "
                    f"error {soft['color_error']:.3f} vs {dense['color_error']:.3f}."]  # fmt: skip
        for name, c in cases.items():
            if c.get("status") != "ok":
                out += ["", f"{name}: {c['status']}"]
    models = results.get("vision", {}).get("models", {})
    if models:
        out += [
            "",
            "| checkpoint | original | fine-tuned original (control) | variant | injected | injected + fine-tuned "
            "| parameters added |",
            "|---|---|---|---|---|---|---|",
        ]
        for ck, m in models.items():
            for spec, v in m.get("variants", {}).items():
                out.append(
                    f"| {ck} | {_num(_top1_of(m, 'original'), '.3f')} "
                    f"| {_num(_top1_of(m, 'finetuned_original'), '.3f')} "
                    f"| {spec} | {_num(_top1_of(v, 'injected'), '.3f')} | {_num(_top1_of(v, 'finetuned'), '.3f')} "
                    f"| {v.get('params_added', 0):,} |"
                )
    return "\n".join(out) + "\n"


def write_results(results: dict[str, Any], out_dir: str | Path, stem: str = "world_eval") -> tuple[Path, Path]:
    """`<stem>.json` (with device and versions), `<stem>.png` and `<stem>.md` (the docs' tables) into `out_dir`."""
    out_dir = Path(out_dir)
    results = {**results, **environment()}
    js = write_json(out_dir / f"{stem}.json", results)
    png = plot(results, out_dir / f"{stem}.png")
    (out_dir / f"{stem}.md").write_text(markdown(results))
    return js, png

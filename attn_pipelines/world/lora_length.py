"""Does a length-extension LoRA work, and does training it under radial attention lose anything? (issue 22)

On the world's text-to-video model (`assets/world/t2v`, trained on 9-frame clips: 5 latent frames), one
command (`python benchmarks/world_lora_length.py`):

1. **data**: renders world clips (`data.video_sample`, the base model's own distribution: 20% two-object
   clips, the same speeds) at 17 and 33 frames (9 and 17 latent frames, 576 and 1,088 tokens: 1.8x and
   3.4x the 5 trained latent frames) with their captions, lossless MP4 + same-stem .txt, into one folder;
2. **train**: two LoRAs with the same seed, steps, data and settings through `diffusion_attn.lora.train_lora`,
   one with radial attention in every training forward (the `attnplug eval` radial case: 16-token blocks,
   layer 0 dense), one with the model's dense attention. Batch 1, so one LoRA sees both lengths (a mix; the
   clip order is train_lora's seeded shuffle); each is published with its model card to `assets/world/lora/`;
3. **evaluate** at both lengths, on fixed prompts and seeds: the plain model, UltraViCo, RIFLEx, radial
   without LoRA, radial + radial-LoRA, radial + dense-LoRA, dense + dense-LoRA (and dense + radial-LoRA):
   attribute accuracy (the attribute classifier), centroid error along the caption's path, lost frames
   (`evaluate._length_metrics`), attention density (`evaluate.generate`) and CPU seconds per video; the
   same length metrics on rendered ground-truth clips give the reference (a shape that leaves the frame
   counts as lost there too);
4. **report**: `benchmarks/results/world_lora_length.json` (device, versions, settings, the checkpoint's
   git commit, per-case numbers and rows) and `.png`, and a markdown table on stdout.

Every stage is skipped on a rerun when its output exists for the same settings (training resumes from
train_lora's checkpoints; each evaluated case is kept in the work folder), so an interrupted run goes on.

Why 17 / 33 frames and not `attnplug eval`'s 19 / 39 (10 / 20 latent frames): the world VAE (Wan's
`AutoencoderKLWan`) encodes a clip as its first frame plus chunks of 4 frames, so clips encode to an odd
number of latent frames (1 + 2k); 10 and 20 cannot be trained on. The LoRAs are evaluated at the lengths
they were trained at.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import diffusion_attn.lora as lora_module
from diffusion_attn.lora import TrainLoRAConfig, train_lora

from .common import environment, setup_threads, write_json
from .data import single_prompts, video_sample
from .evaluate import SUITE, Case, EvalSettings, _length_metrics, _mean_finite, case_status, generate
from .models import T2V_DIR, VIDEO, load_world_pipeline, world_dir
from .score import AttributeScorer

__all__ = ["LengthSettings", "CASES", "LORAS", "eval_prompts", "render_clips", "train", "evaluate_case", "run", "main"]

#: the radial options of `attnplug eval` (16-token blocks, layer 0 dense, 5 dense warm-up steps at inference)
RADIAL = next(c for c in SUITE if c.name == "radial").attn
#: the trained LoRAs: name -> variant specs applied in every training forward (() = the model's dense attention)
LORAS: dict[str, tuple[str, ...]] = {"radial": RADIAL, "dense": ()}
#: evaluated cases: name -> (LoRA name or None, variant specs at generation)
CASES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "plain": (None, ()),
    "ultravico": (None, next(c for c in SUITE if c.name == "ultravico").attn),
    "riflex": (None, next(c for c in SUITE if c.name == "riflex").attn),
    "radial": (None, RADIAL),
    "radial+radial_lora": ("radial", RADIAL),
    "radial+dense_lora": ("dense", RADIAL),
    "dense+dense_lora": ("dense", ()),
    "dense+radial_lora": ("radial", ()),
}


@dataclass
class LengthSettings:
    """Everything one run does; the defaults are the run in docs/world.md."""

    work: str = "runs/world/lora_length"  # data, cache, LoRA runs, per-case evaluations
    results: str = "benchmarks/results"  # of the checkout the command runs in (its root)
    assets: str = "assets/world/lora"  # published LoRAs, in the checkout ("" = do not publish)
    stem: str = "world_lora_length"
    model: str = ""  # the t2v pipeline folder ("" = the shipped world model)
    frames: tuple[int, ...] = (17, 33)  # clip / generation lengths (1 + 4k: see the module docstring)
    clips: int = 200  # training clips per length
    data_seed: int = 22
    two_object_prob: float = 0.2  # as the base model's training data
    steps: int = 1000
    lr: float = 2e-4
    warmup: int = 50
    rank: int = 16
    seed: int = 0
    prompts: int = 12  # one-object prompts, balanced over colours and directions (`eval_prompts`)
    seeds: tuple[int, ...] = (0,)
    inference_steps: int = 20
    guidance: float = 5.0
    reference_clips: int = 48  # rendered one-object clips per length for the ground-truth row
    cases: tuple[str, ...] = tuple(CASES)
    threads: int = 1

    def check(self) -> None:
        """Refuse bad settings with the parameter and its allowed range."""
        for name in ("clips", "steps", "rank", "prompts", "inference_steps", "reference_clips", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for f in self.frames:
            if f < 9 or (f - 1) % 4:
                raise ValueError(f"frames must be 1 + 4k and >= 9 (the VAE encodes 4-frame chunks), got {f}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")
        if not 0 <= self.two_object_prob <= 1:
            raise ValueError(f"two_object_prob must be in [0, 1], got {self.two_object_prob}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")
        bad = [c for c in self.cases if c not in CASES]
        if bad:
            raise ValueError(f"cases: unknown {bad}; allowed: {', '.join(CASES)}")
        if self.prompts > len(single_prompts()):
            raise ValueError(f"prompts must be in [1, {len(single_prompts())}], got {self.prompts}")

    @property
    def eval_settings(self) -> EvalSettings:
        return EvalSettings(prompts=self.prompts, seeds=self.seeds, steps=self.inference_steps, guidance=self.guidance)


def eval_prompts(n: int) -> list[str]:
    """`n` one-object prompts spread over the 72 (colour-major order): index i * (72 // n) + i % 4, so the
    directions cycle and the colours are covered evenly (a plain stride of 72 // n can repeat one direction)."""
    allp = single_prompts()
    step = max(1, len(allp) // n)
    return [allp[(i * step + i % 4) % len(allp)] for i in range(n)]


def t2v_checkpoint(folder: Path) -> dict[str, str | None]:
    """The git commit that last changed the t2v checkpoint folder, and its subject (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "log", "-1", "--format=%H%x09%s", "--", "."],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    commit, _, subject = out.partition("\t")
    try:  # a path in the checkout the command runs in, for the cards and results, not this machine's
        path = folder.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        path = str(folder)
    return {"path": path, "commit": commit or None, "subject": subject or None}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data
def render_clips(folder: Path, s: LengthSettings) -> dict[str, Any]:
    """Lossless MP4 clips (`video_sample(data_seed + frames, i, frames=...)`) with same-stem captions; skipped
    when the folder's manifest matches. (GIF would merge identical frames, e.g. after a shape left the frame.)"""
    import imageio.v3 as iio

    want = {"frames": list(s.frames), "clips": s.clips, "seed": s.data_seed, "two_object_prob": s.two_object_prob}
    man = folder / "manifest.json"
    if man.is_file() and json.loads(man.read_text()).get("settings") == want:
        return json.loads(man.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    captions = []
    for f in s.frames:
        for i in range(s.clips):
            sample = video_sample(s.data_seed + f, i, frames=f, two_object_prob=s.two_object_prob)
            stem = folder / f"f{f:03d}_{i:05d}"
            iio.imwrite(
                stem.with_suffix(".mp4"),
                (sample.video * 255).round().astype(np.uint8),
                plugin="FFMPEG",
                codec="libx264rgb",
                fps=VIDEO["fps"],
                pixelformat="bgr24",
                output_params=["-crf", "0"],
            )
            stem.with_suffix(".txt").write_text(sample.caption)
            captions.append(sample.caption)
    out = {"settings": want, "files": len(captions), "two_object": sum(" and " in c for c in captions)}
    write_json(man, out)
    return out


# ---------------------------------------------------------------------------------------------- training
def _load_pipe(s: LengthSettings) -> Any:
    return load_world_pipeline(s.model or None)


def _variants(specs: tuple[str, ...], name: str) -> list:
    if not specs:
        return []
    status, variants = case_status(Case(name, "length", specs))
    if variants is None:
        raise RuntimeError(f"{name}: {status}")
    return variants


def train(name: str, s: LengthSettings, data: Path, checkpoint: dict) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the LoRA `name` of `LORAS`; returns its record."""
    out = Path(s.work) / f"lora_{name}"
    record_file = out / "attnplug_record.json"
    fingerprint = {
        "steps": s.steps,
        "lr": s.lr,
        "warmup": s.warmup,
        "rank": s.rank,
        "seed": s.seed,
        "attn": list(LORAS[name]),
        "data": json.loads((data / "manifest.json").read_text())["settings"],
        "t2v_commit": checkpoint["commit"],
    }
    if record_file.is_file():
        rec = json.loads(record_file.read_text())
        if rec.get("fingerprint") == fingerprint and (out / "pytorch_lora_weights.safetensors").is_file():
            _log(f"train {name}: done already ({rec['seconds_per_step']:.2f} s/step), skipped")
            return rec
    pipe = _load_pipe(s)
    cfg = TrainLoRAConfig(
        data_dir=str(data),
        output_dir=str(out),
        variants=tuple(_variants(LORAS[name], f"lora_{name}")),
        rank=s.rank,
        steps=s.steps,
        learning_rate=s.lr,
        warmup_steps=s.warmup,
        seed=s.seed,
        save_every=max(1, min(200, s.steps)),
        cache_dir=str(Path(s.work) / "cache" / str(checkpoint["commit"])[:12]),  # a new checkpoint re-encodes
        progress=False,
        base_model=f"attnplug world text-to-video ({checkpoint['path']}, commit {checkpoint['commit']})",
        extra_card={
            "purpose": "length extension of the world model (trained on 9 frames) to "
            + " and ".join(f"{f} frames" for f in s.frames)
            + " (issue 22); evaluated in docs/world.md",
            "data": f"{s.clips} clips per length rendered by attn_pipelines.world.data.video_sample "
            f"(seed {s.data_seed} + frames, two-object probability {s.two_object_prob}), batch 1 so both lengths mix",
            "command": "python benchmarks/world_lora_length.py " + " ".join(_argv_of(s)),
        },
    )
    done_before = 0
    ck = out / "checkpoints"
    if ck.is_dir():
        done_before = max((int(p.name.split("-")[1]) for p in ck.glob("step-*")), default=0)
    _log(f"train {name}: {s.steps} steps (resuming at {done_before}), attention {LORAS[name] or 'dense'}")
    wall, cpu = time.perf_counter(), time.process_time()
    with _FirstStepClock() as first:  # the steps' time apart from encoding the clips (first run only)
        train_lora(pipe, cfg)
    end = time.perf_counter()
    wall, cpu = end - wall, time.process_time() - cpu
    steps_wall = end - first[0] if first else wall
    losses = json.loads((out / "metrics.json").read_text())["loss"]
    ran = max(1, s.steps - done_before)
    rec = {
        "fingerprint": fingerprint,
        "steps": s.steps,
        "steps_this_session": ran,
        "seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "steps_seconds": round(steps_wall, 1),
        "seconds_per_step": steps_wall / ran,
        "loss_first_50": float(np.mean(losses[:50])),
        "loss_last_50": float(np.mean(losses[-50:])),
        "lora_sha256": _sha(out / "pytorch_lora_weights.safetensors"),
    }
    write_json(record_file, rec)
    _log(
        f"train {name}: {wall:.0f} s ({steps_wall / ran:.2f} s/step), loss {rec['loss_first_50']:.4f} -> "
        f"{rec['loss_last_50']:.4f}"
    )
    return rec


class _FirstStepClock:
    """Records when `train_lora` computes its first loss (its clips are encoded before), by wrapping the module's
    `lora_loss` for the duration of the block."""

    def __enter__(self) -> list[float]:
        self.mod, self.orig, self.first = lora_module, lora_module.lora_loss, []

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.first:
                self.first.append(time.perf_counter())
            return self.orig(*args, **kwargs)

        lora_module.lora_loss = timed
        return self.first

    def __exit__(self, *exc: Any) -> None:
        self.mod.lora_loss = self.orig


def _argv_of(s: LengthSettings) -> list[str]:
    d = LengthSettings()
    out = []
    for f in dataclasses.fields(LengthSettings):
        v = getattr(s, f.name)
        if v != getattr(d, f.name) and f.name not in ("results", "assets"):
            flag = "--" + f.name.replace("_", "-")
            out += [flag, *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return out


def publish(name: str, s: LengthSettings, rec: dict) -> Path | None:
    """Copy the LoRA (weights, model card, config, loss) to `assets/<name>/`; the card gets the measured time."""
    if not s.assets:
        return None
    src, dest = Path(s.work) / f"lora_{name}", Path(s.assets) / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("pytorch_lora_weights.safetensors", "train_config.json", "metrics.json"):
        shutil.copy2(src / f, dest / f)
    card = (src / "README.md").read_text().rstrip("\n")
    card += (
        f"\n\nTraining time: {rec['seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s CPU "
        f"({rec['seconds_per_step']:.2f} s/step, {s.threads} thread(s), CPU). Loss (mean of the first / last 50 "
        f"steps): {rec['loss_first_50']:.4f} / {rec['loss_last_50']:.4f}.\n"
    )
    (dest / "README.md").write_text(card)
    return dest


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_case(name: str, s: LengthSettings, scorer: Any, log_every: int = 0) -> dict[str, Any]:
    """Case `name` of `CASES` at every length of `s.frames`: rows per (prompt, seed) and a summary per length."""
    lora, specs = CASES[name]
    pipe = _load_pipe(s)
    if lora is not None:
        pipe.load_lora_weights(str(Path(s.work) / f"lora_{lora}"))
    variants = _variants(specs, name)
    es = s.eval_settings
    train_frames = VIDEO["frames"]
    out: dict[str, Any] = {"lora": lora, "attn": list(specs), "lengths": {}}
    for f in s.frames:
        rows = []
        for p in eval_prompts(s.prompts):
            for seed in s.seeds:
                cpu = time.process_time()
                video, sec, dens = generate(pipe, p, seed, es, variants or None, frames=f)
                cpu = time.process_time() - cpu
                rows.append(
                    _score(video, p, scorer, train_frames)
                    | {"prompt": p, "seed": seed, "seconds": sec, "cpu_seconds": cpu, "density": dens}
                )
        out["lengths"][str(f)] = {"summary": summarize(rows), "rows": rows}
    return out


def _score(video: np.ndarray, caption: str, scorer: Any, train_frames: int) -> dict[str, Any]:
    """Length metrics (evaluate's) and the classifier's attributes over the whole video and its first
    `train_frames` frames (evaluate's convention for lengths)."""
    full = scorer.score(video, caption)
    head = scorer.score(video[:train_frames], caption)
    row: dict[str, Any] = dict(_length_metrics(video, caption, train_frames))
    row |= {k: full[k] for k in ("color_ok", "shape_ok", "attr_ok", "direction_ok", "pred_direction")}
    row |= {f"head_{k}": head[k] for k in ("attr_ok", "direction_ok")}
    return row


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Means over the rows (None where no row has a value)."""
    keys = (
        "attr_ok",
        "color_ok",
        "shape_ok",
        "direction_ok",
        "head_attr_ok",
        "head_direction_ok",
        "centroid_error",
        "lost_frac",
        "lost_inside_frac",
        "drift_frac",
        "density",
        "seconds",
        "cpu_seconds",
    )
    out = {k.replace("_ok", "_acc"): _mean_finite([float(r[k]) for r in rows if r.get(k) is not None]) for k in keys}
    return out | {"videos": len(rows)}


def reference(s: LengthSettings, scorer: Any) -> dict[str, Any]:
    """The same metrics on rendered one-object clips (ground truth: what a perfect model would score)."""
    out: dict[str, Any] = {"lora": None, "attn": [], "lengths": {}}
    for f in s.frames:
        rows = []
        for i in range(s.reference_clips):
            sample = video_sample(s.data_seed + 1000 + f, i, frames=f, two_object_prob=0.0)
            rows.append(_score(sample.video, sample.caption, scorer, VIDEO["frames"]) | {"prompt": sample.caption})
        out["lengths"][str(f)] = {"summary": summarize(rows), "rows": rows}
    return out


# ---------------------------------------------------------------------------------------------- report
COLUMNS = (
    ("attr_acc", "colour+shape"),
    ("direction_acc", "direction"),
    ("centroid_error", "centroid error (px)"),
    ("lost_frac", "lost frames"),
    ("lost_inside_frac", "lost while in frame"),
    ("density", "density"),
    ("cpu_seconds", "CPU s / video"),
)


def table(results: dict[str, Any]) -> str:
    """A markdown table: one row per (length, case)."""
    lines = ["| frames | case | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (2 + len(COLUMNS)) + "|"]
    for f in results["settings"]["frames"]:
        for name, e in results["cases"].items():
            s = e["lengths"].get(str(f), {}).get("summary")
            if not s:
                continue
            cells = []
            for k, _ in COLUMNS:
                v = s.get(k)
                cells.append("" if v is None else f"{v:.0%}" if k.endswith(("acc", "frac")) else f"{v:.2f}")
            lines.append(f"| {f} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    """Bars per case for each metric, one row per length; the rendered clips' value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = results["settings"]["frames"]
    cases = [c for c in results["cases"] if c != "reference"]
    fig, axes = plt.subplots(len(frames), len(COLUMNS), figsize=(3.1 * len(COLUMNS), 3.3 * len(frames)), squeeze=False)
    colours = {"plain": "#777", "ultravico": "#c84", "riflex": "#a6c", "radial": "#3a7"}
    for r, f in enumerate(frames):
        ref = results["cases"].get("reference", {}).get("lengths", {}).get(str(f), {}).get("summary", {})
        for c, (key, head) in enumerate(COLUMNS):
            ax = axes[r][c]
            vals = [(results["cases"][n]["lengths"].get(str(f), {}).get("summary", {}) or {}).get(key) for n in cases]
            ax.bar(
                range(len(cases)),
                [np.nan if v is None else v for v in vals],
                color=[colours.get(n, "#37a" if "radial_lora" in n else "#5ab") for n in cases],
            )
            if ref.get(key) is not None and key not in ("density", "cpu_seconds"):
                ax.axhline(ref[key], color="k", ls="--", lw=1, label="rendered clips")
            ax.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{head}, {f} frames", fontsize=9)
    fig.suptitle(
        f"length-extension LoRA on the world t2v model (checkpoint {str(results['t2v_checkpoint']['commit'])[:8]}"
        f", {results['settings']['steps']} LoRA steps)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write(results: dict[str, Any], s: LengthSettings) -> tuple[Path, Path]:
    out = Path(s.results)
    js = write_json(out / f"{s.stem}.json", {**results, **environment()})
    return js, plot(results, out / f"{s.stem}.png")


# ---------------------------------------------------------------------------------------------- driver
def run(s: LengthSettings) -> dict[str, Any]:
    """All four stages (each skipped when done); returns the results dict (also written to `s.results`)."""
    s.check()
    setup_threads(s.threads)
    work = Path(s.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = t2v_checkpoint(Path(s.model) if s.model else world_dir() / T2V_DIR)
    _log(f"t2v checkpoint {checkpoint['commit']}: {checkpoint['subject']}")
    data = work / "data"
    man = render_clips(data, s)
    _log(f"data: {man['files']} clips ({man['two_object']} with two objects) in {data}")
    training = {}
    for name in LORAS:
        if any(CASES[c][0] == name for c in s.cases):
            training[name] = train(name, s, data, checkpoint)
            publish(name, s, training[name])
    scorer = AttributeScorer(world_dir() / "classifier")
    settings = dataclasses.asdict(s) | {"radial": list(RADIAL), "eval_prompts": eval_prompts(s.prompts)}
    results: dict[str, Any] = {
        "t2v_checkpoint": checkpoint,
        "settings": settings,
        "training": {k: {x: y for x, y in v.items() if x != "fingerprint"} for k, v in training.items()},
        "cases": {"reference": reference(s, scorer)},
    }
    eval_keys = ("model", "frames", "prompts", "seeds", "inference_steps", "guidance", "radial", "eval_prompts")
    es = {k: settings[k] for k in eval_keys}  # a LoRA case's key also holds its weights' hash
    for name in s.cases:
        lora = CASES[name][0]
        key = {
            "settings": es,
            "case": list(CASES[name][1]),
            "t2v": checkpoint["commit"],
            "lora": training[lora]["lora_sha256"] if lora else None,
        }
        key = json.loads(json.dumps(key))  # as stored (tuples become lists)
        f = work / "eval" / f"{name}.json"
        if f.is_file() and json.loads(f.read_text()).get("key") == key:
            entry = json.loads(f.read_text())["result"]
            _log(f"{name}: evaluated already, skipped")
        else:
            t0 = time.perf_counter()
            entry = evaluate_case(name, s, scorer)
            write_json(f, {"key": key, "result": entry})
            _log(
                f"{name}: {time.perf_counter() - t0:.0f} s "
                + json.dumps(
                    {
                        fr: {k: v for k, v in e["summary"].items() if v is not None and k in dict(COLUMNS)}
                        for fr, e in entry["lengths"].items()
                    },
                    default=lambda x: round(x, 3),
                )
            )
        results["cases"][name] = entry
        _write(results, s)  # partial results after every case
    js, png = _write(results, s)
    print(table(results))
    _log(f"wrote {js} and {png}")
    return results


def parse_args(argv: list[str] | None = None) -> LengthSettings:
    """Command-line flags -> LengthSettings (one flag per field)."""
    d = LengthSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(LengthSettings):
        v = getattr(d, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, tuple):
            p.add_argument(flag, nargs="+", type=int if f.name != "cases" else str, default=v)
        else:
            p.add_argument(flag, type=type(v), default=v)
    a = p.parse_args(argv)
    return LengthSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(a).items()})


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/world_lora_length.py [--steps N ...]`; 2 on bad settings."""
    try:
        s = parse_args(argv)
        s.check()
    except ValueError as e:
        print(f"world_lora_length: error: {e}")
        return 2
    run(s)
    return 0

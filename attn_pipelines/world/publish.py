"""Ship a trained world text-to-video pipeline into `assets/world/t2v` with its model card, and render samples.

    python -m attn_pipelines.world.publish --vae-run runs/world/vae --t2v-run runs/world/t2v
    python -m attn_pipelines.world.publish --samples-only          # re-render assets/world/samples/
    python -m attn_pipelines.world.publish --vae-run ... --t2v-run ... --dest assets/world/t2v_next   # a candidate

The pipeline folder the training run chose by accuracy (`best/`: the EMA weights with the best
colour+shape and direction accuracy on the fixed training-time prompts; `--which final` ships the
last weights) is copied as diffusers saved it (every safetensors file is checked to be <= 20 MB),
with `MODEL_CARD.md`, `vae_training.json` and `t2v_training.json` (the training runs' configs,
final metrics and accuracy curve) beside `model_index.json`; `--accuracy` adds the full
`accuracy` evaluation (72 one-object prompts, two-object prompts apart) to the card. Samples: one
GIF per prompt of `SAMPLE_PROMPTS` (seed 0, the CLI's defaults, upscaled 4x with nearest neighbour
for viewing) and a PNG grid of their frames, in `assets/world/samples/`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from .accuracy import confusion_markdown
from .common import environment, model_card, setup_threads, write_json
from .models import T2V_DIR, TRANSFORMER_CONFIG, VAE_CONFIG, VIDEO, load_world_pipeline, world_dir

__all__ = ["SAMPLE_PROMPTS", "MAX_FILE_MB", "publish", "render_samples"]

MAX_FILE_MB = 20
SAMPLE_PROMPTS = (
    "a red circle moving right",
    "a blue square moving down",
    "a green triangle moving left",
    "a yellow circle moving up",
    "a white square moving right",
    "a purple triangle moving down",
    "a blue circle moving left and a yellow triangle moving right",
)


def _upscale(video: np.ndarray, k: int = 4) -> np.ndarray:
    return video.repeat(k, axis=1).repeat(k, axis=2)


def render_samples(dest: Path, steps: int = 20, seed: int = 0) -> list[Path]:
    """GIFs (4x nearest-neighbour upscaled) and one PNG grid of `SAMPLE_PROMPTS` from the shipped pipeline."""
    import torch
    from PIL import Image

    pipe = load_world_pipeline()
    dest.mkdir(parents=True, exist_ok=True)
    files, rows = [], []
    for prompt in SAMPLE_PROMPTS:
        video = pipe(prompt=prompt, num_inference_steps=steps, num_frames=VIDEO["frames"], height=VIDEO["size"],
                     width=VIDEO["size"], guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                     output_type="np").frames[0]  # fmt: skip
        u8 = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
        rows.append(np.concatenate(list(u8), axis=1))
        frames = [Image.fromarray(f) for f in _upscale(u8)]
        path = dest / (prompt.replace(" ", "_") + ".gif")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // VIDEO["fps"], loop=0)
        files.append(path)
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(_upscale(grid[None], 3)[0]).save(dest / "grid.png")
    (dest / "README.md").write_text(
        "# Samples of the world text-to-video model\n\n"
        f'`attnplug generate --prompt "<prompt>" --seed {seed}` (defaults: {steps} steps, guidance 5, '
        f"{VIDEO['frames']} frames of {VIDEO['size']} x {VIDEO['size']} px), upscaled 4x (GIFs) / 3x (grid) "
        "with nearest neighbour. `grid.png`: one row per prompt, in this order:\n\n"
        + "".join(f"{i + 1}. {p}\n" for i, p in enumerate(SAMPLE_PROMPTS))
        + "\nRe-render: `python -m attn_pipelines.world.publish --samples-only`.\n"
    )
    return [*files, dest / "grid.png"]


def _curve(evals: list[dict]) -> str:
    """The training-time accuracy curve as a markdown table."""
    head = "| step | colour | shape | colour+shape | direction | colour present | colour moves | loss (avg) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for e in evals:
        lines.append(
            f"| {e['step']} | {e['color_acc']:.2f} | {e['shape_acc']:.2f} | {e['attr_acc']:.2f} | "
            f"{e['direction_acc']:.2f} | {e['present']:.2f} | {e['moves']:.2f} | {e.get('loss_avg')} |"
        )
    return "\n".join(lines)


def _accuracy_section(path: Path) -> str:
    r = json.loads(path.read_text())
    one, two = r["one_object"], r.get("two_object", {})
    text = (
        f"`{r['command']}` ({r['seconds']:.0f} s; seeds {r['seeds']}, {r['steps']} steps, guidance "
        f"{r['guidance']}): over {one['videos']} one-object prompts the classifier reads colour "
        f"{one['color_acc']:.0%}, shape {one['shape_acc']:.0%}, both {one['attr_acc']:.0%}; the tracked direction "
        f"is right in {one['direction_acc']:.0%}. Colour check without the classifier: the named colour is "
        f"present in most frames in {one['present']:.0%} and moves the named way in {one['moves']:.0%}."
    )
    if two:
        text += (
            f" Two-object prompts ({two['videos']}): both colours present {two['present_acc']:.0%}, both moving "
            f"as named {two['moves_acc']:.0%}."
        )
    return (
        text + "\n\nAsked (rows) vs read by the classifier (columns), one-object prompts:\n\n" + confusion_markdown(r)
    )


def _record(run: Path) -> dict:
    """A training run's record: {train_config, metrics} from a run folder, or a record JSON file as published."""
    if run.is_file():
        return json.loads(run.read_text())
    return {"train_config": json.loads((run / "train_config.json").read_text()),
            "metrics": json.loads((run / "metrics.json").read_text())}  # fmt: skip


def _vae_stage(rec: dict) -> str:
    """One VAE training stage for the card: exact command, steps, seconds, PSNR and what the latent keeps."""
    args, m = rec["train_config"]["args"], rec["metrics"]
    cmd = _command("train_vae", args)
    if "latent" not in args:  # recorded before --latent / --fg-weight existed: it trained on samples, unweighted
        cmd += " --latent sample --fg-weight 0"
    text = f"`{cmd}`: {m['steps']} steps, {m['seconds']:.0f} s, held-out PSNR {m['held_out_psnr_db']:.2f} dB"
    rep = m.get("report")
    if rep:
        r = rep["reconstructed"]
        text += (
            f"; on {rep['clips']} held-out one-object clips the classifier reads the reconstructions' colour "
            f"{r['color']:.0%} and shape {r['shape']:.0%}; per-channel signal-to-noise "
            f"{[round(v, 2) for v in rep['snr']]}, PSNR lost without each channel "
            f"{[round(v, 2) for v in rep['channel_drop_db']]} dB"
        )
    return text


def publish(vae_runs: list[Path], t2v_run: Path, dest: Path, which: str = "best", accuracy: Path | None = None,
            note: str = "") -> Path:  # fmt: skip
    """Copy `t2v_run/<which>` (best: chosen by accuracy, or pipeline: the last weights) to `dest` with the training
    records (`vae_runs`: the VAE's training stages in order, run folders or record files) and a model card;
    refuse files over 20 MB."""
    src = t2v_run / ("best" if which == "best" else "pipeline")
    if not (src / "model_index.json").is_file():
        raise SystemExit(f"no pipeline in {src} (train with --eval-every for best/, or pass --which final)")
    big = [p for p in src.rglob("*.safetensors") if p.stat().st_size > MAX_FILE_MB * 2**20]
    if big:
        raise SystemExit(f"checkpoint files over {MAX_FILE_MB} MB: {big}")
    vae_records = [_record(Path(r)) for r in vae_runs]
    t2v_record = _record(t2v_run)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    write_json(dest / "vae_training.json", {"stages": vae_records})
    write_json(dest / "t2v_training.json", t2v_record)
    tm = t2v_record["metrics"]
    best = tm.get("best") or {}
    shipped = (
        f"the EMA weights of step {best['step']} (best colour+shape + direction on the {len(tm['eval_prompts'])} "
        "training-time prompts)"
        if which == "best" and best
        else f"the EMA weights of step {tm['steps']}"
    )
    targs = t2v_record["train_config"]["args"]
    sizes = {p.relative_to(dest).as_posix(): f"{p.stat().st_size / 2**20:.2f} MB" for p in dest.rglob("*.safetensors")}
    model_card(
        dest / "MODEL_CARD.md",
        "attnplug world text-to-video (WanPipeline, trained on procedural shapes)",
        {
            "What": "A diffusers `WanPipeline` trained from scratch on procedural videos of coloured shapes "
            f"(`attn_pipelines.world.data.video_sample`): {VIDEO['frames']} frames of {VIDEO['size']} x "
            f"{VIDEO['size']} px, one object (or two, {targs['two_object_prob']:.0%} of clips), captions such as "
            "'a red circle moving right' / 'a blue square moving down and a green triangle moving left'. "
            "It is `attnplug generate`'s embedded default for video.",
            "Components": {
                "transformer": f"`WanTransformer3DModel` {TRANSFORMER_CONFIG}",
                "vae": f"`AutoencoderKLWan` {VAE_CONFIG} (2x spatial, 2x temporal: token grid 5 x 8 x 8)",
                "text_encoder": "`UMT5EncoderModel` (d_model 64, 2 layers), trained jointly with the transformer",
                "tokenizer": "Unigram over the world's words, built with `tokenizers` (T5-style ids)",
                "scheduler": "`UniPCMultistepScheduler` on flow sigmas (shift 2)",
                "files": sizes,
            },
            "Training": {
                **{f"VAE stage {i + 1}": _vae_stage(r) for i, r in enumerate(vae_records)},
                "text-to-video": f"`{_command('train_t2v', targs)}`: {tm['steps']} steps, {tm['seconds']:.0f} s "
                f"(EMA {targs['ema']}), flow matching on {targs['clips']} clips, final average loss "
                f"{tm['loss_avg_last']:.4f}; shipped: {shipped}",
                "device": str(t2v_record["train_config"].get("device")),
            },
            "Accuracy during training": (
                f"The EMA pipeline on {len(tm.get('eval_prompts', []))} fixed one-object prompts (seed 0, 20 steps, "
                "guidance 5), read by the attribute classifier:\n\n" + _curve(tm["evals"])
                if tm.get("evals")
                else "not logged: this transformer was trained before `train_t2v` logged accuracy"
            ),
            **({"Note": note} if note else {}),
            "Accuracy of the shipped model": _accuracy_section(accuracy) if accuracy else "not measured yet",
            "Evaluation": "Attribute accuracy of generated videos (the attribute classifier `assets/world/classifier` "
            "on every frame; direction by tracking) and every variant's effect: `attnplug eval`, results in "
            "`benchmarks/results/world_eval.json` (figures in docs/world.md).",
            "Limits": "32 x 32 px, 9 frames at 8 fps; only the world's vocabulary means anything to it; trained "
            "on CPU in about an hour, so shapes can be soft-edged and two-object prompts are less reliable.",
        },
    )
    write_json(dest / "environment.json", environment())
    return dest


def _command(script: str, args: dict) -> str:
    """The exact command line of a training run from its recorded arguments (defaults included; run folders under
    a `runs/` folder are shown from it)."""
    parts = [f"python -m attn_pipelines.world.{script}"]
    for k, v in args.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, str) and "/runs/" in v:
            v = "runs/" + v.split("/runs/", 1)[1]
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.publish", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--vae-run",
        type=Path,
        nargs="+",
        default=[Path("runs/world/vae")],
        help="the VAE's training stages in order: run folders or published record files",
    )
    p.add_argument("--t2v-run", type=Path, default=Path("runs/world/t2v"))
    p.add_argument("--which", choices=("best", "final"), default="best", help="the run's best/ or last pipeline")
    p.add_argument("--accuracy", type=Path, default=None, help="accuracy JSON of this model for the card")
    p.add_argument("--note", default="", help="a paragraph for the model card (how this pipeline was put together)")
    p.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="publish here instead of the shipped folder (a candidate that is not the CLI's default yet: no samples)",
    )
    p.add_argument("--samples-only", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_threads(a.threads)
    if a.dest is not None and a.samples_only:
        raise SystemExit("--dest publishes a candidate without samples: it cannot go with --samples-only")
    if not a.samples_only:
        dest = a.dest or world_dir() / T2V_DIR
        print(f"published {publish(a.vae_run, a.t2v_run, dest, a.which, a.accuracy, a.note)}")
        if a.dest is not None:
            return 0  # the samples show the shipped model, which this is not (yet)
    for f in render_samples(world_dir() / "samples"):
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

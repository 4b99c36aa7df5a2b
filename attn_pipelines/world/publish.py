"""Ship a trained world text-to-video pipeline into `assets/world/t2v` with its model card, and render samples.

    python -m attn_pipelines.world.publish --vae-run runs/world/vae --t2v-run runs/world/t2v
    python -m attn_pipelines.world.publish --samples-only          # re-render assets/world/samples/

The pipeline folder is copied as diffusers saved it (every safetensors file is checked to be
<= 20 MB), with `MODEL_CARD.md`, `vae_training.json` and `t2v_training.json` (the training runs'
configs and final metrics) beside `model_index.json`. Samples: one GIF per prompt of `SAMPLE_PROMPTS`
(seed 0, the CLI's defaults, upscaled 4x with nearest neighbour for viewing) and a PNG grid of
their frames, in `assets/world/samples/`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from .common import environment, model_card, setup_threads, write_json
from .models import T2V_DIR, TRANSFORMER_CONFIG, VAE_CONFIG, VIDEO, world_dir

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

    from .evaluate import load_world_pipeline

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


def publish(vae_run: Path, t2v_run: Path, dest: Path) -> Path:
    """Copy `t2v_run/pipeline` to `dest` with the training records and a model card; refuse files over 20 MB."""
    src = t2v_run / "pipeline"
    big = [p for p in src.rglob("*.safetensors") if p.stat().st_size > MAX_FILE_MB * 2**20]
    if big:
        raise SystemExit(f"checkpoint files over {MAX_FILE_MB} MB: {big}")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    records = {}
    for name, run in (("vae_training.json", vae_run), ("t2v_training.json", t2v_run)):
        cfg = json.loads((run / "train_config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        records[name] = {"train_config": cfg, "metrics": metrics}
        write_json(dest / name, records[name])
    vm, tm = records["vae_training.json"]["metrics"], records["t2v_training.json"]["metrics"]
    targs = records["t2v_training.json"]["train_config"]["args"]
    vargs = records["vae_training.json"]["train_config"]["args"]
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
                "VAE": f"`python -m attn_pipelines.world.train_vae --out runs/world/vae --steps {vargs['steps']} "
                f"--batch-size {vargs['batch_size']}`: {vm['steps']} steps, {vm['seconds']:.0f} s, held-out "
                f"PSNR {vm['held_out_psnr_db']:.2f} dB",
                "text-to-video": f"`python -m attn_pipelines.world.train_t2v --vae runs/world/vae/vae --out "
                f"runs/world/t2v --steps {targs['steps']} --batch-size {targs['batch_size']}`: {tm['steps']} steps "
                f"(EMA {targs['ema']}), flow matching on {targs['clips']} clips, final average loss "
                f"{tm['loss_avg_last']:.4f}",
                "device": str(records["t2v_training.json"]["train_config"].get("device")),
            },
            "Evaluation": "Attribute accuracy of generated videos (the attribute classifier `assets/world/classifier` "
            "on every frame; direction by tracking) and every variant's effect: `attnplug eval`, results in "
            "`benchmarks/results/world_eval.json` (figures in docs/world.md).",
            "Limits": "32 x 32 px, 9 frames at 8 fps; only the world's vocabulary means anything to it; trained "
            "on CPU in about an hour, so shapes can be soft-edged and two-object prompts are less reliable.",
        },
    )
    write_json(dest / "environment.json", environment())
    return dest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_pipelines.world.publish", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae-run", type=Path, default=Path("runs/world/vae"))
    p.add_argument("--t2v-run", type=Path, default=Path("runs/world/t2v"))
    p.add_argument("--samples-only", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_threads(a.threads)
    if not a.samples_only:
        print(f"published {publish(a.vae_run, a.t2v_run, world_dir() / T2V_DIR)}")
    for f in render_samples(world_dir() / "samples"):
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

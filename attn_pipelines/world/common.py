"""Shared pieces of the world's training and evaluation scripts: threads, seeds, schedules, provenance."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from vision_attn.finetune import cosine_multiplier
from vision_attn.finetune import cosine_schedule as finetune_cosine_schedule

__all__ = [
    "setup_threads", "cosine_lr", "cosine_schedule", "environment", "git_commit", "write_json", "model_card", "Timer",
    "ModuleEMA",
]  # fmt: skip


def setup_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default 1: on a shared 2-core machine one thread per process ran a
    training step 2-7x faster than two, which contend with other processes); returns the number used."""
    n = threads if threads else int(os.environ.get("ATTNPLUG_THREADS", "1"))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to `min_ratio` (5 %: the world's
    scripts never let the rate reach zero); `vision_attn.finetune.cosine_multiplier`, diffusers' schedule."""
    return cosine_multiplier(step, total, warmup, min_ratio)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float = 0.05
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR of `cosine_lr` on `optimizer` (the world's training scripts' schedule)."""
    return finetune_cosine_schedule(optimizer, total, warmup, min_ratio)


class _WorldEMAModel(EMAModel):
    """diffusers' EMAModel with its (1 + step) / (10 + step) warm-up from the first update on (EMAModel's own
    returns 0 there); `optimization_step` counts the updates including this one."""

    def get_decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - self.update_after_step - 1)
        return max(self.min_decay, min(self.decay, (1 + step) / (10 + step)))


class ModuleEMA:
    """Exponential moving average of a module's parameters, kept by diffusers' `EMAModel` and mirrored into
    `module` (the copy that is evaluated and saved, e.g. with its own attention processors).

    The decay at optimizer step `step` (0-based) is min(decay, (1 + step) / (10 + step)): EMAModel's own warm-up
    without `use_ema_warmup`, except that EMAModel returns 0 at the first update (a plain copy) where the world's
    runs always used 0.1 (`_WorldEMAModel`). `state_dict()` is the module's state dict, the format of the `ema_*`
    entries of every world `state.pt`, so old and new states load alike."""

    def __init__(self, module: torch.nn.Module, decay: float, step: int = 0) -> None:
        self.module = module
        self.decay = decay
        self.ema = _WorldEMAModel(module.parameters(), decay=decay, min_decay=0.0, update_after_step=0,
                            use_ema_warmup=False)  # fmt: skip
        self.ema.optimization_step = step

    def update(self, model: torch.nn.Module) -> None:
        """One EMA step toward `model`'s parameters (same architecture as `module`)."""
        self.ema.step(model.parameters())

    @property
    def current(self) -> torch.nn.Module:
        """`module` holding the averaged parameters now."""
        self.ema.copy_to(self.module.parameters())
        return self.module

    def state_dict(self) -> dict[str, Any]:
        return self.current.state_dict()

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Resume from a module state dict saved after `step` optimizer steps (the decay warm-up goes on)."""
        self.module.load_state_dict(state)
        self.__init__(self.module, self.decay, step)


def git_commit(where: Path | None = None) -> str | None:
    """HEAD commit of the git checkout holding `where` (default: the working directory, where training and
    evaluation run); None outside a git checkout. The installed package never looks for its own checkout."""
    try:
        root = Path.cwd() if where is None else where
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Device and library versions, for results and model cards."""
    import diffusers
    import timm
    import transformers

    dev: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        dev["gpu"] = torch.cuda.get_device_name(0)
    try:
        dev["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return {
        "device": dev,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "timm": timm.__version__,
        },
        "git_commit": git_commit(),
    }


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def model_card(path: str | Path, title: str, sections: dict[str, str | dict]) -> Path:
    """A short markdown model card: what it is, how it was trained (command, config), what it scores."""
    lines = [f"# {title}", ""]
    for head, body in sections.items():
        lines += [f"## {head}", ""]
        if isinstance(body, dict):
            lines += [f"- **{k}**: {v}" for k, v in body.items()]
        else:
            lines.append(body.strip())
        lines.append("")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class Timer:
    """Wall-clock seconds since construction (`elapsed`), and a deadline check (`over(minutes)`)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self, minutes: float | None) -> bool:
        return minutes is not None and self.elapsed > 60 * minutes

"""Shared pieces of the world's training and evaluation scripts: threads, seeds, schedules, provenance."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from vision_attn.finetune import cosine_multiplier
from vision_attn.finetune import cosine_schedule as finetune_cosine_schedule

__all__ = [
    "setup_threads", "cosine_lr", "cosine_schedule", "environment", "git_commit", "write_json", "model_card", "Timer",
    "ModuleEMA", "atomic_save", "run_sweep", "RunRecords",
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


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` to a temporary file beside `path`, then renamed over it: a run killed while saving leaves the
    previous file whole."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def run_sweep(work: Path, runs: list[str], known: Iterable[str], steps: Callable[[str], int],
              prepare: Callable[[str], None], command: Callable[[str], list[str]], cwd: Path) -> None:  # fmt: skip
    """Train the named sweep runs (all `known` ones when none is named) one after another, each in `work/<run>`:
    an unknown name is refused before anything runs; a run whose metrics.json reached `steps(run)` is only read;
    otherwise `prepare(run)`, then `command(run)` with its output appended to `work/<run>/log.txt` (the trainers
    resume from their state.pt)."""
    known = list(known)
    for run in runs:
        if run not in known:
            raise SystemExit(f"unknown run {run!r}; known: {', '.join(known)}")
    for run in runs or known:
        m = work / run / "metrics.json"
        if m.is_file() and json.loads(m.read_text())["steps"] >= steps(run):
            print(f"{run}: done", flush=True)
            continue
        prepare(run)
        cmd = command(run)
        print(" ".join(cmd[1:]), flush=True)
        with open(work / run / "log.txt", "a") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


class RunRecords:
    """What the world's training scripts (`train_t2i`, `train_t2v`) keep across a run and its resumptions.

    The loss `history`, the accuracy curve `evals` and its `best` row, the seconds of earlier runs, the running
    loss; `save` writes them with the modules' states to `OUT/state.pt` (atomically), `load` reads a state.pt
    back (the same keys the scripts wrote before this class, so old files resume), `write` rewrites
    `train_config.json` and `metrics.json` (what the publish scripts read, also mid-run), and `add_eval`
    appends an accuracy row and says whether it is the new best."""

    def __init__(self, out: str | Path, timer: Timer, eval_prompts: list[str]) -> None:
        self.out, self.timer, self.eval_prompts = Path(out), timer, list(eval_prompts)
        self.state_file = self.out / "state.pt"
        self.step, self.before = 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.run_loss: float | None = None

    @property
    def seconds(self) -> float:
        """Training seconds of every run so far (earlier runs' and this one's)."""
        return self.before + self.timer.elapsed

    def load(self) -> dict[str, Any] | None:
        """The saved state (None when there is none): restores step, history, curve, best, seconds, the running
        loss and the RNG; the caller loads its modules from the returned dict."""
        if not self.state_file.is_file():
            return None
        st = torch.load(self.state_file, weights_only=False)
        self.step, self.history, self.before = st["step"], st["history"], st.get("seconds", 0.0)
        self.evals, self.best = st.get("evals", []), st.get("best", {})
        # the running loss goes on from its last logged value (a resume with no step left keeps the final one)
        self.run_loss = self.history[-1].get("loss_avg") if self.history else None
        torch.set_rng_state(st["rng"])
        return st

    def save(self, step: int, states: dict[str, Any]) -> Path:
        """`states` (the modules', the optimiser's, ...) with the records at `step`, atomically to state.pt."""
        st = {**states, "step": step, "history": self.history, "rng": torch.get_rng_state(), "seconds": self.seconds,
              "evals": self.evals, "best": self.best}  # fmt: skip
        return atomic_save(st, self.state_file)

    def write(self, step: int, config: dict[str, Any]) -> None:
        """`train_config.json` (`config`) and `metrics.json` as they stand at `step`."""
        write_json(self.out / "train_config.json", config)
        write_json(self.out / "metrics.json", {"steps": step, "seconds": round(self.seconds, 1),
                                               "loss_avg_last": self.run_loss, "evals": self.evals, "best": self.best,
                                               "eval_prompts": self.eval_prompts, "history": self.history})  # fmt: skip

    def evaluated(self, step: int) -> bool:
        return any(e["step"] == step for e in self.evals)

    def add_eval(self, row: dict[str, Any], better: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
                 ) -> bool:  # fmt: skip
        """Append an accuracy row; True when it becomes `best` (a higher "score", or `better(row, best)`): the
        caller then saves its weights as best/."""
        self.evals.append(row)
        if self.best and not (better(row, self.best) if better else row["score"] > self.best["score"]):
            return False
        self.best.clear()
        self.best.update(row)
        return True

"""HeadHunter (cvlab-kaist): greedy search for the attention heads SoftPAG should perturb.

Round r scores every remaining candidate head h with the objective over the M prompt/seed pairs, each output
generated with SoftPAG on the heads selected so far plus h, and adds the k best heads to the selection; R
rounds (HeadHunter's SD3 general-quality setting: M=20, R=1, k=24; style: R=5, k=3). Higher objective = better.

* Objective: any callable `objective(outputs, pairs) -> float` on the generated images / videos (`pairs` are the
  (prompt, seed) pairs the outputs were generated from). Defaults built on torchmetrics: `clip_score` (CLIP
  score, only from a CLIP model already on this machine: a local directory or the Hugging Face cache; nothing
  is downloaded), and model-free, exact ones: `reference_similarity` (PSNR / SSIM / negative MSE to reference
  outputs) and `total_variation` (mean absolute neighbour difference: a sanity objective, not a quality score).
* Budget: `max_evaluations` / `max_seconds` per call (one evaluation = one candidate scored on the M pairs); a
  search stopped by its budget is resumed by calling it again with the same file.
* Progress: a tqdm bar over the evaluations (its position survives resuming).
* Resumable: the JSON at `path` is rewritten (atomically) after every evaluation; `run()` continues from it, and
  refuses a file written for another model or other settings. `SoftPAG(heads_file=path)` loads the selection
  (and checks the model it was searched on).

Heads are (layer, head) with layers indexed among the adapter's hooked attention layers (FLUX: dual-stream blocks
then single-stream). `attnplug headhunt` runs this from the command line.

What a custom `generate(pipe, prompt, seed)` must do: SoftPAG runs its perturbed pass after the conditional
denoiser call of each step and shifts every prediction of that step, so it must be able to tell the calls of
one step apart. A diffusers pipeline does (one batched [uncond, cond] call, or `transformer.cache_context("cond")`
/ `("uncond")` around sequential calls). A hand-written loop must do the same: one call per timestep, or each
classifier-free-guidance branch inside `cache_context("cond")` / `cache_context("uncond")`, or one batched call
with `SoftPAG(batched_cfg=True)` semantics. Two calls with the same batch at one timestep outside any cache
context are refused (ValueError) instead of being scored as one step.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import find_adapter
from .caches import HOOK_NAME
from .clock import timestep_value
from .hooks import _transformers_of, apply
from .variants.softpag import HEADS_FORMAT, SoftPAG

__all__ = [
    "HeadHunter",
    "HeadHuntResult",
    "Objective",
    "clip_score",
    "reference_similarity",
    "total_variation",
    "model_signature",
    "resume_conflicts",
    "search_settings",
]

Objective = Callable[[list[Any], list[tuple[str, int]]], float]
_VERSION = 1


def _key(head: tuple[int, int]) -> str:
    return f"{head[0]},{head[1]}"


def _unkey(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)


def model_signature(pipe: Any) -> dict[str, Any]:
    """Family, class, hooked attention layer names and heads per layer of the (first) denoiser of `pipe`."""
    models, _ = _transformers_of(pipe)
    model = models[0][1]
    adapter = find_adapter(model)
    mods = adapter.attention_modules(model)
    return {
        "family": adapter.name,
        "class": type(model).__name__,
        "layers": [name for name, _ in mods],
        "heads": [int(m.heads) for _, m in mods],
    }


def _images(out: Any) -> torch.Tensor:
    """float [N, C, H, W] in [0, 1] from an image [C, H, W] / [H, W, C] or a video [F, C, H, W]."""
    t = torch.as_tensor(out).float()
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"objective: expected an image [C, H, W] or a video [F, C, H, W], got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    return t


def total_variation() -> Objective:
    """Mean absolute difference of neighbouring pixels (torchmetrics' total variation per pixel), averaged over
    the outputs: exact and model-free. Higher = more high-frequency content; a sanity objective."""
    from torchmetrics.functional.image import total_variation as tv

    def objective(outputs: list[Any], pairs: list[tuple[str, int]]) -> float:
        vals = []
        for out in outputs:
            x = _images(out)
            vals.append(float(tv(x, reduction="sum")) / x.numel())
        return sum(vals) / len(vals)

    objective.__name__ = "total_variation"
    return objective


def reference_similarity(references: Sequence[Any], metric: str = "psnr") -> Objective:
    """Similarity of each output to its reference (same order as the pairs): "psnr", "ssim" or "mse" (negated,
    so higher is better). Exact and model-free; e.g. references from a run with known-good heads."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if metric not in ("psnr", "ssim", "mse"):
        raise ValueError(f"reference_similarity: metric must be 'psnr', 'ssim' or 'mse', got {metric!r}")
    refs = [_images(r) for r in references]

    def objective(outputs: list[Any], pairs: list[tuple[str, int]]) -> float:
        if len(outputs) != len(refs):
            raise ValueError(f"reference_similarity: {len(outputs)} outputs for {len(refs)} references")
        vals = []
        for out, ref in zip(outputs, refs):
            x = _images(out)
            if metric == "psnr":
                vals.append(float(peak_signal_noise_ratio(x, ref, data_range=1.0)))
            elif metric == "ssim":
                vals.append(float(structural_similarity_index_measure(x, ref, data_range=1.0)))
            else:
                vals.append(-float(((x - ref) ** 2).mean()))
        return sum(vals) / len(vals)

    objective.__name__ = f"reference_{metric}"
    return objective


def clip_score(model: str = "openai/clip-vit-base-patch16") -> Objective:
    """torchmetrics' CLIP score of each output (every frame of a video) against its prompt, averaged. `model` is a
    local directory or a Hugging Face id already in the local cache; nothing is downloaded (ValueError if absent)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(model, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            raise ValueError(
                f"clip_score: CLIP model {model!r} is not available locally ({type(e).__name__}); pass a local "
                "directory, or download it first on a machine with network access (hf download <id>)"
            ) from None
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Features(CLIPModel):
        """transformers >= 5 returns model outputs where torchmetrics expects the projected embeddings."""

        def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
            out = super().get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args: Any, **kwargs: Any) -> Any:
            out = super().get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    def load() -> tuple[Any, Any]:  # torchmetrics takes a loader; from the local files only
        return (
            Features.from_pretrained(str(path), local_files_only=True).eval(),
            CLIPProcessor.from_pretrained(str(path), local_files_only=True),
        )

    metric = CLIPScore(model_name_or_path=load)

    @torch.no_grad()
    def objective(outputs: list[Any], pairs: list[tuple[str, int]]) -> float:
        vals = []
        for out, (prompt, _) in zip(outputs, pairs):
            x = (_images(out).clamp(0, 1) * 255).round().to(torch.uint8)
            metric.reset()
            vals.append(float(metric(list(x), [prompt] * x.shape[0])))
        return sum(vals) / len(vals)

    objective.__name__ = f"clip_score({model})"
    return objective


class _StepGuard:
    """A forward pre-hook on one hooked denoiser: refuses a second call with the same batch at one timestep outside
    any cache context (SoftPAG would take it for another prediction of the step already guided; see the module
    docstring). Reads the timestep on the host: the search's generations only, never a user's pipeline call."""

    def __init__(self, model: torch.nn.Module, handle: Any) -> None:
        self.model, self.adapter, self.hook_name = model, find_adapter(model), HOOK_NAME
        self.seen: set[tuple[float | None, int]] = set()
        self._handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        registry = getattr(module, "_diffusers_hook", None)
        step_hook = registry.get_hook(self.hook_name) if registry is not None else None
        if step_hook is None or step_hook.branches._context is not None:
            return  # a cache context names the branch: SoftPAG tells the calls apart
        hs = self.adapter.forward_arg(module, args, kwargs, "hidden_states")
        key = (timestep_value(self.adapter.timestep(module, args, kwargs)), int(hs.shape[0]) if hs is not None else -1)
        if key in self.seen:
            raise ValueError(
                f"HeadHunter: generate called {type(module).__name__} twice at timestep {key[0]} with batch {key[1]} "
                "outside a cache context, so SoftPAG would score both calls as one denoising step (the second gets "
                "the first one's shift). Wrap each guidance branch in transformer.cache_context('cond') / "
                "cache_context('uncond') as diffusers pipelines do, or make one batched [uncond, cond] call per step"
            )
        self.seen.add(key)

    def clear(self) -> None:
        self.seen.clear()

    def remove(self) -> None:
        self._handle.remove()


def _one_call_per_step(handle: Any) -> list[_StepGuard]:
    """A `_StepGuard` on every denoiser `handle` patched."""
    target = handle.target
    models = [target] if isinstance(target, torch.nn.Module) else []
    models += [getattr(target, rt.model_name, None) for rt in handle.runtimes]  # a pipeline's hooked denoisers
    models = [m for m in dict.fromkeys(models) if isinstance(m, torch.nn.Module)]
    return [_StepGuard(m, handle) for m in models if getattr(m, "_attnplug_handle", None) is handle]


def default_generate(call_kwargs: dict[str, Any] | None = None) -> Callable[[Any, str, int], Any]:
    """`generate(pipe, prompt, seed)`: one pipeline call with a CPU generator seeded `seed`, output_type "pt";
    returns the first image [C, H, W] or video [F, C, H, W]."""
    extra = dict(call_kwargs or {})

    def generate(pipe: Any, prompt: str, seed: int) -> Any:
        kw = {"output_type": "pt", **extra, "prompt": prompt, "generator": torch.Generator("cpu").manual_seed(seed)}
        result = pipe(**kw)
        out = getattr(result, "frames", None)
        if out is None:
            out = result.images
        return out[0]

    return generate


def search_settings(
    pairs: Sequence[tuple[str, int]],
    rounds: int,
    top_k: int,
    u: float,
    scale: float,
    objective: str,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The settings a search file records and a resumed search must match (JSON-comparable)."""
    return {
        "rounds": rounds,
        "top_k": top_k,
        "u": float(u),
        "scale": float(scale),
        "pairs": [[str(p), int(s)] for p, s in pairs],
        "objective": objective,
        "layers": None if layers is None else sorted(set(layers)),
    }


def resume_conflicts(path: str | Path, settings: dict[str, Any]) -> list[str]:
    """Setting names that differ between `settings` and the search saved at `path` ([] when it is absent or
    matches); ValueError when `path` is not a HeadHunter file. Needs no model (the CLI checks before loading)."""
    p = Path(path).expanduser()
    if not p.exists():
        return []
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"HeadHunter: cannot resume from {p}: {' '.join(str(e).split())}") from None
    if not isinstance(state, dict) or state.get("format") != HEADS_FORMAT:
        raise ValueError(f"HeadHunter: {p} is not a HeadHunter file (format {HEADS_FORMAT!r})")
    return [k for k, v in settings.items() if (state.get("settings") or {}).get(k) != v]


@dataclass
class HeadHuntResult:
    """The selection so far: heads (in selection order), per-round scores, evaluations, whether the search ended."""

    selected: list[tuple[int, int]]
    rounds: list[dict[str, Any]]
    evaluations: int
    complete: bool
    path: Path | None = None
    stopped: str | None = None  # "max_evaluations" / "max_seconds" when a budget ended this call


@dataclass
class HeadHunter:
    """Greedy head search on `pipe` (see the module docstring).

    objective: `objective(outputs, pairs) -> float`, higher is better; prompts / seeds: the M pairs (seeds
    default to 0..M-1); rounds (R) / top_k (k); u / scale: SoftPAG's during the search; layers: restrict the
    candidates to these layer indices; generate: `generate(pipe, prompt, seed) -> output` (default: a pipeline
    call with `call_kwargs`, output_type "pt"); objective_name: stored in the JSON (resuming checks it).
    """

    pipe: Any
    objective: Objective
    prompts: Sequence[str]
    seeds: Sequence[int] | None = None
    rounds: int = 1
    top_k: int = 1
    u: float = 1.0
    scale: float = 3.0
    layers: Sequence[int] | None = None
    generate: Callable[[Any, str, int], Any] | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    objective_name: str | None = None
    apply_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"HeadHunter.prompts must be a non-empty list of strings, got {self.prompts!r}")
        seeds = list(range(len(self.prompts))) if self.seeds is None else list(self.seeds)
        if len(seeds) != len(self.prompts) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(
                f"HeadHunter.seeds must be one int per prompt ({len(self.prompts)}), got {self.seeds!r}"
            )  # fmt: skip
        self.pairs = [(str(p), int(s)) for p, s in zip(self.prompts, seeds)]
        for name in ("rounds", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HeadHunter.{name} must be an int >= 1, got {v!r}")
        SoftPAG(scale=self.scale, u=self.u, layers=(0,))  # same checks and messages as SoftPAG's
        if self.u == 0 or self.scale == 0:
            raise ValueError("HeadHunter: u and scale must be > 0 (with 0 every head scores the same)")
        if not callable(self.objective):
            raise TypeError(f"HeadHunter.objective must be callable, got {self.objective!r}")
        self.signature = model_signature(self.pipe)
        n = len(self.signature["heads"])
        if self.layers is not None:
            bad = [x for x in self.layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n]
            if bad or not self.layers:
                raise ValueError(f"HeadHunter.layers must be layer indices in [0, {n - 1}], got {list(self.layers)!r}")
        self.candidates = [
            (layer, head)
            for layer in (range(n) if self.layers is None else sorted(set(self.layers)))
            for head in range(self.signature["heads"][layer])
        ]
        if self.generate is None:
            self.generate = default_generate(self.call_kwargs)
        name = self.objective_name or getattr(self.objective, "__name__", type(self.objective).__name__)
        self.objective_name = str(name)

    # -- state --------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What a resumed search must share with the file (JSON-comparable)."""
        return search_settings(
            self.pairs, self.rounds, self.top_k, self.u, self.scale, str(self.objective_name), self.layers
        )

    def _fresh(self) -> dict[str, Any]:
        return {
            "format": HEADS_FORMAT,
            "version": _VERSION,
            "model": self.signature,
            "settings": self.settings(),
            "rounds": [],
            "selected": [],
            "evaluations": 0,
            "complete": False,
        }

    def _load(self, path: Path) -> dict[str, Any]:
        diff = resume_conflicts(path, self.settings())
        state = json.loads(path.read_text())
        if state.get("model") != self.signature:
            raise ValueError(
                f"HeadHunter: {path} was searched on another model ({(state.get('model') or {}).get('class')}, "
                f"{len((state.get('model') or {}).get('heads') or ())} layers); use another file or restart"
            )
        if diff:
            raise ValueError(
                f"HeadHunter: {path} was searched with other settings ({', '.join(diff)} differ); use another file, "
                "the same settings, or restart"
            )
        return state

    @staticmethod
    def _save(state: dict[str, Any], path: Path) -> None:
        """Atomic: a crash mid-write leaves the previous file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def total_evaluations(self) -> int:
        n, total = len(self.candidates), 0
        for r in range(self.rounds):
            remaining = n - r * self.top_k
            if remaining <= 0:
                break
            total += remaining
        return total

    # -- search -------------------------------------------------------------------------------------------------
    def score(self, heads: Sequence[tuple[int, int]]) -> float:
        """The objective over the M pairs with SoftPAG on `heads` (applied for these generations only)."""
        handle = apply(self.pipe, SoftPAG(scale=self.scale, u=self.u, heads=tuple(heads)), **self.apply_kwargs)
        guards = _one_call_per_step(handle)
        try:
            outputs = []
            for prompt, seed in self.pairs:
                for g in guards:
                    g.clear()
                outputs.append(self.generate(self.pipe, prompt, seed))
        finally:
            for g in guards:
                g.remove()
            handle.remove()
        value = float(self.objective(outputs, list(self.pairs)))
        if not math.isfinite(value):
            raise ValueError(f"HeadHunter: the objective returned {value} for heads {list(heads)}")
        return value

    def run(
        self,
        path: str | Path | None = None,
        *,
        restart: bool = False,
        max_evaluations: int | None = None,
        max_seconds: float | None = None,
        progress: bool = True,
    ) -> HeadHuntResult:
        """Search (or continue the search saved at `path`) until R rounds are done or a budget ends this call."""
        for name, v in (("max_evaluations", max_evaluations), ("max_seconds", max_seconds)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"HeadHunter.run({name}=...) must be > 0, got {v!r}")
        p = None if path is None else Path(path).expanduser()
        state = self._load(p) if p is not None and p.exists() and not restart else self._fresh()
        from tqdm.auto import tqdm

        total = self.total_evaluations()
        bar = tqdm(total=total, initial=state["evaluations"], disable=not progress, desc="HeadHunter")
        t0, done_here, stopped = time.monotonic(), 0, None
        try:
            while not state["complete"]:
                selected = [tuple(h) for h in state["selected"]]
                if not state["rounds"] or state["rounds"][-1].get("selected") is not None:
                    if len(state["rounds"]) == self.rounds:
                        state["complete"] = True
                        break
                    state["rounds"].append({"scores": {}, "selected": None})
                rnd = state["rounds"][-1]
                todo = [h for h in self.candidates if h not in selected and _key(h) not in rnd["scores"]]
                if not todo and not rnd["scores"]:  # nothing left to choose from
                    state["rounds"].pop()
                    state["complete"] = True
                    break
                for head in todo:
                    if max_evaluations is not None and done_here >= max_evaluations:
                        stopped = "max_evaluations"
                        break
                    if max_seconds is not None and time.monotonic() - t0 >= max_seconds:
                        stopped = "max_seconds"
                        break
                    rnd["scores"][_key(head)] = self.score([*selected, head])
                    state["evaluations"] += 1
                    done_here += 1
                    bar.update(1)
                    if p is not None:
                        self._save(state, p)
                if stopped:
                    break
                ranked = sorted(rnd["scores"].items(), key=lambda kv: (-kv[1], _unkey(kv[0])))
                best = [list(_unkey(k)) for k, _ in ranked[: self.top_k]]
                rnd["selected"] = best
                state["selected"] = [list(h) for h in selected] + best
                state["complete"] = len(state["rounds"]) == self.rounds
                if p is not None:
                    self._save(state, p)
        finally:
            bar.close()
        if p is not None:
            self._save(state, p)
        return HeadHuntResult(
            selected=[tuple(h) for h in state["selected"]],
            rounds=state["rounds"],
            evaluations=state["evaluations"],
            complete=state["complete"],
            path=p,
            stopped=stopped,
        )

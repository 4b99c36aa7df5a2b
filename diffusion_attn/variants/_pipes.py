"""Pipeline helpers of the layout-control variants (Regional, Boundary): check that a pipeline is one whose
encoders the family's adapter drives (`Adapter.pipelines`; the encoding itself is `Adapter.encode_prompt`),
and find a phrase's tokens in a tokenized prompt. Standard diffusers pipeline methods only; nothing is
downloaded."""

from __future__ import annotations

from typing import Any

from .base import adapter_of

__all__ = ["check_pipeline", "phrase_token_indices"]


def check_pipeline(pipe: Any, family: str, who: str) -> None:
    """ValueError unless `pipe` is one of the pipelines whose encoders `family`'s adapter drives
    (`Adapter.pipelines`, `Adapter.encode_prompt`)."""
    if pipe is None:
        raise ValueError(
            f"{who} needs the diffusers pipeline, not a bare model: apply(pipe, {who}(...)) (it encodes prompts "
            "with the pipeline's text encoders and reads its scheduler and VAE scale)"
        )
    names = adapter_of(family).pipelines
    if type(pipe).__name__ not in names:
        raise ValueError(
            f"{who} supports the {family} pipelines {', '.join(names) or '(none)'}; got {type(pipe).__name__}"
        )


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def phrase_token_indices(tokenizer: Any, prompt: str, phrase: str, offset: int, where: str) -> list[int]:
    """Positions of `phrase`'s tokens in the tokenized `prompt` (first occurrence; `offset` = tokens the
    tokenizer puts before the prompt, e.g. CLIP's BOS). ValueError naming `where` when it is absent."""
    p_ids, ph_ids = _tokens(tokenizer, prompt), _tokens(tokenizer, phrase)
    if not ph_ids:
        raise ValueError(f"{where} {phrase!r} has no tokens")
    limit = getattr(tokenizer, "model_max_length", None)
    for i in range(len(p_ids) - len(ph_ids) + 1):
        if p_ids[i : i + len(ph_ids)] == ph_ids:
            idx = list(range(offset + i, offset + i + len(ph_ids)))
            if limit is not None and limit < 10**6 and idx[-1] >= limit:
                raise ValueError(f"{where} {phrase!r} lies beyond the tokenizer's {limit} tokens (truncated)")
            return idx
    raise ValueError(f"{where} {phrase!r} is not in the prompt {prompt!r} (as tokens of the pipeline's tokenizer)")

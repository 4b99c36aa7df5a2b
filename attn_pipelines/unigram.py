"""A small Unigram tokenizer built in code (no vocabulary files, nothing downloaded).

Shared by the tiny pipelines (`attn_pipelines.tiny`) and the world's models (`attn_pipelines.world`): both
build their tokenizers here, so neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["unigram_tokenizer"]

_WORDS = (
    "a an the of in on at with and to from by over under near fox cat dog bird fish horse car boat "
    "tree forest river lake sea ocean mountain snow rain sun moon sky cloud city street night day "
    "red green blue white black golden running flying walking jumping swimming sitting slow fast "
    "camera shot close up wide view cinematic photo portrait painting style high quality detailed "
    "blurry low worst bad ugly"
).split()


def unigram_tokenizer(model_max_length: int, *, bos: bool, words: Sequence[str] | None = None) -> Any:
    """A small Unigram tokenizer (T5-style ids: <pad>=0, </s>=1, <unk>=2) wrapped for transformers.

    `words` become whole-word pieces (default: a generic prompt vocabulary); anything else is
    spelled out in single characters, so no prompt is ever out of vocabulary."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] + (["<s>"] if bos else [])
    vocab = [(t, 0.0) for t in specials]
    vocab += [("\u2581" + w, -2.0) for w in (_WORDS if words is None else words)]
    vocab += [("\u2581", -4.0)]
    vocab += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    eos_id = 1
    if bos:
        bos_id = specials.index("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos_id), ("</s>", eos_id)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
        )
    kw = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        **kw,
    )

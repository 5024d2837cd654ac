"""Small tokenizers trained offline with ``tokenizers`` (no Hub access)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SPECIAL_TOKENS", "train_tokenizer"]

# name -> token; the first four become the tokenizer's pad/bos/eos/unk tokens.
DEFAULT_SPECIAL_TOKENS: Mapping[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
_CORE = ("pad_token", "bos_token", "eos_token", "unk_token")


def train_tokenizer(
    texts: Sequence[str],
    *,
    special_tokens: Mapping[str, str] | None = None,
    extra_special_tokens: Mapping[str, str] | Sequence[str] | None = None,
    vocab_size: int | None = None,
    kind: Literal["wordlevel", "bpe"] = "wordlevel",
    add_bos: bool = True,
):
    """Train a small tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Words are split on whitespace and punctuation (``tokenizers.pre_tokenizers.Whitespace``); the
    special tokens are added first (ids 0, 1, ...) and never split. With ``add_bos`` the tokenizer
    prepends BOS when called with ``add_special_tokens=True`` (as Llama's does) and adds nothing
    otherwise.

    Args:
        texts: training corpus; every word in it gets an id (up to ``vocab_size``).
        special_tokens: the pad/bos/eos/unk tokens by name; defaults to :data:`DEFAULT_SPECIAL_TOKENS`.
        extra_special_tokens: more special tokens: a mapping ``name -> token`` (each name becomes a
            tokenizer attribute, e.g. ``{"image_token": "<image>"}`` gives ``tokenizer.image_token``) or a
            plain list of tokens (chat markers, row/column tags).
        vocab_size: cap on the vocabulary (specials included); ``None`` keeps every word.
        kind: ``"wordlevel"`` (one id per word; decoded with spaces) or ``"bpe"`` (byte-level BPE).
        add_bos: prepend BOS for ``add_special_tokens=True``.

    Returns:
        A ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5) with right padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("train_tokenizer: texts must be a sequence of strings (a corpus), not one string.")
    specials = dict(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    missing = [k for k in specials if k not in _CORE]
    if missing:
        raise ValueError(
            f"train_tokenizer: special_tokens accepts only {_CORE}; put {missing} in extra_special_tokens."
        )
    named_extra: dict[str, str] = {}
    listed_extra: list[str] = []
    if isinstance(extra_special_tokens, Mapping):
        named_extra = dict(extra_special_tokens)
    elif extra_special_tokens is not None:
        listed_extra = list(extra_special_tokens)
    all_special = list(dict.fromkeys([*specials.values(), *named_extra.values(), *listed_extra]))
    if kind not in ("wordlevel", "bpe"):
        raise ValueError(f"train_tokenizer: kind must be 'wordlevel' or 'bpe', got {kind!r}.")
    unk = specials.get("unk_token")
    trainer_kwargs: dict = {"special_tokens": all_special}
    if vocab_size is not None:
        trainer_kwargs["vocab_size"] = int(vocab_size)
    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(**trainer_kwargs)
    else:
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **trainer_kwargs)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = specials.get("bos_token")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    kwargs = dict(specials)
    extras: dict[str, str] | list[str] = named_extra if named_extra else listed_extra
    if named_extra and listed_extra:
        # transformers takes either named or listed extra specials; the listed ones are already in the
        # vocabulary as special added tokens, which is all the models need.
        extras = named_extra
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extras or None, **kwargs)
    fast.padding_side = "right"
    return fast

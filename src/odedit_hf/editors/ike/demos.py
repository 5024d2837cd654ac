"""IKE's texts: the demonstrations built from training records, and the context of an edited fact.

The format is IKE's (Zheng et al. 2023), as EasyEdit's ``ike_main.py`` writes it: every training record
``(src -> alt, rephrase, loc -> loc_ans)`` gives three demonstrations,

- copy: ``"New Fact: {src} {alt}\\nPrompt: {src} {alt}\\n\\n"``,
- update: ``"New Fact: {src} {alt}\\nPrompt: {rephrase} {alt}\\n\\n"``,
- retain: ``"New Fact: {src} {alt}\\nPrompt: {loc} {loc_ans}\\n\\n"``,

and an edited fact ``(p -> t)`` is prepended as its copy demonstration followed by
``"New Fact: {p} {t}\\nPrompt:"``, after which the model's own (wrapped) prompt follows.

The demonstration index (texts and sentence embeddings) is built once per (source, encoder) and kept
for the process; token ids once per tokenizer. The embeddings are also cached on disk (safetensors,
keyed by the SHA-256 of the encoder's name and every text) under ``$ODEDIT_HF_CACHE/ike`` or
``~/.cache/odedit_hf/ike``, so a train split is embedded once per machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_KINDS",
    "DemoIndex",
    "demo_index",
    "demo_texts",
    "embed_cached",
    "fact_context",
    "fact_key",
    "load_demo_records",
]

#: The kinds of demonstration one training record gives, in order.
DEMO_KINDS: tuple[str, ...] = ("copy", "update", "retain")
_RECORD_FIELDS = ("src", "alt", "rephrase", "loc", "loc_ans")
_INDEXES: dict[tuple[Any, ...], DemoIndex] = {}


def fact_key(prompt: str, target: str) -> str:
    """The text an edited fact is retrieved by (its prompt and new target)."""
    return f"{prompt} {target}"


def fact_context(prompt: str, target: str) -> str:
    """The context an edited fact adds before the model's prompt."""
    fact = fact_key(prompt, target)
    return f"New Fact: {fact}\nPrompt: {fact}\n\nNew Fact: {fact}\nPrompt:"


def demo_texts(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(kind, text)`` of the three demonstrations of one training record (see the module docstring)."""
    fact = fact_key(str(record["src"]), str(record["alt"]))
    return [
        ("copy", f"New Fact: {fact}\nPrompt: {fact}\n\n"),
        ("update", f"New Fact: {fact}\nPrompt: {record['rephrase']} {record['alt']}\n\n"),
        ("retain", f"New Fact: {fact}\nPrompt: {record['loc']} {record['loc_ans']}\n\n"),
    ]


def load_demo_records(source: str | Sequence[Any], limit: int | None = None) -> list[dict[str, Any]]:
    """The training records demonstrations are built from.

    Args:
        source: ``"world:PRESET[:SEED[:TASK]]"`` (the embedded world's train split, VQA by default), the
            path of an MMEdit JSON file (a list of records), or the records themselves (mappings or
            :class:`~odedit_hf.data.EditRequest` objects).
        limit: keep the first ``limit`` records.

    Raises:
        ValueError: an unreadable source, or records without ``src``, ``alt``, ``rephrase``, ``loc``,
            ``loc_ans``.
    """
    where = source if isinstance(source, str) else "the given records"
    if isinstance(source, str):
        if source.startswith("world:"):
            parts = source.split(":")
            if len(parts) > 4 or not parts[1] or (len(parts) > 2 and not parts[2].isdigit()):
                raise ValueError(
                    f"IKE demos {source!r}: expected world:PRESET[:SEED[:TASK]], e.g. world:tiny:0"
                )
            task = parts[3] if len(parts) > 3 else "vqa"
            if task not in ("vqa", "caption"):
                raise ValueError(f"IKE demos {source!r}: the task must be vqa or caption, got {task!r}")
            from odedit_hf.data.world import build_world

            world = build_world(parts[1], int(parts[2]) if len(parts) > 2 else 0, progress=False)
            path = world.vqa_train if task == "vqa" else world.caption_train
        else:
            path = source
        if not os.path.isfile(path):
            raise ValueError(f"IKE demos: no file at {path!r}; give an MMEdit train file or world:PRESET")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"IKE demos: {path} is not a readable JSON file ({exc})") from None
        if not isinstance(raw, list):
            raise ValueError(f"IKE demos: {path} must hold a JSON list of MMEdit records")
        records: list[Any] = raw
    else:
        records = list(source)
    out = []
    for i, record in enumerate(records[:limit] if limit is not None else records):
        get = record.get if isinstance(record, Mapping) else lambda name, r=record: getattr(r, name, None)
        values = {name: get(name) for name in _RECORD_FIELDS}
        missing = [n for n, v in values.items() if not isinstance(v, str) or not v.strip()]
        if missing:
            raise ValueError(
                f"IKE demos: record {i} of {where} has no {', '.join(missing)}; give MMEdit records"
            )
        out.append(values)
    if not out:
        raise ValueError(f"IKE demos: {where} holds no record")
    return out


class DemoIndex:
    """The demonstrations of one source under one encoder: texts, kinds, embeddings ``(D, E)``."""

    def __init__(self, texts: list[str], kinds: list[str], embeddings: torch.Tensor) -> None:
        self.texts = texts
        self.kinds = kinds
        self.embeddings = embeddings
        self._ids: dict[tuple[int, frozenset[int]], list[list[int]]] = {}

    def token_ids(self, tokenizer: Any, drop: set[int] | None = None) -> list[list[int]]:
        """Each demonstration's token ids under ``tokenizer`` (no special tokens; ``drop`` ids removed)."""
        key = (id(tokenizer), frozenset(drop or ()))
        if key not in self._ids:
            rows = tokenizer(self.texts, add_special_tokens=False)["input_ids"]
            self._ids[key] = [[int(t) for t in row if drop is None or t not in drop] for row in rows]
        return self._ids[key]


def demo_index(source: str | Sequence[Any], encoder: Any, limit: int | None = None) -> DemoIndex:
    """The :class:`DemoIndex` of ``source`` (see :func:`load_demo_records`) under ``encoder``, built once
    per process for a string source."""
    key = (source, encoder.name, limit) if isinstance(source, str) else None
    if key is not None and key in _INDEXES:
        return _INDEXES[key]
    texts, kinds = [], []
    for record in load_demo_records(source, limit):
        for kind, text in demo_texts(record):
            kinds.append(kind)
            texts.append(text)
    index = DemoIndex(texts, kinds, embed_cached(texts, encoder))
    logger.info(
        "IKE: %d demonstrations from %s", len(texts), source if isinstance(source, str) else "records"
    )
    if key is not None:
        _INDEXES[key] = index
    return index


def _cache_root() -> str:
    root = os.environ.get("ODEDIT_HF_CACHE")
    base = os.path.join(root, "ike") if root else os.path.join("~", ".cache", "odedit_hf", "ike")
    return os.path.abspath(os.path.expanduser(base))


def embed_cached(texts: Sequence[str], encoder: Any) -> torch.Tensor:
    """``encoder.encode(texts)``, read from / written to the on-disk cache (see the module docstring);
    an unreadable cache file is embedded again and replaced (written atomically)."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(f"{encoder.name}\x00{getattr(encoder, 'folder', '')}".encode())
    for text in texts:
        digest.update(b"\x00" + text.encode("utf-8"))
    path = os.path.join(_cache_root(), f"demos-{digest.hexdigest()[:32]}.safetensors")
    if os.path.isfile(path):
        try:
            cached = load_file(path)["embeddings"]
        except Exception as exc:  # noqa: BLE001 - any damage: embed again
            logger.warning("IKE: ignoring the unreadable embedding cache %s (%s)", path, exc)
        else:
            if cached.shape[0] == len(texts):
                return cached
    embeddings = encoder.encode(list(texts)).contiguous()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        save_file({"embeddings": embeddings}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("IKE: could not write the embedding cache %s (%s); continuing without it", path, exc)
    return embeddings

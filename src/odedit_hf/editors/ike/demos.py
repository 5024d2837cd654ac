"""IKE's texts: the demonstrations built from training records, and the context of an edited fact.

The format is IKE's (Zheng et al. 2023), as EasyEdit's ``ike_main.py`` writes it: every training record
``(src -> alt, rephrase, loc -> loc_ans)`` gives three demonstrations,

- copy: ``"New Fact: {src} {alt}\\nPrompt: {src} {alt}\\n\\n"``,
- update: ``"New Fact: {src} {alt}\\nPrompt: {rephrase} {alt}\\n\\n"``,
- retain: ``"New Fact: {src} {alt}\\nPrompt: {loc} {loc_ans}\\n\\n"``,

and an edited fact ``(p -> t)`` is prepended as its copy demonstration followed by
``"New Fact: {p} {t}\\nPrompt:"``, after which the model's own (wrapped) prompt follows.

A training record with an image (``image``, the picture its question is about) gives its three
demonstrations that image: where the backbone takes several images per sample
(``BackboneSpec.accepts_multiple_images``), each demonstration's context starts with the image's
placeholder span as the backbone's processor expands it, and the image's ``pixel_values`` go with it
(:func:`demo_image_inputs`).

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
    "DemoImages",
    "demo_image_inputs",
    "demo_index",
    "demo_texts",
    "embed_cached",
    "fact_context",
    "fact_key",
    "image_span",
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


def load_demo_records(
    source: str | Sequence[Any], limit: int | None = None, image_root: str | None = None
) -> list[dict[str, Any]]:
    """The training records demonstrations are built from.

    Args:
        source: ``"world:PRESET[:SEED[:TASK]]"`` (the embedded world's train split, VQA by default), the
            path of an MMEdit JSON file (a list of records), or the records themselves (mappings or
            :class:`~odedit_hf.data.EditRequest` objects).
        limit: keep the first ``limit`` records.
        image_root: the folder the records' relative ``image`` paths are under (default: the world's
            image folder; for a file, the file's folder or its ``images/`` subfolder, as
            :func:`~odedit_hf.data.load_mmedit` finds it; for records, the paths as given).

    Each returned record has ``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans`` and ``image`` (the
    image's path, joined to the root when relative; ``None`` for a text-only record). The image is not
    read here.

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
            if image_root is None:
                image_root = world.image_root
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
        if image_root is None:
            from odedit_hf.data.loader import default_image_root

            image_root = default_image_root(path, raw)
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
        image = get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(
                f"IKE demos: record {i} of {where} has an image of type {type(image).__name__}; "
                "give its path (a str)"
            )
        if isinstance(image, str) and image.strip():
            image = os.path.join(image_root, image) if image_root and not os.path.isabs(image) else image
            values["image"] = os.path.abspath(image)
        else:
            values["image"] = None
        out.append(values)
    if not out:
        raise ValueError(f"IKE demos: {where} holds no record")
    return out


class DemoIndex:
    """The demonstrations of one source under one encoder: texts, kinds, embeddings ``(D, E)`` and each
    demonstration's image path (its record's ``image``; ``None`` for a text-only record)."""

    def __init__(
        self,
        texts: list[str],
        kinds: list[str],
        embeddings: torch.Tensor,
        images: list[str | None] | None = None,
    ) -> None:
        self.texts = texts
        self.kinds = kinds
        self.embeddings = embeddings
        self.images: list[str | None] = list(images) if images is not None else [None] * len(texts)
        if len(self.images) != len(texts):
            raise ValueError(f"DemoIndex: {len(self.images)} image entries for {len(texts)} demonstrations")
        self._ids: dict[tuple[int, frozenset[int]], list[list[int]]] = {}
        self._image_inputs: dict[int, DemoImages] = {}

    def token_ids(self, tokenizer: Any, drop: set[int] | None = None) -> list[list[int]]:
        """Each demonstration's token ids under ``tokenizer`` (no special tokens; ``drop`` ids removed)."""
        key = (id(tokenizer), frozenset(drop or ()))
        if key not in self._ids:
            rows = tokenizer(self.texts, add_special_tokens=False)["input_ids"]
            self._ids[key] = [[int(t) for t in row if drop is None or t not in drop] for row in rows]
        return self._ids[key]

    def image_inputs(self, backbone: Any) -> DemoImages:
        """:func:`demo_image_inputs` of this index for ``backbone``, computed once per processor."""
        key = id(backbone.processor)
        if key not in self._image_inputs:
            self._image_inputs[key] = demo_image_inputs(self.images, backbone)
        return self._image_inputs[key]


class DemoImages:
    """The demonstrations' images as one backbone takes them.

    Attributes:
        spans: the placeholder token ids of each distinct image (as the processor expands it).
        rows: for each demonstration, its image's index in ``spans`` / ``pixels`` (``-1``: none).
        pixels: ``(N, ...)`` the distinct images' ``pixel_values``, in the vision tower's dtype.
    """

    def __init__(self, spans: list[list[int]], rows: list[int], pixels: torch.Tensor) -> None:
        self.spans = spans
        self.rows = rows
        self.pixels = pixels

    def prefixed(self, ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each demonstration's tokens with its image span in front (text-only ones unchanged)."""
        return [
            [*self.spans[row], *row_ids] if row >= 0 else list(row_ids)
            for row_ids, row in zip(ids, self.rows)
        ]


def image_span(backbone: Any, image: Any) -> tuple[list[int], torch.Tensor]:
    """The token ids of one image's placeholder span (the family's ``image_placeholder`` expanded by the
    backbone's processor, no special tokens) and its ``pixel_values`` ``(1, ...)``.

    Raises:
        ValueError: the family has no placeholder (its processor adds image tokens itself), the span
            holds no image token, or the processor returns image inputs besides ``pixel_values``.
    """
    from odedit_hf.backbones.processing import encode_with_manual_expansion, image_token_str

    model_type = backbone.spec.model_type
    if backbone.spec.image_placeholder is None:
        raise ValueError(
            f"IKE: the {model_type!r} backbone has no image placeholder, so a demonstration cannot carry "
            "its image; use demo_images='off'"
        )
    text = backbone.spec.image_placeholder.format(image_token=image_token_str(backbone))
    extras: dict[str, Any] | None = None
    if not getattr(backbone, "_manual_images", False):
        try:
            out = backbone.processor(
                images=[image], text=[text], add_special_tokens=False, return_tensors="pt"
            )
        except ImportError:  # as Backbone._encode_prompt: a processor whose image part needs torchvision
            extras = None
        else:
            ids = out["input_ids"][0].tolist()
            extras = {
                k: v
                for k, v in out.items()
                if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)
            }
    if extras is None:
        ids, extras = encode_with_manual_expansion(backbone, text, image, add_special_tokens=False)
    if set(extras) != {"pixel_values"} or backbone.image_token_id not in ids:
        raise ValueError(
            f"IKE: the {model_type!r} processor gives an image {sorted(extras)} and span {ids[:8]}...; IKE "
            "carries images whose only input is pixel_values behind an image-token span (LLaVA); use "
            "demo_images='off' for this backbone"
        )
    return [int(t) for t in ids], extras["pixel_values"]


def demo_image_inputs(images: Sequence[str | None], backbone: Any) -> DemoImages:
    """Read and preprocess the distinct images of ``images`` (one path or ``None`` per demonstration)
    for ``backbone`` (see :func:`image_span`).

    Raises:
        ValueError: an image that cannot be read (the message names the file and the fix).
    """
    from odedit_hf.data.images import load_rgb_image

    order: dict[str, int] = {}
    for path in images:
        if path is not None and path not in order:
            order[path] = len(order)
    spans: list[list[int]] = []
    pixels: list[torch.Tensor] = []
    for path in order:
        if not os.path.isfile(path):
            raise ValueError(
                f"IKE demos: image file not found: {path}; give demo_image_root (the folder the "
                "records' image paths are relative to) or demo_images='off'"
            )
        span, values = image_span(backbone, load_rgb_image(path, field="image"))
        spans.append(span)
        pixels.append(values)
    stacked = torch.cat(pixels) if pixels else torch.zeros(0)
    if pixels and backbone.spec.vision_tower is not None:
        stacked = stacked.to(next(backbone.get_module("vision_tower").parameters()).dtype)
    logger.info(
        "IKE: %d distinct demonstration image(s), %d-token span(s)", len(spans), len(spans[0]) if spans else 0
    )
    return DemoImages(spans, [order[p] if p is not None else -1 for p in images], stacked)


def demo_index(
    source: str | Sequence[Any], encoder: Any, limit: int | None = None, image_root: str | None = None
) -> DemoIndex:
    """The :class:`DemoIndex` of ``source`` (see :func:`load_demo_records`) under ``encoder``, built once
    per process for a string source."""
    key = (source, encoder.name, limit, image_root) if isinstance(source, str) else None
    if key is not None and key in _INDEXES:
        return _INDEXES[key]
    texts, kinds, images = [], [], []
    for record in load_demo_records(source, limit, image_root):
        for kind, text in demo_texts(record):
            kinds.append(kind)
            texts.append(text)
            images.append(record["image"])
    index = DemoIndex(texts, kinds, embed_cached(texts, encoder), images)
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

"""Typed records of the data contract: one edit request in, one edit result out.

One spelling per field, everywhere: the MMEdit names (``src``, ``pred``, ``alt``, ``image``,
``rephrase``, ``image_rephrase``, ``loc``, ``loc_ans``, ``m_loc``, ``m_loc_q``, ``m_loc_a``) for
requests, and the metric names of :class:`EditScores` for results.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import DataValidationError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGE_FIELDS",
    "MMEDIT_FIELDS",
    "TASKS",
    "TEXT_FIELDS",
    "EditRequest",
    "EditResult",
    "EditScores",
]

#: The fields of one MMEdit record (EasyEdit's E-VQA / E-IC files), in file order. Every one is a string.
MMEDIT_FIELDS: tuple[str, ...] = (
    "src",
    "pred",
    "alt",
    "image",
    "rephrase",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
#: The fields that hold image paths.
IMAGE_FIELDS: tuple[str, ...] = ("image", "image_rephrase", "m_loc")
#: The fields that hold text.
TEXT_FIELDS: tuple[str, ...] = tuple(f for f in MMEDIT_FIELDS if f not in IMAGE_FIELDS)
#: The tasks an MMEdit file can hold.
TASKS: tuple[str, ...] = ("vqa", "caption")


@dataclass(frozen=True)
class EditRequest:
    """One MMEdit record, validated, with its image paths resolved.

    Args:
        case_id: the record's position in its file's JSON list (0-based); stable under skipping and
            ``limit``, so results can be joined back to the file.
        task: ``"vqa"`` (``src`` is a question) or ``"caption"`` (``src`` is a caption prompt).
        source: the file the record came from (absolute path), or a free label for in-memory requests.
        src: the edit prompt.
        pred: the model's original (wrong) answer.
        alt: the new target answer.
        image: absolute path of the edit image.
        rephrase: a paraphrase of ``src`` (text generality).
        image_rephrase: absolute path of another image of the same thing (multimodal generality).
        loc: an unrelated text-only question (text locality).
        loc_ans: its answer.
        m_loc: absolute path of an unrelated image (multimodal locality).
        m_loc_q: a question about ``m_loc``.
        m_loc_a: its answer.
    """

    case_id: int
    task: Literal["vqa", "caption"]
    source: str
    src: str
    pred: str
    alt: str
    image: str
    rephrase: str
    image_rephrase: str
    loc: str
    loc_ans: str
    m_loc: str
    m_loc_q: str
    m_loc_a: str

    def __post_init__(self) -> None:
        if not isinstance(self.case_id, int) or isinstance(self.case_id, bool):
            raise ValueError(f"EditRequest.case_id must be an int, got {type(self.case_id).__name__}")
        if not isinstance(self.source, str):
            raise ValueError(f"EditRequest.source must be a str, got {type(self.source).__name__}")
        where = {"path": self.source, "index": self.case_id}
        if self.task not in TASKS:
            raise DataValidationError(
                f"task must be one of {TASKS}, got {self.task!r}", field="task", **where
            )
        for name in MMEDIT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DataValidationError(f"must be a non-empty string, got {value!r}", field=name, **where)
        for name in IMAGE_FIELDS:
            if not os.path.isabs(getattr(self, name)):
                raise DataValidationError(
                    f"image path {getattr(self, name)!r} is not absolute",
                    field=name,
                    hint="EditRequest holds resolved paths; build requests with load_mmedit",
                    **where,
                )

    def load_image(self, field: str = "image") -> Image.Image:
        """Read one of the request's images (``"image"``, ``"image_rephrase"`` or ``"m_loc"``) as RGB.

        The file is opened only now, never at load time.

        Raises:
            ValueError: ``field`` is not an image field.
            DataValidationError: the file is missing or unreadable; the message names the file, the
                record and the field.
        """
        from .images import load_rgb_image

        if field not in IMAGE_FIELDS:
            raise ValueError(f"EditRequest.load_image: field must be one of {IMAGE_FIELDS}, got {field!r}")
        return load_rgb_image(getattr(self, field), source=self.source, index=self.case_id, field=field)


def _check_keys(cls: type, data: Mapping[str, Any]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    missing = [n for n in names if n not in data]
    if unknown or missing:
        raise ValueError(
            f"{cls.__name__}.from_dict: unknown keys {unknown}, missing keys {missing}; "
            f"expected exactly {names} (was the file written by another version of odedit-hf?)"
        )


def _as_float(cls_name: str, name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{cls_name}.{name} must be a real number, got {value!r}")
    return float(value)


@dataclass
class EditScores:
    """Scores of one edit (or their mean over edits), each in [0, 1].

    Generality and reliability are token accuracy over the target tokens, with exact match (every
    target token right) beside each. Locality is the agreement of the post-edit model with the
    pre-edit model in two modes, both always reported: ``answer`` (top-1 agreement on the answer
    tokens only) and ``easyedit`` (all positions; top-1 for text, element-wise top-10 for images,
    comparable with published tables). NaN marks a metric that was not computed.

    Args:
        reliability: image + ``src`` -> ``alt``, token accuracy.
        reliability_em: the same, exact match.
        t_generality: image + ``rephrase`` -> ``alt``, token accuracy.
        t_generality_em: the same, exact match.
        m_generality: ``image_rephrase`` + ``src`` -> ``alt``, token accuracy.
        m_generality_em: the same, exact match.
        t_locality: ``loc`` (no image), mode ``answer``.
        m_locality: ``m_loc`` image + ``m_loc_q``, mode ``answer``.
        t_locality_easyedit: ``loc``, mode ``easyedit``.
        m_locality_easyedit: ``m_loc`` + ``m_loc_q``, mode ``easyedit``.
    """

    reliability: float
    reliability_em: float
    t_generality: float
    t_generality_em: float
    m_generality: float
    m_generality_em: float
    t_locality: float
    m_locality: float
    t_locality_easyedit: float
    m_locality_easyedit: float

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _as_float("EditScores", f.name, getattr(self, f.name))
            if not math.isnan(value) and not 0.0 <= value <= 1.0:
                raise ValueError(f"EditScores.{f.name} must lie in [0, 1] (or be NaN), got {value}")
            setattr(self, f.name, value)

    def to_dict(self) -> dict[str, float]:
        """The scores as a plain dict (JSON-ready), keyed by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditScores:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        _check_keys(cls, data)
        return cls(**data)

    @classmethod
    def mean(cls, scores: Sequence[EditScores]) -> EditScores:
        """Field-wise mean over ``scores``.

        Raises:
            ValueError: ``scores`` is empty, holds something other than ``EditScores``, or holds a
                NaN (a metric missing for some edit would silently change what the mean is over).
        """
        scores = list(scores)
        if not scores:
            raise ValueError("EditScores.mean needs at least one EditScores, got an empty sequence")
        for i, s in enumerate(scores):
            if not isinstance(s, EditScores):
                raise ValueError(f"EditScores.mean: item {i} is a {type(s).__name__}, not EditScores")
        out = {}
        for f in dataclasses.fields(cls):
            values = [getattr(s, f.name) for s in scores]
            bad = [i for i, v in enumerate(values) if math.isnan(v)]
            if bad:
                raise ValueError(
                    f"EditScores.mean: field {f.name!r} is NaN in items {bad[:10]}; "
                    "drop those edits or aggregate that field separately"
                )
            out[f.name] = math.fsum(values) / len(values)
        return cls(**out)


@dataclass
class EditResult:
    """The outcome of one edit under one protocol.

    Args:
        case_id: the request's ``case_id``.
        method: the editing method's name, e.g. ``"ft_l"`` or ``"odedit+lora"``.
        protocol: ``"single"``, ``"sequential"`` or ``"batch"``.
        post: scores right after this edit.
        final: scores on the final model (sequential protocol), else ``None``.
        wall_time_s: wall time of the edit, seconds.
        peak_memory_mb: peak accelerator (or process) memory during the edit, MiB.
        steps: optimisation steps taken.
        final_loss: the last training loss, or ``None`` for methods that do not optimise.
    """

    case_id: int
    method: str
    protocol: str
    post: EditScores
    final: EditScores | None
    wall_time_s: float
    peak_memory_mb: float
    steps: int
    final_loss: float | None

    def __post_init__(self) -> None:
        for name in ("case_id", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"EditResult.{name} must be a non-negative int, got {value!r}")
            setattr(self, name, int(value))
        for name in ("method", "protocol"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"EditResult.{name} must be a non-empty str, got {value!r}")
        if not isinstance(self.post, EditScores):
            raise ValueError(f"EditResult.post must be EditScores, got {type(self.post).__name__}")
        if self.final is not None and not isinstance(self.final, EditScores):
            raise ValueError(f"EditResult.final must be EditScores or None, got {type(self.final).__name__}")
        for name in ("wall_time_s", "peak_memory_mb"):
            value = _as_float("EditResult", name, getattr(self, name))
            if not value >= 0.0:  # also rejects NaN
                raise ValueError(f"EditResult.{name} must be >= 0, got {value}")
            setattr(self, name, value)
        self.final_loss = _as_float("EditResult", "final_loss", self.final_loss, allow_none=True)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict; ``post`` and ``final`` become nested dicts (or ``None``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["post"] = self.post.to_dict()
        out["final"] = None if self.final is None else self.final.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditResult:
        """Inverse of :meth:`to_dict`; unknown or missing keys (here or in the scores) raise ``ValueError``."""
        _check_keys(cls, data)
        kwargs = dict(data)
        kwargs["post"] = EditScores.from_dict(data["post"])
        kwargs["final"] = None if data["final"] is None else EditScores.from_dict(data["final"])
        return cls(**kwargs)

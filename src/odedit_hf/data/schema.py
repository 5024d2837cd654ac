"""Typed records of the data contract: one edit request in, one edit result out.

One spelling per field, everywhere: the MMEdit names (``src``, ``pred``, ``alt``, ``image``,
``rephrase``, ``image_rephrase``, ``loc``, ``loc_ans``, ``m_loc``, ``m_loc_q``, ``m_loc_a``) for
requests, and the metric names of :class:`EditScores` for results.

Beside the eleven, a request may carry optional *probes* (:data:`PROBE_FIELDS`): portability probes, a
hard-negative text and multimodal locality sample, and a knowledge unit (several text and image
rephrases). A record without them is a plain MMEdit record; the scores of a probe it lacks are absent
(NaN in :class:`EditScores`, left out of its ``to_dict``), never zero.
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
    "MULTIMODAL_FIELDS",
    "MULTIMODAL_SCORE_FIELDS",
    "OPTIONAL_SCORE_FIELDS",
    "REQUIRED_TEXT_FIELDS",
    "PROBE_FIELDS",
    "TASKS",
    "TEXT_FIELDS",
    "EditRequest",
    "EditResult",
    "EditScores",
    "PortabilityProbe",
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
#: The fields a text-only request (ZsRE / CounterFact layouts) leaves out: all of them or none of them.
MULTIMODAL_FIELDS: tuple[str, ...] = ("image", "image_rephrase", "m_loc", "m_loc_q", "m_loc_a")
#: The fields every request has, text-only or multimodal.
REQUIRED_TEXT_FIELDS: tuple[str, ...] = tuple(f for f in MMEDIT_FIELDS if f not in MULTIMODAL_FIELDS)
#: The tasks an MMEdit file can hold.
TASKS: tuple[str, ...] = ("vqa", "caption")
#: Optional probe fields a record (and an :class:`EditRequest`) may carry beside the eleven, in file order.
#: ``hard_loc``/``hard_loc_ans`` and ``hard_m_loc``/``hard_m_loc_q``/``hard_m_loc_a`` come as groups.
PROBE_FIELDS: tuple[str, ...] = (
    "portability",
    "hard_loc",
    "hard_loc_ans",
    "hard_m_loc",
    "hard_m_loc_q",
    "hard_m_loc_a",
    "rephrases",
    "image_rephrases",
)
_HARD_GROUPS: tuple[tuple[str, ...], ...] = (
    ("hard_loc", "hard_loc_ans"),
    ("hard_m_loc", "hard_m_loc_q", "hard_m_loc_a"),
)


@dataclass(frozen=True)
class PortabilityProbe:
    """One portability probe: does the edit reach a question it should change?

    Args:
        prompt: the question (or caption prompt).
        target: the answer after the edit (KnowEdit's ``ground_truth``).
        image: absolute path of the image it is asked on, or ``None`` for a text-only question.
        kind: its category (e.g. ``"by_name"``, ``"one_hop"``, KnowEdit's ``"Reasoning"``, VLKEB's
            ``"1-hop"``).
    """

    prompt: str
    target: str
    image: str | None = None
    kind: str = "portability"

    @property
    def task(self) -> Literal["vqa", "caption"]:
        """``"vqa"`` for a question (ends with ``?``), else ``"caption"`` (a caption or cloze prompt)."""
        return "vqa" if self.prompt.rstrip().endswith("?") else "caption"


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """One edit record, validated, with its image paths resolved: multimodal (MMEdit) or text-only.

    A *text-only* request (ZsRE / CounterFact records, :func:`~odedit_hf.data.load_text_edits`) leaves
    the five multimodal fields (:data:`MULTIMODAL_FIELDS`: ``image``, ``image_rephrase``, ``m_loc``,
    ``m_loc_q``, ``m_loc_a``) ``None``; they are absent together or present together. Its multimodal
    scores (M-Generality, M-Locality) are then absent, never zero. The constructor takes keywords only.

    Args:
        case_id: the record's position in its file's JSON list (0-based); stable under skipping and
            ``limit``, so results can be joined back to the file.
        task: ``"vqa"`` (``src`` is a question) or ``"caption"`` (``src`` is a caption prompt).
        source: the file the record came from (absolute path), or a free label for in-memory requests.
        src: the edit prompt.
        pred: the model's original (wrong) answer.
        alt: the new target answer.
        image: absolute path of the edit image (``None``: a text-only request).
        rephrase: a paraphrase of ``src`` (text generality).
        image_rephrase: absolute path of another image of the same thing (multimodal generality;
            ``None`` for a text-only request).
        loc: an unrelated text-only question (text locality).
        loc_ans: its answer.
        m_loc: absolute path of an unrelated image (multimodal locality; ``None`` for text-only).
        m_loc_q: a question about ``m_loc`` (``None`` for text-only).
        m_loc_a: its answer (``None`` for text-only).
        subject: optional, the entity the edit is about, as it occurs in ``src`` (ZsRE / CounterFact's
            ``subject``; ROME-style editors locate it), or ``None``.
        portability: optional portability probes (:class:`PortabilityProbe`; mappings with the same keys
            are accepted and converted).
        hard_loc, hard_loc_ans: optional hard-negative text locality: a question about an entity that
            looks like the edited one (same relation where possible), and its answer.
        hard_m_loc, hard_m_loc_q, hard_m_loc_a: optional hard-negative multimodal locality: absolute path
            of a look-alike's image, a question about it and its answer.
        rephrases: optional knowledge unit, text side: paraphrases of ``src`` (``rephrase`` may be among them).
        image_rephrases: optional knowledge unit, image side: absolute paths of other images of the same
            thing (``image_rephrase`` may be among them).
    """

    case_id: int
    task: Literal["vqa", "caption"]
    source: str
    src: str
    pred: str
    alt: str
    image: str | None = None
    rephrase: str
    image_rephrase: str | None = None
    loc: str
    loc_ans: str
    m_loc: str | None = None
    m_loc_q: str | None = None
    m_loc_a: str | None = None
    subject: str | None = None
    portability: tuple[PortabilityProbe, ...] = ()
    hard_loc: str | None = None
    hard_loc_ans: str | None = None
    hard_m_loc: str | None = None
    hard_m_loc_q: str | None = None
    hard_m_loc_a: str | None = None
    rephrases: tuple[str, ...] = ()
    image_rephrases: tuple[str, ...] = ()

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
        absent = [name for name in MULTIMODAL_FIELDS if getattr(self, name) is None]
        if absent and len(absent) < len(MULTIMODAL_FIELDS):
            present = [name for name in MULTIMODAL_FIELDS if name not in absent]
            raise DataValidationError(
                f"the multimodal fields come together: {present} given but {absent} missing",
                field=absent[0],
                hint=f"give all of {list(MULTIMODAL_FIELDS)} (a multimodal record) or none of them "
                "(a text-only record)",
                **where,
            )
        for name in MMEDIT_FIELDS:
            value = getattr(self, name)
            if value is None and name in absent:
                continue
            if not isinstance(value, str) or not value.strip():
                raise DataValidationError(f"must be a non-empty string, got {value!r}", field=name, **where)
        if self.subject is not None and (not isinstance(self.subject, str) or not self.subject.strip()):
            raise DataValidationError(
                f"must be a non-empty string or None, got {self.subject!r}", field="subject", **where
            )
        for name in IMAGE_FIELDS:
            if getattr(self, name) is None:
                continue
            if not os.path.isabs(getattr(self, name)):
                raise DataValidationError(
                    f"image path {getattr(self, name)!r} is not absolute",
                    field=name,
                    hint="EditRequest holds resolved paths; build requests with load_mmedit",
                    **where,
                )
        self._check_probes(where)

    def _check_probes(self, where: dict[str, Any]) -> None:
        def absolute(path: Any, name: str) -> None:
            if not isinstance(path, str) or not os.path.isabs(path):
                raise DataValidationError(
                    f"image path {path!r} is not absolute",
                    field=name,
                    hint="EditRequest holds resolved paths; build requests with load_mmedit",
                    **where,
                )

        def text(value: Any, name: str) -> None:
            if not isinstance(value, str) or not value.strip():
                raise DataValidationError(f"must be a non-empty string, got {value!r}", field=name, **where)

        probes = []
        for i, probe in enumerate(_as_tuple(self.portability, "portability", where)):
            if isinstance(probe, Mapping):
                unknown = sorted(set(probe) - {"prompt", "target", "image", "kind"})
                if unknown:
                    raise DataValidationError(
                        f"portability probe {i} has unknown keys {unknown}",
                        field="portability",
                        hint="a probe has prompt, target, image (or None) and kind",
                        **where,
                    )
                probe = PortabilityProbe(**probe)
            if not isinstance(probe, PortabilityProbe):
                raise DataValidationError(
                    f"portability probe {i} is a {type(probe).__name__}, not a PortabilityProbe",
                    field="portability",
                    **where,
                )
            text(probe.prompt, f"portability[{i}].prompt")
            text(probe.target, f"portability[{i}].target")
            text(probe.kind, f"portability[{i}].kind")
            if probe.image is not None:
                absolute(probe.image, f"portability[{i}].image")
            probes.append(probe)
        object.__setattr__(self, "portability", tuple(probes))
        for group in _HARD_GROUPS:
            present = [getattr(self, name) is not None for name in group]
            if any(present) and not all(present):
                missing = [n for n, p in zip(group, present) if not p]
                raise DataValidationError(
                    f"{', '.join(group)} come together; {missing} missing",
                    field=missing[0],
                    hint="give the whole group or none of it",
                    **where,
                )
            if all(present):
                for name in group:
                    text(getattr(self, name), name)
        if self.hard_m_loc is not None:
            absolute(self.hard_m_loc, "hard_m_loc")
        rephrases = _as_tuple(self.rephrases, "rephrases", where)
        for i, value in enumerate(rephrases):
            text(value, f"rephrases[{i}]")
        object.__setattr__(self, "rephrases", rephrases)
        image_rephrases = _as_tuple(self.image_rephrases, "image_rephrases", where)
        for i, value in enumerate(image_rephrases):
            absolute(value, f"image_rephrases[{i}]")
        object.__setattr__(self, "image_rephrases", image_rephrases)

    @property
    def text_only(self) -> bool:
        """Whether the request has no image (a ZsRE / CounterFact record): no multimodal scores."""
        return self.image is None

    @property
    def has_hard_t_locality(self) -> bool:
        """Whether the request carries a hard-negative text-locality sample."""
        return self.hard_loc is not None

    @property
    def has_hard_m_locality(self) -> bool:
        """Whether the request carries a hard-negative multimodal-locality sample."""
        return self.hard_m_loc is not None

    @property
    def has_unit(self) -> bool:
        """Whether the request carries a knowledge unit (``rephrases`` or ``image_rephrases``)."""
        return bool(self.rephrases or self.image_rephrases)

    def load_image(self, field: str = "image") -> Image.Image:
        """Read one of the request's images (``"image"``, ``"image_rephrase"``, ``"m_loc"`` or, when the
        request has it, ``"hard_m_loc"``) as RGB.

        The file is opened only now, never at load time.

        Raises:
            ValueError: ``field`` is not an image field, or ``"hard_m_loc"`` on a request without it.
            DataValidationError: the file is missing or unreadable; the message names the file, the
                record and the field.
        """
        from .images import load_rgb_image

        if field not in (*IMAGE_FIELDS, "hard_m_loc"):
            raise ValueError(
                f"EditRequest.load_image: field must be one of {(*IMAGE_FIELDS, 'hard_m_loc')}, got {field!r}"
            )
        if getattr(self, field) is None:
            raise ValueError(f"EditRequest.load_image: case {self.case_id} has no {field!r} image")
        return load_rgb_image(getattr(self, field), source=self.source, index=self.case_id, field=field)


def _as_tuple(value: Any, name: str, where: dict[str, Any]) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise DataValidationError(
            f"must be a list or tuple, got a {type(value).__name__}", field=name, **where
        )
    return tuple(value)


def _check_keys(cls: type, data: Mapping[str, Any], optional: Sequence[str] = ()) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    missing = [n for n in names if n not in data and n not in optional]
    if unknown or missing:
        required = [n for n in names if n not in optional]
        extra = f" and optionally {list(optional)}" if optional else ""
        raise ValueError(
            f"{cls.__name__}.from_dict: unknown keys {unknown}, missing keys {missing}; "
            f"expected {required}{extra} (was the file written by another version of odedit-hf?)"
        )


def _as_float(cls_name: str, name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{cls_name}.{name} must be a real number, got {value!r}")
    return float(value)


#: The optional scores of :class:`EditScores`: computed only where the request carries the probe, NaN
#: (absent) otherwise.
OPTIONAL_SCORE_FIELDS: tuple[str, ...] = (
    "portability",
    "portability_em",
    "hard_t_locality",
    "hard_m_locality",
    "hard_t_locality_easyedit",
    "hard_m_locality_easyedit",
    "unit_generality",
    "unit_consistency",
)


#: The multimodal scores of :class:`EditScores`: NaN (absent) for a text-only request, which has no image.
MULTIMODAL_SCORE_FIELDS: tuple[str, ...] = (
    "m_generality",
    "m_generality_em",
    "m_locality",
    "m_locality_easyedit",
)
#: The scores every request has, text-only or multimodal.
_ALWAYS = (
    "reliability",
    "reliability_em",
    "t_generality",
    "t_generality_em",
    "t_locality",
    "t_locality_easyedit",
)


@dataclass(eq=False)
class EditScores:
    """Scores of one edit (or their mean over edits), each in [0, 1].

    Generality and reliability are token accuracy over the target tokens, with exact match (every
    target token right) beside each. Locality is the agreement of the post-edit model with the
    pre-edit model in two modes, both always reported: ``answer`` (top-1 agreement on the answer
    tokens only) and ``easyedit`` (all positions; top-1 for text, element-wise top-10 for images,
    comparable with published tables). NaN marks a metric that was not computed.

    The first ten fields are always computed for a multimodal request; a text-only request has no image,
    so its four multimodal scores (:data:`MULTIMODAL_SCORE_FIELDS`) are NaN = absent. The last eight
    (:data:`OPTIONAL_SCORE_FIELDS`) exist only when the request carries the probe; they default to NaN =
    absent. :meth:`to_dict` leaves absent scores out and :meth:`mean` averages a multimodal or optional
    score over the edits that have it.

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
        portability: portability probes -> their targets, token accuracy (mean over the request's probes).
        portability_em: the same, exact match.
        hard_t_locality: ``hard_loc`` (no image), mode ``answer``.
        hard_m_locality: ``hard_m_loc`` image + ``hard_m_loc_q``, mode ``answer``.
        hard_t_locality_easyedit: ``hard_loc``, mode ``easyedit`` (top-1).
        hard_m_locality_easyedit: ``hard_m_loc`` + ``hard_m_loc_q``, mode ``easyedit`` (top-10).
        unit_generality: the knowledge unit's members -> ``alt``, token accuracy (mean over the members:
            image + each of ``rephrases``, each of ``image_rephrases`` + ``src``).
        unit_consistency: 1.0 when every member of the unit is exactly right, else 0.0.
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
    portability: float = math.nan
    portability_em: float = math.nan
    hard_t_locality: float = math.nan
    hard_m_locality: float = math.nan
    hard_t_locality_easyedit: float = math.nan
    hard_m_locality_easyedit: float = math.nan
    unit_generality: float = math.nan
    unit_consistency: float = math.nan

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _as_float("EditScores", f.name, getattr(self, f.name))
            if not math.isnan(value) and not 0.0 <= value <= 1.0:
                raise ValueError(f"EditScores.{f.name} must lie in [0, 1] (or be NaN), got {value}")
            setattr(self, f.name, value)

    def __eq__(self, other: object) -> bool:
        # by value, an absent optional score equal to an absent one (NaN != NaN would make it unequal)
        if not isinstance(other, EditScores):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, like the dataclass it replaces

    def present(self) -> tuple[str, ...]:
        """The optional fields this instance holds (not NaN)."""
        return tuple(n for n in OPTIONAL_SCORE_FIELDS if not math.isnan(getattr(self, n)))

    @property
    def has_multimodal(self) -> bool:
        """Whether the multimodal scores are present (False for a text-only request's scores)."""
        return not any(math.isnan(getattr(self, n)) for n in MULTIMODAL_SCORE_FIELDS)

    def to_dict(self) -> dict[str, float]:
        """The scores as a plain dict (JSON-ready), keyed by field name; absent scores (the optional ones a
        request has no probe for, the multimodal ones of a text-only request) left out."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in _ALWAYS or not math.isnan(getattr(self, f.name))
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditScores:
        """Inverse of :meth:`to_dict`; unknown keys or missing required keys raise ``ValueError``."""
        _check_keys(cls, data, optional=(*MULTIMODAL_SCORE_FIELDS, *OPTIONAL_SCORE_FIELDS))
        present = [n for n in MULTIMODAL_SCORE_FIELDS if n in data]
        if present and len(present) < len(MULTIMODAL_SCORE_FIELDS):
            raise ValueError(
                f"EditScores.from_dict: missing keys {[n for n in MULTIMODAL_SCORE_FIELDS if n not in data]}; "
                f"the multimodal scores come together (all of {list(MULTIMODAL_SCORE_FIELDS)}, or none for a "
                "text-only edit)"
            )
        return cls(**{**dict.fromkeys(MULTIMODAL_SCORE_FIELDS, math.nan), **data})

    @classmethod
    def mean(cls, scores: Sequence[EditScores]) -> EditScores:
        """Field-wise mean over ``scores``.

        The six text fields must be present in every item; a multimodal field (absent for text-only
        requests) or an optional field is the mean over the items that hold it (absent if none does) —
        :meth:`counts` says over how many.

        Raises:
            ValueError: ``scores`` is empty, holds something other than ``EditScores``, or holds a
                NaN in a required field (a metric missing for some edit would silently change what the
                mean is over).
        """
        scores = _check_scores(cls, scores)
        # the multimodal group is whole (a multimodal edit) or absent (a text-only edit), never partial
        partial = [
            i
            for i, s in enumerate(scores)
            if 0
            < sum(math.isnan(getattr(s, n)) for n in MULTIMODAL_SCORE_FIELDS)
            < len(MULTIMODAL_SCORE_FIELDS)
        ]
        out = {}
        for f in dataclasses.fields(cls):
            values = [getattr(s, f.name) for s in scores]
            bad = [i for i, v in enumerate(values) if math.isnan(v)]
            if f.name in MULTIMODAL_SCORE_FIELDS and any(i in partial for i in bad):
                raise ValueError(
                    f"EditScores.mean: field {f.name!r} is NaN in items {[i for i in bad if i in partial][:10]} "
                    "whose other multimodal scores are present; drop those edits or aggregate that field separately"
                )
            if f.name not in _ALWAYS:
                values = [v for v in values if not math.isnan(v)]
                out[f.name] = math.fsum(values) / len(values) if values else math.nan
                continue
            if bad:
                raise ValueError(
                    f"EditScores.mean: field {f.name!r} is NaN in items {bad[:10]}; "
                    "drop those edits or aggregate that field separately"
                )
            out[f.name] = math.fsum(values) / len(values)
        return cls(**out)

    @classmethod
    def counts(cls, scores: Sequence[EditScores]) -> dict[str, int]:
        """How many of ``scores`` hold each optional field present in at least one of them (and each
        multimodal field, when some but not all of them hold it: a mix of text-only and multimodal edits)."""
        scores = _check_scores(cls, scores)
        out = {n: sum(not math.isnan(getattr(s, n)) for s in scores) for n in OPTIONAL_SCORE_FIELDS}
        for n in MULTIMODAL_SCORE_FIELDS:
            held = sum(not math.isnan(getattr(s, n)) for s in scores)
            if 0 < held < len(scores):
                out[n] = held
        return {n: c for n, c in out.items() if c}


def _check_scores(cls: type, scores: Sequence[Any]) -> list[EditScores]:
    scores = list(scores)
    if not scores:
        raise ValueError(f"{cls.__name__}.mean needs at least one EditScores, got an empty sequence")
    for i, s in enumerate(scores):
        if not isinstance(s, EditScores):
            raise ValueError(f"{cls.__name__}.mean: item {i} is a {type(s).__name__}, not EditScores")
    return scores


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

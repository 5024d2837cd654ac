"""Load and validate text-only edit files (ZsRE and CounterFact, as EasyEdit's text editors read them).

Two layouts, each one JSON list of records; every record becomes a text-only
:class:`~odedit_hf.data.EditRequest` (its image fields ``None``, so its multimodal scores are absent):

* ``"zsre"`` — EasyEdit's flat text layout (its ZsRE and ``counterfact-edit`` files, and the
  real-knowledge benchmark of :func:`~odedit_hf.data.facts.build_fact_benchmark`)::

      {"prompt": "The capital of France is", "target_new": "Thimphu", "ground_truth": "Paris",
       "rephrase_prompt": "The capital city of France is",
       "locality_prompt": "The currency of Norway is the", "locality_ground_truth": "krone",
       "subject": "France"}

  ``subject`` is optional. ``ground_truth``, ``rephrase_prompt`` and ``locality_ground_truth`` may be
  lists (KnowEdit stores aliases / several rephrases): the first string is used. ``case_id`` is
  ignored silently (``EditRequest.case_id`` is the record's index in the file).
* ``"counterfact"`` — ROME's CounterFact file::

      {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle
       Darrieux", "target_new": {"str": "English"}, "target_true": {"str": "French"}},
       "paraphrase_prompts": ["...", "..."], "neighborhood_prompts": ["...", "..."], ...}

  The edit prompt is ``requested_rewrite.prompt`` with ``{}`` replaced by the subject; the rephrase is
  the first paraphrase prompt; locality is the first neighbourhood prompt, whose answer is the *true*
  target (neighbourhood subjects share it), or the item's own ``target`` when it is an object
  ``{"prompt", "target"}``. ``case_id``, ``pararel_idx``, ``attribute_prompts``,
  ``generation_prompts`` and the ``id`` / ``relation_id`` keys are ignored silently.

EasyEdit's ZsRE file in MEND's layout (``src``, ``pred``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``)
uses the MMEdit names without the image fields: :func:`~odedit_hf.data.load_mmedit` reads it, and
:func:`load_edits` picks the right loader for any of these files.

Any other key is ignored with one warning per file naming the keys (``strict_fields=True`` makes them an
error). Prompts are fed to the model as they are (``task="caption"``: no ``Question: ... Short
answer:`` wrapping on raw-prompt models, as EasyEdit does); ``task="vqa"`` wraps them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from .errors import DataValidationError
from .loader import (
    ExtraFields,
    MMEditDataset,
    _to_hf_dataset,
    check_load_arguments,
    load_mmedit,
    log_skipped,
    read_records,
)

__all__ = [
    "COUNTERFACT_FIELDS",
    "TEXT_LAYOUTS",
    "ZSRE_FIELDS",
    "detect_layout",
    "load_edits",
    "load_text_edits",
]

logger = logging.getLogger(__name__)

#: The layouts :func:`load_text_edits` reads.
TEXT_LAYOUTS: tuple[str, ...] = ("zsre", "counterfact")
#: The fields of a ``"zsre"`` record (``subject`` optional).
ZSRE_FIELDS: tuple[str, ...] = (
    "prompt",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)
_ZSRE_OPTIONAL = ("subject",)
_ZSRE_IGNORED = ("case_id",)
#: The top-level fields of a ``"counterfact"`` record.
COUNTERFACT_FIELDS: tuple[str, ...] = ("requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")
_COUNTERFACT_IGNORED = ("case_id", "pararel_idx", "attribute_prompts", "generation_prompts")
_REWRITE_FIELDS = ("prompt", "subject", "target_new", "target_true")
_REWRITE_IGNORED = ("relation_id",)

_ZSRE_HINT = (
    f"a ZsRE record has the string fields {list(ZSRE_FIELDS)} and optionally 'subject' "
    "(EasyEdit's text layout)"
)
_CF_HINT = (
    'a CounterFact record is {"requested_rewrite": {"prompt": "... {} ...", "subject": ..., '
    '"target_new": {"str": ...}, "target_true": {"str": ...}}, "paraphrase_prompts": [...], '
    '"neighborhood_prompts": [...]}'
)


def _text(value: Any, field: str, where: dict[str, Any], hint: str, *, first: bool = False) -> str:
    """A non-empty string; with ``first``, the first string of a (nested) list is taken."""
    shown = value
    if first:
        while isinstance(value, list) and value:
            value = value[0]
    if isinstance(value, list):
        raise DataValidationError("empty list", field=field, hint=hint, **where)
    if not isinstance(value, str):
        raise DataValidationError(
            f"expected a string, got a JSON {type(shown).__name__} ({shown!r})",
            field=field,
            hint=hint,
            **where,
        )
    if not value.strip():
        raise DataValidationError(f"empty value {value!r}", field=field, hint=hint, **where)
    return value


def _object(value: Any, field: str, where: dict[str, Any], hint: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataValidationError(
            f"expected an object, got a JSON {type(value).__name__} ({value!r})",
            field=field,
            hint=hint,
            **where,
        )
    return value


def _missing(
    record: dict[str, Any], names: Sequence[str], where: dict[str, Any], hint: str, prefix: str = ""
):
    missing = [n for n in names if n not in record]
    if missing:
        raise DataValidationError(
            f"missing fields {[prefix + n for n in missing]}", field=prefix + missing[0], hint=hint, **where
        )


def _row(index: int, src: str, pred: str, alt: str, rephrase: str, loc: str, loc_ans: str, subject: Any):
    row: dict[str, Any] = {
        "case_id": index,
        "src": src,
        "pred": pred,
        "alt": alt,
        "image": None,
        "rephrase": rephrase,
        "image_rephrase": None,
        "loc": loc,
        "loc_ans": loc_ans,
        "m_loc": None,
        "m_loc_q": None,
        "m_loc_a": None,
    }
    if subject is not None:
        row["subject"] = subject
    return row


def _zsre_row(record: Any, index: int, source: str, extra: ExtraFields) -> dict[str, Any]:
    where = {"path": source, "index": index}
    if not isinstance(record, dict):
        raise DataValidationError(
            f"record is a JSON {type(record).__name__}, not an object", hint=_ZSRE_HINT, **where
        )
    _missing(record, ZSRE_FIELDS, where, _ZSRE_HINT)
    extra.check([k for k in record if k not in (*ZSRE_FIELDS, *_ZSRE_OPTIONAL, *_ZSRE_IGNORED)], where)
    lists = ("ground_truth", "rephrase_prompt", "locality_ground_truth")
    values = {name: _text(record[name], name, where, _ZSRE_HINT, first=name in lists) for name in ZSRE_FIELDS}
    subject = _text(record["subject"], "subject", where, _ZSRE_HINT) if "subject" in record else None
    return _row(
        index,
        src=values["prompt"],
        pred=values["ground_truth"],
        alt=values["target_new"],
        rephrase=values["rephrase_prompt"],
        loc=values["locality_prompt"],
        loc_ans=values["locality_ground_truth"],
        subject=subject,
    )


def _counterfact_row(record: Any, index: int, source: str, extra: ExtraFields) -> dict[str, Any]:
    where = {"path": source, "index": index}
    if not isinstance(record, dict):
        raise DataValidationError(
            f"record is a JSON {type(record).__name__}, not an object", hint=_CF_HINT, **where
        )
    _missing(record, COUNTERFACT_FIELDS, where, _CF_HINT)
    unknown = [k for k in record if k not in (*COUNTERFACT_FIELDS, *_COUNTERFACT_IGNORED)]
    rewrite = _object(record["requested_rewrite"], "requested_rewrite", where, _CF_HINT)
    _missing(rewrite, _REWRITE_FIELDS, where, _CF_HINT, prefix="requested_rewrite.")
    unknown += [f"requested_rewrite.{k}" for k in rewrite if k not in (*_REWRITE_FIELDS, *_REWRITE_IGNORED)]
    extra.check(unknown, where)
    subject = _text(rewrite["subject"], "requested_rewrite.subject", where, _CF_HINT)
    template = _text(rewrite["prompt"], "requested_rewrite.prompt", where, _CF_HINT)
    if template.count("{}") != 1:
        raise DataValidationError(
            f"the prompt {template!r} must hold exactly one '{{}}' (where the subject goes)",
            field="requested_rewrite.prompt",
            hint=_CF_HINT,
            **where,
        )
    targets = {}
    for name in ("target_new", "target_true"):
        field = f"requested_rewrite.{name}"
        value = _object(rewrite[name], field, where, _CF_HINT)
        if "str" not in value:
            raise DataValidationError(
                f"missing key 'str' in {value!r}", field=f"{field}.str", hint=_CF_HINT, **where
            )
        targets[name] = _text(value["str"], f"{field}.str", where, _CF_HINT)

    def first(name: str) -> Any:
        value = record[name]
        if not isinstance(value, list) or not value:
            raise DataValidationError(
                f"expected a non-empty list, got {value!r}", field=name, hint=_CF_HINT, **where
            )
        return value[0]

    rephrase = _text(first("paraphrase_prompts"), "paraphrase_prompts[0]", where, _CF_HINT)
    neighbour = first("neighborhood_prompts")
    loc_ans = targets["target_true"]
    if isinstance(neighbour, dict):
        _missing(neighbour, ("prompt", "target"), where, _CF_HINT, prefix="neighborhood_prompts[0].")
        loc_ans = _text(neighbour["target"], "neighborhood_prompts[0].target", where, _CF_HINT)
        neighbour = neighbour["prompt"]
    loc = _text(neighbour, "neighborhood_prompts[0]", where, _CF_HINT)
    return _row(
        index,
        src=template.replace("{}", subject),
        pred=targets["target_true"],
        alt=targets["target_new"],
        rephrase=rephrase,
        loc=loc,
        loc_ans=loc_ans,
        subject=subject,
    )


def detect_layout(records: Sequence[Any]) -> str:
    """``"counterfact"``, ``"zsre"`` or ``"mmedit"``, from the first record that is a JSON object (its keys
    decide: ``requested_rewrite`` -> CounterFact, ``prompt`` + ``target_new`` -> ZsRE, else MMEdit)."""
    first = next((r for r in records if isinstance(r, dict)), None)
    if first is None:
        return "mmedit"
    if "requested_rewrite" in first:
        return "counterfact"
    if "target_new" in first or ("prompt" in first and "src" not in first):
        return "zsre"
    return "mmedit"


def load_text_edits(
    path: str | os.PathLike[str],
    *,
    layout: str = "auto",
    task: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    strict_fields: bool = False,
) -> MMEditDataset:
    """Load and validate a ZsRE or CounterFact file (see the module docstring) as text-only requests.

    Args:
        path: one JSON list of records.
        layout: ``"zsre"``, ``"counterfact"`` or ``"auto"`` (by the first record's keys, :func:`detect_layout`).
        task: ``"caption"`` (the prompt as is) or ``"vqa"`` (``Question: ... Short answer:`` on raw-prompt
            models); ``"auto"`` is ``"caption"``, the way EasyEdit's text editors feed prompts.
        skip_invalid: skip invalid records (counted in ``dataset.skipped``, reasons in
            ``dataset.skip_reasons``) instead of raising; whole-file errors always raise.
        limit: keep at most this many valid records, the first in file order.
        strict_fields: unknown keys are an error naming the record (default: one warning listing them).

    Returns:
        An :class:`~odedit_hf.data.MMEditDataset` of text-only requests (``image_root`` ``None``);
        ``case_id`` is the record's index in the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: the file or a record is invalid; the message names the file, the record
            index, the field (dotted for nested ones, e.g. ``requested_rewrite.target_new.str``) and what
            to do.
        ValueError: a bad argument.
    """
    check_load_arguments("load_text_edits", task, skip_invalid, limit, strict_fields)
    if layout not in ("auto", *TEXT_LAYOUTS):
        raise ValueError(f"load_text_edits: layout must be 'auto', 'zsre' or 'counterfact', got {layout!r}")
    source = os.path.abspath(os.fspath(path))
    records = read_records(source, what="ZsRE / CounterFact")
    if layout == "auto":
        layout = detect_layout(records)
        if layout == "mmedit":
            raise DataValidationError(
                "neither a ZsRE record (prompt, target_new, ...) nor a CounterFact record (requested_rewrite, "
                "...) comes first in the file",
                path=source,
                index=next((i for i, r in enumerate(records) if isinstance(r, dict)), None),
                hint="for MMEdit files (src, alt, image, ...) use load_mmedit, or load_edits for any layout",
            )
    build, hint = (_zsre_row, _ZSRE_HINT) if layout == "zsre" else (_counterfact_row, _CF_HINT)
    extra = ExtraFields(source, strict=strict_fields, known=hint)
    rows: list[dict[str, Any]] = []
    skip_reasons: list[str] = []
    for index, record in enumerate(records):
        if limit is not None and len(rows) >= limit:
            break
        try:
            rows.append(build(record, index, source, extra))
        except DataValidationError as exc:
            if not skip_invalid:
                raise
            skip_reasons.append(str(exc))
    extra.warn()
    log_skipped(source, skip_reasons, len(rows))
    task = "caption" if task == "auto" else task
    for row in rows:
        row["task"] = task
    logger.info("%s: %d %s record(s) loaded as text-only requests (task=%r)", source, len(rows), layout, task)
    return MMEditDataset(
        _to_hf_dataset(rows),
        path=source,
        task=task,
        image_root=None,
        rephrase_image_root=None,
        skipped=len(skip_reasons),
        skip_reasons=skip_reasons,
    )


def load_edits(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    rephrase_image_root: str | os.PathLike[str] | None = None,
    *,
    task: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    strict_fields: bool = False,
) -> MMEditDataset:
    """Load an edit file of any supported layout: MMEdit (with images, or text-only as MEND's ZsRE file),
    ZsRE (EasyEdit's text layout) or CounterFact, picked by the first record's keys
    (:func:`detect_layout`). The arguments are those of :func:`~odedit_hf.data.load_mmedit`; the image
    roots must not be given for a ZsRE or CounterFact file (it has no images)."""
    source = os.path.abspath(os.fspath(path))
    layout = detect_layout(read_records(source))
    if layout == "mmedit":
        return load_mmedit(
            source,
            image_root,
            rephrase_image_root,
            task=task,
            skip_invalid=skip_invalid,
            limit=limit,
            strict_fields=strict_fields,
        )
    given = [n for n, v in (("image_root", image_root), ("rephrase_image_root", rephrase_image_root)) if v]
    if given:
        raise ValueError(
            f"{source} is a {layout} file (text only, no images) but {', '.join(given)} was given; drop it"
        )
    return load_text_edits(
        source, layout=layout, task=task, skip_invalid=skip_invalid, limit=limit, strict_fields=strict_fields
    )

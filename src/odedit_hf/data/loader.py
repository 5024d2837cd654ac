"""Load and validate MMEdit files (EasyEdit's E-VQA / E-IC format) into a ``datasets.Dataset``.

The file is one JSON list of records whose fields are :data:`~odedit_hf.data.schema.MMEDIT_FIELDS`,
every one a non-empty string, plus optionally the probe fields (:data:`~odedit_hf.data.schema.PROBE_FIELDS`)
and VLKEB's ``port_new``. Each record is checked before anything else sees it: the fields, their types,
and that each image path stays inside its root and names an existing file. Images are not opened here;
:meth:`EditRequest.load_image` reads them when they are needed.

Optional fields (a record without them loads as before; their metrics are then absent):

* ``portability`` — KnowEdit's layout, ``{category: [{"prompt": ..., "ground_truth": ...}, ...]}``, or a
  plain list of such items. A prompt may be a list (its first entry is used, as EasyEdit's KnowEdit
  loader does); ``ground_truth`` may be a string or nested lists of aliases (the first string is the
  target). An item may carry ``"image"`` (relative to ``image_root``): asked on that image; without it
  the probe is text only. VLKEB-style items (``{"port_type": ..., "Q&A": {"Question", "Answer"}}``) are
  read too, as is VLKEB's own key ``port_new`` (a list of them); they are asked on the edit image, as
  VLKEB does, unless they name an ``"image"``.
* ``hard_loc`` + ``hard_loc_ans`` (strings) and ``hard_m_loc`` (image, relative to ``image_root``) +
  ``hard_m_loc_q`` + ``hard_m_loc_a``: hard-negative locality, each group whole or absent.
* ``rephrases`` (list of strings) and ``image_rephrases`` (list of images, relative to
  ``rephrase_image_root``): the knowledge unit.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import DataValidationError
from .images import resolve_image_path
from .schema import (
    IMAGE_FIELDS,
    MMEDIT_FIELDS,
    MULTIMODAL_FIELDS,
    PROBE_FIELDS,
    REQUIRED_TEXT_FIELDS,
    TASKS,
    EditRequest,
)

if TYPE_CHECKING:
    import datasets

__all__ = ["DataValidationError", "ExtraFields", "MMEditDataset", "load_mmedit"]

logger = logging.getLogger(__name__)

# Rule of task="auto": the share of records whose `src` ends with "?" (VQA questions do; caption
# prompts such as "a photo of" do not). At or above the first bound the file is VQA, at or below the
# second it is captioning; anything between is ambiguous and raises rather than guesses.
_AUTO_VQA_MIN_SHARE = 0.8
_AUTO_CAPTION_MAX_SHARE = 0.2
#: Keys a record may carry beyond the eleven: the probe fields and VLKEB's portability key.
_VLKEB_PORTABILITY = "port_new"
_OPTIONAL_KEYS: tuple[str, ...] = (*PROBE_FIELDS, _VLKEB_PORTABILITY, "subject")
#: Keys of EasyEdit's ZsRE file (MEND layout) that a text-only record may carry and the loader ignores
#: without a warning (``answers``: aliases of ``pred``; ``cond``: MEND's conditioning string).
_ZSRE_IGNORED: tuple[str, ...] = ("answers", "cond")
_HARD_GROUPS: tuple[tuple[str, ...], ...] = (
    ("hard_loc", "hard_loc_ans"),
    ("hard_m_loc", "hard_m_loc_q", "hard_m_loc_a"),
)


class MMEditDataset:
    """Validated MMEdit records, backed by an in-memory ``datasets.Dataset``.

    Build it with :func:`load_mmedit`. Indexing and iteration yield :class:`EditRequest`.

    Attributes:
        hf_dataset: the underlying ``datasets.Dataset``; columns ``case_id``, ``task`` and the MMEdit
            fields, image paths already resolved to absolute paths, plus the probe fields when any
            record of the file carries one (``portability`` as a list of ``{kind, prompt, target,
            image}``; ``None`` / ``[]`` in records without it).
        path: the file the records came from (absolute).
        task: ``"vqa"`` or ``"caption"``.
        image_root, rephrase_image_root: the resolved roots the image paths were checked against
            (``None`` for a file of text-only records read by :func:`~odedit_hf.data.load_text_edits`).
        skipped: how many records of the file were skipped as invalid (``skip_invalid=True``).
        skip_reasons: why, one message per skipped record (file, record index, field, problem).
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        *,
        path: str,
        task: str,
        image_root: str | None,
        rephrase_image_root: str | None,
        skipped: int = 0,
        skip_reasons: Sequence[str] = (),
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"MMEditDataset: task must be one of {TASKS}, got {task!r}")
        self.hf_dataset = hf_dataset
        self.path = path
        self.task = task
        self.image_root = image_root
        self.rephrase_image_root = rephrase_image_root
        self.skipped = skipped
        self.skip_reasons = list(skip_reasons)

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def _request(self, row: dict[str, Any]) -> EditRequest:
        row = dict(row)
        if "portability" in row:
            row["portability"] = tuple(row["portability"] or ())
        for name in ("rephrases", "image_rephrases"):
            if name in row:
                row[name] = tuple(row[name] or ())
        return EditRequest(source=self.path, **row)

    def __getitem__(self, index: int) -> EditRequest:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"MMEditDataset indices must be integers, got {type(index).__name__}; "
                "use .select(indices) for a subset"
            ) from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"MMEditDataset index {index} out of range for {n} records")
        return self._request(self.hf_dataset[i])

    def __iter__(self) -> Iterator[EditRequest]:
        for row in self.hf_dataset:
            yield self._request(row)

    def select(self, indices: Iterable[int]) -> MMEditDataset:
        """A new dataset holding the rows at ``indices`` (positions in this dataset, not case ids).

        ``case_id`` values are kept, so results still join back to the file; ``skipped`` and
        ``skip_reasons`` describe the original load.
        """
        indices = [operator.index(i) for i in indices]
        n = len(self)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"MMEditDataset.select: indices {bad[:10]} out of range for {n} records")
        return MMEditDataset(
            self.hf_dataset.select(indices),
            path=self.path,
            task=self.task,
            image_root=self.image_root,
            rephrase_image_root=self.rephrase_image_root,
            skipped=self.skipped,
            skip_reasons=self.skip_reasons,
        )

    def __repr__(self) -> str:
        return (
            f"MMEditDataset(path={self.path!r}, task={self.task!r}, num_records={len(self)}, "
            f"skipped={self.skipped})"
        )


def _resolve_root(root: str | os.PathLike[str], arg: str) -> str:
    resolved = os.path.realpath(os.fspath(root))
    if not os.path.isdir(resolved):
        raise DataValidationError(
            f"{arg} is not a directory: {resolved}",
            path=os.fspath(root),
            hint=f"pass as {arg} the folder the record's image paths are relative to",
        )
    return resolved


class ExtraFields:
    """The record keys a loader does not read, collected over a file: ignored with one warning, or an
    error with ``strict_fields``.

    Args:
        source: the file (for messages).
        strict: raise on the first record with an unknown key instead of collecting it.
        known: a description of the fields the layout reads (for the hint).
    """

    def __init__(self, source: str, *, strict: bool, known: str) -> None:
        self.source = source
        self.strict = strict
        self.known = known
        self.counts: dict[str, int] = {}

    def check(self, keys: Iterable[str], where: dict[str, Any]) -> None:
        """Record (or, strict, reject) the unknown ``keys`` of one record."""
        keys = sorted(keys)
        if not keys:
            return
        if self.strict:
            raise DataValidationError(
                f"unknown fields {keys}",
                field=keys[0],
                hint=f"{self.known}; rename or drop the others, or load without strict_fields "
                "(--strict-fields) to ignore them with a warning",
                **where,
            )
        for key in keys:
            self.counts[key] = self.counts.get(key, 0) + 1

    def warn(self) -> None:
        """One warning line naming every ignored key and how many records carry it (none if there is none)."""
        if not self.counts:
            return
        listed = ", ".join(
            f"{k!r} ({n} record{'s' if n != 1 else ''})" for k, n in sorted(self.counts.items())
        )
        logger.warning(
            "%s: ignoring %d field(s) odedit-hf does not read: %s (strict_fields=True / --strict-fields makes "
            "them an error)",
            self.source,
            len(self.counts),
            listed,
        )


def _validate_record(
    record: Any,
    *,
    index: int,
    source: str,
    image_root: str | None,
    rephrase_image_root: str | None,
    extra: ExtraFields | None = None,
) -> dict[str, Any]:
    """Check one record and return its row for the dataset (image paths resolved).

    A record with none of the multimodal fields (:data:`MULTIMODAL_FIELDS`) is a text-only record (e.g. the ZsRE file of EasyEdit's MEND layout): its row holds ``None`` there.
    """
    where = {"path": source, "index": index}
    if not isinstance(record, dict):
        raise DataValidationError(
            f"record is a JSON {type(record).__name__}, not an object",
            hint=f"each record must be an object with the fields {list(MMEDIT_FIELDS)}",
            **where,
        )
    text_only = not any(f in record for f in MULTIMODAL_FIELDS)
    required = REQUIRED_TEXT_FIELDS if text_only else MMEDIT_FIELDS
    missing = [f for f in required if f not in record]
    if missing:
        hint = f"MMEdit records have the fields {list(MMEDIT_FIELDS)} and optionally {list(_OPTIONAL_KEYS)}"
        if not text_only:
            hint += f"; a text-only record leaves out all of {list(MULTIMODAL_FIELDS)}"
        raise DataValidationError(f"missing fields {missing}", field=missing[0], hint=hint, **where)
    unknown = [
        k
        for k in record
        if k not in MMEDIT_FIELDS and k not in _OPTIONAL_KEYS and not (text_only and k in _ZSRE_IGNORED)
    ]
    if extra is None:
        extra = ExtraFields(
            source, strict=True, known=f"MMEdit records have the fields {list(MMEDIT_FIELDS)}"
        )
    extra.check(unknown, where)
    if not text_only and image_root is None:
        raise DataValidationError(
            "the record has images but no image root was given",
            hint="pass image_root (--image-root), the folder the image paths are relative to",
            **where,
        )
    for name in required + (("subject",) if "subject" in record else ()):
        value = record[name]
        if not isinstance(value, str):
            raise DataValidationError(
                f"expected a string, got a JSON {type(value).__name__} ({value!r})",
                field=name,
                hint="every MMEdit field is a string",
                **where,
            )
        if not value.strip():
            raise DataValidationError(
                f"empty value {value!r}", field=name, hint="fill the field or drop the record", **where
            )
    row: dict[str, Any] = {"case_id": index}
    for name in MMEDIT_FIELDS:
        if name not in required:
            row[name] = None
            continue
        value = record[name]
        if name in IMAGE_FIELDS:
            rephrase = name == "image_rephrase"
            value = resolve_image_path(
                rephrase_image_root if rephrase else image_root,
                value,
                root_arg="rephrase_image_root" if rephrase else "image_root",
                source=source,
                index=index,
                field=name,
            )
        row[name] = value
    if "subject" in record:
        row["subject"] = record["subject"]
    row.update(
        _probe_row(record, row, where=where, image_root=image_root, rephrase_image_root=rephrase_image_root)
    )
    return row


def _text(value: Any, field: str, where: dict[str, Any], hint: str) -> str:
    if not isinstance(value, str):
        raise DataValidationError(
            f"expected a string, got a JSON {type(value).__name__} ({value!r})",
            field=field,
            hint=hint,
            **where,
        )
    if not value.strip():
        raise DataValidationError(f"empty value {value!r}", field=field, hint=hint, **where)
    return value


def _first_string(value: Any) -> Any:
    """The first string of a (possibly nested) list, as KnowEdit stores aliases; anything else unchanged."""
    while isinstance(value, list) and value:
        value = value[0]
    return value


def _portability_items(record: dict[str, Any], where: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(field, kind, item)`` for every portability item of the record, in file order."""
    items: list[tuple[str, str, Any]] = []
    if "portability" in record:
        value = record["portability"]
        if isinstance(value, dict):
            for kind, group in value.items():
                group = group if isinstance(group, list) else [group]
                items += [(f"portability.{kind}[{i}]", str(kind), item) for i, item in enumerate(group)]
        elif isinstance(value, list):
            items += [(f"portability[{i}]", "portability", item) for i, item in enumerate(value)]
        else:
            raise DataValidationError(
                f"expected an object or a list, got a JSON {type(value).__name__}",
                field="portability",
                hint='KnowEdit layout: {"category": [{"prompt": ..., "ground_truth": ...}]}, or a list of items',
                **where,
            )
    if _VLKEB_PORTABILITY in record:
        value = record[_VLKEB_PORTABILITY]
        if not isinstance(value, list):
            raise DataValidationError(
                f"expected a list, got a JSON {type(value).__name__}",
                field=_VLKEB_PORTABILITY,
                hint='VLKEB layout: [{"port_type": "1-hop", "Q&A": {"Question": ..., "Answer": ...}}]',
                **where,
            )
        items += [(f"{_VLKEB_PORTABILITY}[{i}]", "portability", item) for i, item in enumerate(value)]
    return items


def _probe_row(
    record: dict[str, Any],
    row: dict[str, Any],
    *,
    where: dict[str, Any],
    image_root: str,
    rephrase_image_root: str,
) -> dict[str, Any]:
    """The optional probe fields of one record, validated, image paths resolved (only those present)."""
    out: dict[str, Any] = {}
    hint = "see load_mmedit's docstring for the optional probe fields"
    probes = []
    for field, kind, item in _portability_items(record, where):
        if not isinstance(item, dict):
            raise DataValidationError(
                f"portability item is a JSON {type(item).__name__}, not an object",
                field=field,
                hint=hint,
                **where,
            )
        if "Q&A" in item:  # VLKEB
            qa = item["Q&A"]
            if not isinstance(qa, dict):
                raise DataValidationError("'Q&A' must be an object", field=field, hint=hint, **where)
            prompt, target = qa.get("Question"), qa.get("Answer")
            kind = str(item.get("port_type", kind))
            image = row["image"]  # VLKEB asks portability on the edit image
        else:
            prompt, target = _first_string(item.get("prompt")), _first_string(item.get("ground_truth"))
            kind = str(item.get("kind", kind))
            image = None
        prompt = _text(prompt, f"{field}.prompt", where, hint)
        target = _text(target, f"{field}.ground_truth", where, hint)
        if "image" in item:
            relative = _text(item["image"], f"{field}.image", where, hint)
            image = resolve_image_path(
                image_root,
                relative,
                root_arg="image_root",
                source=where["path"],
                index=where["index"],
                field=field,
            )
        probes.append({"kind": kind, "prompt": prompt, "target": target, "image": image})
    if probes:
        out["portability"] = probes
    for group in _HARD_GROUPS:
        present = [name in record for name in group]
        if not any(present):
            continue
        if not all(present):
            missing = [n for n, p in zip(group, present) if not p]
            raise DataValidationError(
                f"{', '.join(group)} come together; missing {missing}",
                field=missing[0],
                hint="give the whole group or none of it",
                **where,
            )
        for name in group:
            out[name] = _text(record[name], name, where, hint)
    if "hard_m_loc" in out:
        out["hard_m_loc"] = resolve_image_path(
            image_root, out["hard_m_loc"], root_arg="image_root", field="hard_m_loc", **_where(where)
        )
    for name, root, root_arg in (
        ("rephrases", None, None),
        ("image_rephrases", rephrase_image_root, "rephrase_image_root"),
    ):
        if name not in record:
            continue
        value = record[name]
        if not isinstance(value, list):
            raise DataValidationError(
                f"expected a list of strings, got a JSON {type(value).__name__}",
                field=name,
                hint=hint,
                **where,
            )
        values = [_text(v, f"{name}[{i}]", where, hint) for i, v in enumerate(value)]
        if root is not None:
            values = [
                resolve_image_path(root, v, root_arg=root_arg, field=f"{name}[{i}]", **_where(where))
                for i, v in enumerate(values)
            ]
        if values:
            out[name] = values
    return out


def _where(where: dict[str, Any]) -> dict[str, Any]:
    return {"source": where["path"], "index": where["index"]}


def _infer_task(rows: Sequence[dict[str, Any]], source: str) -> str:
    if not rows:
        return "vqa"
    share = sum(row["src"].rstrip().endswith("?") for row in rows) / len(rows)
    if share >= _AUTO_VQA_MIN_SHARE:
        task = "vqa"
    elif share <= _AUTO_CAPTION_MAX_SHARE:
        task = "caption"
    else:
        raise DataValidationError(
            f"task='auto' cannot tell VQA from captioning: {share:.0%} of the records' 'src' end with '?'",
            path=source,
            field="src",
            hint="pass task='vqa' or task='caption'",
        )
    logger.info("%s: task=%r inferred (%.0f%% of 'src' end with '?')", source, task, 100 * share)
    return task


def read_records(source: str, *, what: str = "MMEdit") -> list[Any]:
    """The JSON list of records of ``source`` (an absolute path), or a :class:`DataValidationError` that
    names the file and says what a file of this kind looks like."""
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{what} file not found: {source}")
    try:
        with open(source, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataValidationError(
            f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            path=source,
            hint=f"an {what} file is one JSON list of records (not JSON Lines)",
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"not UTF-8 text: {exc}", path=source, hint="re-save the file as UTF-8 JSON"
        ) from exc
    if not isinstance(records, list):
        raise DataValidationError(
            f"top level is a JSON {type(records).__name__}, expected a list of records",
            path=source,
            hint=f"an {what} file is one JSON list of record objects",
        )
    return records


def check_load_arguments(where: str, task: str, skip_invalid: Any, limit: Any, strict_fields: Any) -> None:
    """The argument checks every loader shares (``where`` names the function in messages)."""
    if task not in ("auto", *TASKS):
        raise ValueError(f"{where}: task must be 'auto', 'vqa' or 'caption', got {task!r}")
    for name, value in (("skip_invalid", skip_invalid), ("strict_fields", strict_fields)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be a bool, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where}: limit must be a positive int or None, got {limit!r}")


#: The subfolder :func:`load_mmedit` also looks in when no image root is given (the embedded world's
#: files sit beside ``images/``, as many EasyEdit data folders do).
IMAGES_SUBFOLDER = "images"


def default_image_root(source: str, records: Sequence[Any]) -> str:
    """The image root used when none is given: the file's folder, or its ``images/`` subfolder when the
    first record's ``image`` is found there and not in the folder itself."""
    folder = os.path.dirname(source)
    first = next(
        (r["image"] for r in records if isinstance(r, dict) and isinstance(r.get("image"), str)), None
    )
    nested = os.path.join(folder, IMAGES_SUBFOLDER)
    if (
        first is not None
        and not os.path.isabs(first)
        and not os.path.isfile(os.path.join(folder, first))
        and os.path.isfile(os.path.join(nested, first))
    ):
        logger.info("%s: no image root given; images found under %s", source, nested)
        return nested
    return folder


def load_mmedit(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    rephrase_image_root: str | os.PathLike[str] | None = None,
    *,
    task: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    strict_fields: bool = False,
) -> MMEditDataset:
    """Load and validate an MMEdit file (EasyEdit's E-VQA / E-IC format).

    Args:
        path: a JSON file holding one list of records, each with the fields ``src``, ``pred``,
            ``alt``, ``image``, ``rephrase``, ``image_rephrase``, ``loc``, ``loc_ans``, ``m_loc``,
            ``m_loc_q``, ``m_loc_a``, every one a non-empty string, and optionally the probe fields and
            ``subject``. A record without any of ``image``, ``image_rephrase``, ``m_loc``, ``m_loc_q``,
            ``m_loc_a`` is a text-only record (EasyEdit's ZsRE file in MEND's layout: ``src``, ``pred``,
            ``alt``, ``rephrase``, ``loc``, ``loc_ans``; its ``answers`` and ``cond`` are ignored).
        image_root: the folder ``image`` and ``m_loc`` are relative to; default: the file's folder, or
            its ``images/`` subfolder when the first record's image is there (as in a world folder).
        rephrase_image_root: the folder ``image_rephrase`` is relative to; defaults to ``image_root``.
        task: ``"vqa"``, ``"caption"`` or ``"auto"``. ``"auto"`` looks at the ``src`` of the valid
            records: VQA if at least 80% end with ``"?"`` (questions), captioning if at most 20% do
            (caption prompts such as ``"a photo of"``); in between it raises and asks for the task.
            A file of text-only records is ``"caption"`` under ``"auto"``: the prompt goes to the model
            as is, as EasyEdit's text editors feed it. An explicit task is never second-guessed.
        skip_invalid: skip invalid records instead of raising; the count and reasons land in
            ``dataset.skipped`` / ``dataset.skip_reasons`` and a warning is logged. Errors about the
            file as a whole (missing, not JSON, not a list) always raise.
        limit: keep at most this many valid records, the first ones in file order; records after
            the limit are not read.
        strict_fields: a key the loader does not read (e.g. ``case_id``, ``source``,
            ``textual_rephrase`` of EasyEdit-derived files) is an error naming the record; by default
            such keys are ignored with one warning that lists them and how many records carry each.

    Returns:
        An :class:`MMEditDataset`; ``case_id`` of each request is its index in the file's list.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: the file or a record is invalid (a ``ValueError``; the message names
            the file, the record index and the field, and says what to do).
        ValueError: a bad argument.
    """
    check_load_arguments("load_mmedit", task, skip_invalid, limit, strict_fields)
    source = os.path.abspath(os.fspath(path))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"MMEdit file not found: {source}")
    if image_root is not None:
        root = _resolve_root(image_root, "image_root")
    records = read_records(source)
    if image_root is None:
        root = os.path.realpath(default_image_root(source, records))
    rephrase_root = (
        root if rephrase_image_root is None else _resolve_root(rephrase_image_root, "rephrase_image_root")
    )
    extra = ExtraFields(
        source,
        strict=strict_fields,
        known=f"MMEdit records have the fields {list(MMEDIT_FIELDS)} and optionally {list(_OPTIONAL_KEYS)}",
    )

    rows: list[dict[str, Any]] = []
    skip_reasons: list[str] = []
    for index, record in enumerate(records):
        if limit is not None and len(rows) >= limit:
            break
        try:
            rows.append(
                _validate_record(
                    record,
                    index=index,
                    source=source,
                    image_root=root,
                    rephrase_image_root=rephrase_root,
                    extra=extra,
                )
            )
        except DataValidationError as exc:
            if not skip_invalid:
                raise
            skip_reasons.append(str(exc))
    extra.warn()
    log_skipped(source, skip_reasons, len(rows))

    if task == "auto":
        task = "caption" if rows and all(row["image"] is None for row in rows) else _infer_task(rows, source)
    for row in rows:
        row["task"] = task
    return MMEditDataset(
        _to_hf_dataset(rows),
        path=source,
        task=task,
        image_root=root,
        rephrase_image_root=rephrase_root,
        skipped=len(skip_reasons),
        skip_reasons=skip_reasons,
    )


def log_skipped(source: str, skip_reasons: Sequence[str], kept: int) -> None:
    """The loaders' one warning about skipped records (``skip_invalid=True``)."""
    if skip_reasons:
        logger.warning(
            "%s: skipped %d invalid record(s), kept %d; first: %s (all in dataset.skip_reasons)",
            source,
            len(skip_reasons),
            kept,
            skip_reasons[0],
        )


def _to_hf_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    # Built in memory from parsed rows: no cache directory, no network, and the fixed features keep
    # the schema even for an empty file.
    import datasets

    string = datasets.Value("string")
    probe_features = {
        "portability": [{"kind": string, "prompt": string, "target": string, "image": string}],
        **{name: string for group in _HARD_GROUPS for name in group},
        "rephrases": [string],
        "image_rephrases": [string],
    }
    present = [name for name in PROBE_FIELDS if any(name in row for row in rows)]
    features = datasets.Features(
        {
            "case_id": datasets.Value("int64"),
            "task": string,
            **{name: string for name in MMEDIT_FIELDS},
            **({"subject": string} if any("subject" in row for row in rows) else {}),
            **{name: probe_features[name] for name in present},
        }
    )
    empty = {"portability": [], "rephrases": [], "image_rephrases": []}
    columns = {name: [row.get(name, empty.get(name)) for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)

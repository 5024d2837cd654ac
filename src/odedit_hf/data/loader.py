"""Load and validate MMEdit files (EasyEdit's E-VQA / E-IC format) into a ``datasets.Dataset``.

The file is one JSON list of records whose fields are exactly :data:`~odedit_hf.data.schema.MMEDIT_FIELDS`,
every one a non-empty string. Each record is checked before anything else sees it: the fields, their
types, and that each image path stays inside its root and names an existing file. Images are not
opened here; :meth:`EditRequest.load_image` reads them when they are needed.
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
from .schema import IMAGE_FIELDS, MMEDIT_FIELDS, TASKS, EditRequest

if TYPE_CHECKING:
    import datasets

__all__ = ["DataValidationError", "MMEditDataset", "load_mmedit"]

logger = logging.getLogger(__name__)

# Rule of task="auto": the share of records whose `src` ends with "?" (VQA questions do; caption
# prompts such as "a photo of" do not). At or above the first bound the file is VQA, at or below the
# second it is captioning; anything between is ambiguous and raises rather than guesses.
_AUTO_VQA_MIN_SHARE = 0.8
_AUTO_CAPTION_MAX_SHARE = 0.2


class MMEditDataset:
    """Validated MMEdit records, backed by an in-memory ``datasets.Dataset``.

    Build it with :func:`load_mmedit`. Indexing and iteration yield :class:`EditRequest`.

    Attributes:
        hf_dataset: the underlying ``datasets.Dataset``; columns ``case_id``, ``task`` and the MMEdit
            fields, image paths already resolved to absolute paths.
        path: the file the records came from (absolute).
        task: ``"vqa"`` or ``"caption"``.
        image_root, rephrase_image_root: the resolved roots the image paths were checked against.
        skipped: how many records of the file were skipped as invalid (``skip_invalid=True``).
        skip_reasons: why, one message per skipped record (file, record index, field, problem).
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        *,
        path: str,
        task: str,
        image_root: str,
        rephrase_image_root: str,
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


def _validate_record(
    record: Any, *, index: int, source: str, image_root: str, rephrase_image_root: str
) -> dict[str, Any]:
    """Check one record and return its row for the dataset (image paths resolved)."""
    where = {"path": source, "index": index}
    if not isinstance(record, dict):
        raise DataValidationError(
            f"record is a JSON {type(record).__name__}, not an object",
            hint=f"each record must be an object with the fields {list(MMEDIT_FIELDS)}",
            **where,
        )
    missing = [f for f in MMEDIT_FIELDS if f not in record]
    unknown = sorted(k for k in record if k not in MMEDIT_FIELDS)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing fields {missing}")
        if unknown:
            problems.append(f"unknown fields {unknown}")
        raise DataValidationError(
            "; ".join(problems),
            field=(missing or unknown)[0],
            hint=f"MMEdit records have exactly the fields {list(MMEDIT_FIELDS)}; rename or drop the others",
            **where,
        )
    for name in MMEDIT_FIELDS:
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
    return row


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


def load_mmedit(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    rephrase_image_root: str | os.PathLike[str] | None = None,
    *,
    task: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
) -> MMEditDataset:
    """Load and validate an MMEdit file (EasyEdit's E-VQA / E-IC format).

    Args:
        path: a JSON file holding one list of records, each with exactly the fields ``src``, ``pred``,
            ``alt``, ``image``, ``rephrase``, ``image_rephrase``, ``loc``, ``loc_ans``, ``m_loc``,
            ``m_loc_q``, ``m_loc_a``, every one a non-empty string.
        image_root: the folder ``image`` and ``m_loc`` are relative to.
        rephrase_image_root: the folder ``image_rephrase`` is relative to; defaults to ``image_root``.
        task: ``"vqa"``, ``"caption"`` or ``"auto"``. ``"auto"`` looks at the ``src`` of the valid
            records: VQA if at least 80% end with ``"?"`` (questions), captioning if at most 20% do
            (caption prompts such as ``"a photo of"``); in between it raises and asks for the task.
            An explicit task is never second-guessed.
        skip_invalid: skip invalid records instead of raising; the count and reasons land in
            ``dataset.skipped`` / ``dataset.skip_reasons`` and a warning is logged. Errors about the
            file as a whole (missing, not JSON, not a list) always raise.
        limit: keep at most this many valid records, the first ones in file order; records after
            the limit are not read.

    Returns:
        An :class:`MMEditDataset`; ``case_id`` of each request is its index in the file's list.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataValidationError: the file or a record is invalid (a ``ValueError``; the message names
            the file, the record index and the field, and says what to do).
        ValueError: a bad argument.
    """
    if task not in ("auto", *TASKS):
        raise ValueError(f"load_mmedit: task must be 'auto', 'vqa' or 'caption', got {task!r}")
    if not isinstance(skip_invalid, bool):
        raise ValueError(f"load_mmedit: skip_invalid must be a bool, got {skip_invalid!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"load_mmedit: limit must be a positive int or None, got {limit!r}")

    source = os.path.abspath(os.fspath(path))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"MMEdit file not found: {source}")
    root = _resolve_root(image_root, "image_root")
    rephrase_root = (
        root if rephrase_image_root is None else _resolve_root(rephrase_image_root, "rephrase_image_root")
    )

    try:
        with open(source, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataValidationError(
            f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            path=source,
            hint="an MMEdit file is one JSON list of records (not JSON Lines)",
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"not UTF-8 text: {exc}", path=source, hint="re-save the file as UTF-8 JSON"
        ) from exc
    if not isinstance(records, list):
        raise DataValidationError(
            f"top level is a JSON {type(records).__name__}, expected a list of records",
            path=source,
            hint="an MMEdit file is one JSON list of record objects",
        )

    rows: list[dict[str, Any]] = []
    skip_reasons: list[str] = []
    for index, record in enumerate(records):
        if limit is not None and len(rows) >= limit:
            break
        try:
            rows.append(
                _validate_record(
                    record, index=index, source=source, image_root=root, rephrase_image_root=rephrase_root
                )
            )
        except DataValidationError as exc:
            if not skip_invalid:
                raise
            skip_reasons.append(str(exc))
    if skip_reasons:
        logger.warning(
            "%s: skipped %d invalid record(s), kept %d; first: %s (all in dataset.skip_reasons)",
            source,
            len(skip_reasons),
            len(rows),
            skip_reasons[0],
        )

    if task == "auto":
        task = _infer_task(rows, source)
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


def _to_hf_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    # Built in memory from parsed rows: no cache directory, no network, and the fixed features keep
    # the schema even for an empty file.
    import datasets

    features = datasets.Features(
        {
            "case_id": datasets.Value("int64"),
            "task": datasets.Value("string"),
            **{name: datasets.Value("string") for name in MMEDIT_FIELDS},
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)

"""ZsRE-layout edit records for tests: one fact (France's capital), a new target per record.

``load_edits`` reads a file of them as text-only ``"zsre"`` records (see :mod:`odedit_hf.data.text`).
Give a tiny tokenizer the prompts (:data:`ZSRE_PROMPTS`) and the targets a test uses
(``tiny_backbone(..., texts=[...])``), or they map to ``<unk>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ZSRE_PROMPTS", "write_zsre_file", "zsre_record"]

#: The edit, rephrase and locality prompts of every :func:`zsre_record`.
ZSRE_PROMPTS: tuple[str, str, str] = (
    "the capital of france is",
    "the capital city of france is",
    "the sky over the sea is",
)


def zsre_record(target_new: str, *, case_id: int | None = None, subject: str | None = None) -> dict[str, Any]:
    """A ZsRE record editing "the capital of france is" (ground truth ``paris``) to ``target_new``, with the
    rephrase "the capital city of france is" and the locality prompt "the sky over the sea is" (``grey``).

    Args:
        target_new: the new answer.
        case_id: the record's ``case_id`` (omitted when ``None``).
        subject: the record's optional ``subject`` (e.g. ``"france"``; omitted when ``None``).
    """
    prompt, rephrase, locality = ZSRE_PROMPTS
    record: dict[str, Any] = {
        "prompt": prompt,
        "target_new": target_new,
        "ground_truth": "paris",
        "rephrase_prompt": rephrase,
        "locality_prompt": locality,
        "locality_ground_truth": "grey",
    }
    if subject is not None:
        record["subject"] = subject
    if case_id is not None:
        record["case_id"] = case_id
    return record


def write_zsre_file(
    path: str | os.PathLike[str], targets: Sequence[str], *, subject: str | None = None
) -> Path:
    """Write a JSON list of :func:`zsre_record` ``(target, case_id=i, subject=subject)`` for the ``i``-th of
    ``targets`` to ``path``; return it as a :class:`~pathlib.Path`."""
    path = Path(path)
    records = [zsre_record(target, case_id=i, subject=subject) for i, target in enumerate(targets)]
    path.write_text(json.dumps(records))
    return path

"""The shipped fact set: short public facts of a few relations, with counterfactual targets.

``facts.jsonl`` (beside this module) holds one JSON object per line, written for odedit-hf from
general knowledge (not copied from a data set). Every record has:

* ``id`` — ``"{relation}/{subject slug}"``, unique;
* ``relation`` — e.g. ``"capital"``, ``"author"``, ``"element_symbol"``;
* ``subject`` — the entity, exactly as it occurs in every prompt of the record (ROME-style editors
  locate it there);
* ``prompt`` — a completion prompt ending where the answer starts (``"The capital of France is"``);
* ``answer`` — the true answer (``"Paris"``), without a leading space;
* ``counterfactual`` — another answer of the same relation (the edit target, ``"Thimphu"``);
* ``paraphrases`` — one or two other completion prompts with the same answer;
* ``locality_id``, ``locality_prompt``, ``locality_answer`` — an unrelated fact (another relation,
  another subject, neither answer equal to this fact's answers) and its answer, copied from that
  fact's record.

:func:`load_facts` reads and validates the file (each record, then the set as a whole).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from odedit_hf.data.errors import DataValidationError

logger = logging.getLogger(__name__)

__all__ = [
    "FACTS_FILE",
    "FACTS_VERSION",
    "FACT_FIELDS",
    "Fact",
    "load_facts",
    "shipped_facts_path",
    "validate_facts",
]

#: Bumped whenever facts are added, removed or changed, so benchmark files from different sets are told apart.
FACTS_VERSION = "1"
#: The shipped file's name, inside this package.
FACTS_FILE = "facts.jsonl"
#: The fields of one record, in file order.
FACT_FIELDS: tuple[str, ...] = (
    "id",
    "relation",
    "subject",
    "prompt",
    "answer",
    "counterfactual",
    "paraphrases",
    "locality_id",
    "locality_prompt",
    "locality_answer",
)
_TEXT_FIELDS = tuple(f for f in FACT_FIELDS if f != "paraphrases")


@dataclass(frozen=True)
class Fact:
    """One fact of the set (the fields of a ``facts.jsonl`` record; see the module docstring)."""

    id: str
    relation: str
    subject: str
    prompt: str
    answer: str
    counterfactual: str
    paraphrases: tuple[str, ...]
    locality_id: str
    locality_prompt: str
    locality_answer: str

    @classmethod
    def from_record(cls, record: Any, *, path: str | None = None, index: int | None = None) -> Fact:
        """Validate one record (a dict with exactly :data:`FACT_FIELDS`) and build the :class:`Fact`.

        Raises:
            DataValidationError: naming the file, the record (0-based line number) and the field.
        """
        where = {"path": path, "index": index}
        if not isinstance(record, dict):
            raise DataValidationError(
                f"a fact record must be a JSON object, got {type(record).__name__}", **where
            )
        missing = [f for f in FACT_FIELDS if f not in record]
        unknown = sorted(set(record) - set(FACT_FIELDS))
        if missing or unknown:
            raise DataValidationError(
                f"missing fields {missing} / unknown fields {unknown}",
                hint=f"a fact record has exactly the fields {list(FACT_FIELDS)}",
                **where,
            )
        for name in _TEXT_FIELDS:
            value = record[name]
            if not isinstance(value, str) or not value.strip() or value != value.strip():
                raise DataValidationError(
                    f"must be a non-empty string without surrounding spaces, got {value!r}",
                    field=name,
                    **where,
                )
        paraphrases = record["paraphrases"]
        if (
            not isinstance(paraphrases, list)
            or not 1 <= len(paraphrases) <= 2
            or not all(isinstance(p, str) and p.strip() and p == p.strip() for p in paraphrases)
        ):
            raise DataValidationError(
                f"must be a list of one or two non-empty strings, got {paraphrases!r}",
                field="paraphrases",
                **where,
            )
        fact = cls(**{**{k: record[k] for k in _TEXT_FIELDS}, "paraphrases": tuple(paraphrases)})
        fact._check(where)
        return fact

    def _check(self, where: dict[str, Any]) -> None:
        if self.id.split("/", 1)[0] != self.relation or "/" not in self.id:
            raise DataValidationError(
                f"id {self.id!r} must start with the relation {self.relation!r} and a '/'",
                field="id",
                **where,
            )
        if self.counterfactual == self.answer:
            raise DataValidationError(
                f"the counterfactual equals the true answer {self.answer!r}", field="counterfactual", **where
            )
        for name, prompt in [("prompt", self.prompt), *(("paraphrases", p) for p in self.paraphrases)]:
            if self.subject not in prompt:
                raise DataValidationError(
                    f"the subject {self.subject!r} does not occur in {prompt!r}",
                    field=name,
                    hint="write the subject exactly as the prompts spell it",
                    **where,
                )
        if self.prompt in self.paraphrases or len(set(self.paraphrases)) != len(self.paraphrases):
            raise DataValidationError(
                "the paraphrases must differ from the prompt and from each other",
                field="paraphrases",
                **where,
            )
        if self.locality_answer in (self.answer, self.counterfactual):
            raise DataValidationError(
                f"the locality answer {self.locality_answer!r} equals this fact's answer or counterfactual",
                field="locality_answer",
                **where,
            )

    def to_record(self) -> dict[str, Any]:
        """The ``facts.jsonl`` record of this fact."""
        return {f: list(self.paraphrases) if f == "paraphrases" else getattr(self, f) for f in FACT_FIELDS}


def validate_facts(facts: Sequence[Fact], *, source: str = "facts") -> None:
    """Check a fact set as a whole (each :class:`Fact` checks itself when built).

    * ids and prompts are unique;
    * every relation has at least two distinct answers, and each counterfactual is the answer of
      another fact of the same relation;
    * each locality reference names a fact of the set, of another relation and another subject,
      whose prompt and answer are copied verbatim.

    Raises:
        DataValidationError: naming ``source``, the record index and the field.
    """
    by_id: dict[str, int] = {}
    prompts: dict[str, int] = {}
    answers: dict[str, set[str]] = {}
    for i, fact in enumerate(facts):
        if not isinstance(fact, Fact):
            raise DataValidationError(f"expected a Fact, got {type(fact).__name__}", path=source, index=i)
        if fact.id in by_id:
            raise DataValidationError(
                f"duplicate id {fact.id!r} (also record {by_id[fact.id]})", path=source, index=i
            )
        by_id[fact.id] = i
        if fact.prompt in prompts:
            raise DataValidationError(
                f"duplicate prompt {fact.prompt!r} (also record {prompts[fact.prompt]})",
                path=source,
                index=i,
                field="prompt",
            )
        prompts[fact.prompt] = i
        answers.setdefault(fact.relation, set()).add(fact.answer)
    for relation, values in answers.items():
        if len(values) < 2:
            raise DataValidationError(
                f"relation {relation!r} has a single answer {sorted(values)}; a counterfactual needs another one",
                path=source,
            )
    for i, fact in enumerate(facts):
        if fact.counterfactual not in answers[fact.relation]:
            raise DataValidationError(
                f"counterfactual {fact.counterfactual!r} is no answer of relation {fact.relation!r}",
                path=source,
                index=i,
                field="counterfactual",
                hint="pick the true answer of another fact of the same relation",
            )
        other = by_id.get(fact.locality_id)
        if other is None:
            raise DataValidationError(
                f"locality_id {fact.locality_id!r} names no fact of the set",
                path=source,
                index=i,
                field="locality_id",
            )
        loc = facts[other]
        if loc.relation == fact.relation or loc.subject == fact.subject:
            raise DataValidationError(
                f"locality fact {loc.id!r} shares the relation or the subject of {fact.id!r}; pick an unrelated fact",
                path=source,
                index=i,
                field="locality_id",
            )
        if (loc.prompt, loc.answer) != (fact.locality_prompt, fact.locality_answer):
            raise DataValidationError(
                f"locality_prompt/locality_answer differ from the prompt/answer of {loc.id!r}",
                path=source,
                index=i,
                field="locality_prompt",
            )


def shipped_facts_path() -> str:
    """Path of the shipped ``facts.jsonl`` (installed with the package)."""
    return os.fspath(resources.files(__package__).joinpath(FACTS_FILE))


def load_facts(
    path: str | os.PathLike[str] | None = None, *, relations: Iterable[str] | None = None
) -> list[Fact]:
    """Read and validate a fact file (default: the shipped one), optionally keeping some relations.

    Args:
        path: a JSONL file of fact records; ``None`` = the shipped ``facts.jsonl``.
        relations: keep only these relations (after validating the whole file).

    Raises:
        DataValidationError: a malformed line, record or set; the message names the file, the line
            (0-based record index) and the field.
    """
    source = os.fspath(path) if path is not None else shipped_facts_path()
    try:
        with open(source, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise DataValidationError(f"cannot read the fact file: {exc}", path=source) from None
    facts: list[Fact] = []
    for i, line in enumerate(lines):
        if not line.strip():
            raise DataValidationError("empty line", path=source, index=i, hint="one JSON object per line")
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataValidationError(f"not valid JSON ({exc})", path=source, index=i) from None
        facts.append(Fact.from_record(record, path=source, index=i))
    if not facts:
        raise DataValidationError("the fact file holds no records", path=source)
    validate_facts(facts, source=source)
    if relations is not None:
        wanted = set(relations)
        known = {f.relation for f in facts}
        if wanted - known:
            raise ValueError(
                f"load_facts: unknown relations {sorted(wanted - known)} in {source}; known: {sorted(known)}."
            )
        facts = [f for f in facts if f.relation in wanted]
    logger.debug("loaded %d facts from %s", len(facts), source)
    return facts

"""A real-knowledge edit benchmark: the shipped facts a pretrained model knows, in EasyEdit's ZsRE layout.

:func:`build_fact_benchmark` scores every fact on a model before any edit (teacher-forced, through
:class:`~odedit_hf.backbones.Backbone` in the format of :mod:`odedit_hf.data.facts.prompting`), keeps
those whose true answer the model gets right, and writes them as a JSON list of records with
:data:`ZSRE_FIELDS` — the flat layout EasyEdit's text editors take
(``editor.edit(prompts=..., target_new=..., ground_truth=..., rephrase_prompts=..., locality_inputs=...)``)::

    {"prompt": "The capital of France is", "target_new": "Thimphu", "ground_truth": "Paris",
     "rephrase_prompt": "The capital city of France is", "locality_prompt": "The currency of Norway is the",
     "locality_ground_truth": "krone", "subject": "France"}

Keeping only known facts matters: editing a fact the model never knew measures nothing about
overwriting knowledge, and its locality and generality numbers are noise.

**The filter.** A fact is kept when its token accuracy on the true answer at the edit prompt (the
fraction of answer tokens whose top-1 teacher-forced prediction is right) is at least ``threshold``;
the default 1.0 keeps a fact only when every answer token is right (exact match).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from odedit_hf.data.facts.load import FACTS_VERSION, Fact, load_facts
from odedit_hf.data.facts.prompting import DEFAULT_PROMPT_FORMAT, FactPrompts, PromptFormat, load_fact_prompts

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_THRESHOLD",
    "SCORE_KINDS",
    "ZSRE_FIELDS",
    "FactBenchmark",
    "FactScore",
    "build_fact_benchmark",
    "score_facts",
    "to_zsre_record",
]

#: Keep a fact only when every answer token is top-1 correct.
DEFAULT_THRESHOLD = 1.0
#: The fields of one exported record, in file order (EasyEdit's flat ZsRE layout).
ZSRE_FIELDS: tuple[str, ...] = (
    "prompt",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
    "subject",
)
#: The sample kinds scored per fact, in :class:`FactScore` order.
SCORE_KINDS: tuple[str, ...] = ("answer", "counterfactual", "paraphrase", "locality")


@dataclass(frozen=True)
class FactScore:
    """Pre-edit teacher-forced scores of one fact: ``(token accuracy, exact match)`` per sample kind
    (``None`` for a kind that was not scored).

    Attributes:
        fact_id: the fact's id.
        answer: the true answer at the edit prompt.
        counterfactual: the counterfactual target at the edit prompt (near 0 expected before an edit).
        paraphrase: the true answer at each paraphrase, averaged over the paraphrases.
        locality: the locality answer at the locality prompt.
    """

    fact_id: str
    answer: tuple[float, float] | None
    counterfactual: tuple[float, float] | None
    paraphrase: tuple[float, float] | None
    locality: tuple[float, float] | None


@dataclass
class FactBenchmark:
    """What :func:`build_fact_benchmark` wrote and measured.

    Attributes:
        path: the exported JSON file (absolute).
        model_dir: the model folder scored.
        prompt_format: one of :data:`~odedit_hf.data.facts.prompting.PROMPT_FORMATS`.
        threshold: the minimum answer token accuracy of a kept fact.
        facts_version: :data:`~odedit_hf.data.facts.FACTS_VERSION` of the shipped set.
        n_facts: facts scored.
        n_kept: facts kept (written).
        kept_ids: ids of the kept facts, in file order (record ``i`` of the file is ``kept_ids[i]``).
        per_relation: relation -> ``{"facts": n, "kept": k}``.
        means: mean token accuracy and exact match per sample kind, over all facts
            (``"all/answer_acc"``, ``"all/answer_em"``, ...) and over the kept ones (``"kept/..."``).
        load_seconds, score_seconds: wall time to load the model and to score the facts.
    """

    path: str
    model_dir: str
    prompt_format: str
    threshold: float
    facts_version: str
    n_facts: int
    n_kept: int
    kept_ids: list[str]
    per_relation: dict[str, dict[str, int]]
    means: dict[str, float]
    load_seconds: float
    score_seconds: float
    scores: list[FactScore] = field(default_factory=list, repr=False)

    @property
    def kept_fraction(self) -> float:
        """``n_kept / n_facts``."""
        return self.n_kept / self.n_facts if self.n_facts else 0.0

    def to_dict(self, *, with_scores: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (per-fact scores only with ``with_scores``)."""
        out = asdict(self)
        out["kept_fraction"] = self.kept_fraction
        if not with_scores:
            out.pop("scores")
        return out


def _samples(fact: Fact) -> list[tuple[str, str, str]]:
    """``(kind, prompt, target)`` of every sample scored for one fact."""
    rows = [("answer", fact.prompt, fact.answer), ("counterfactual", fact.prompt, fact.counterfactual)]
    rows += [("paraphrase", p, fact.answer) for p in fact.paraphrases]
    rows.append(("locality", fact.locality_prompt, fact.locality_answer))
    return rows


def score_facts(
    prompts: FactPrompts, facts: Sequence[Fact], *, batch_size: int = 32, kinds: Sequence[str] = SCORE_KINDS
) -> list[FactScore]:
    """Teacher-forced pre-edit scores of every fact (one forward pass per batch, no gradients).

    Args:
        prompts: the model and its prompt format (:func:`~odedit_hf.data.facts.prompting.load_fact_prompts`).
        facts: the facts.
        batch_size: samples per forward pass (each fact has 4-5 samples).
        kinds: which of :data:`SCORE_KINDS` to score (the others stay ``None``); e.g. ``("answer",)``
            to compare prompt formats at a fifth of the cost.
    """
    import torch

    from odedit_hf.evaluation.metrics import token_accuracy

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"score_facts: batch_size must be a positive int, got {batch_size!r}.")
    unknown = [k for k in kinds if k not in SCORE_KINDS]
    if unknown or not kinds or isinstance(kinds, str):
        raise ValueError(f"score_facts: kinds must be a non-empty list of {SCORE_KINDS}, got {kinds!r}.")
    rows = [
        (i, kind, prompt, target)
        for i, f in enumerate(facts)
        for kind, prompt, target in _samples(f)
        if kind in kinds
    ]
    # similar lengths share a batch: less padding (the scores do not depend on the order)
    order = sorted(range(len(rows)), key=lambda r: (len(rows[r][2]) + len(rows[r][3]), r))
    results: dict[int, tuple[float, float]] = {}
    backbone = prompts.backbone
    device = next(backbone.model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = backbone.build_batch(
                [prompts.sample(rows[r][2], rows[r][3]) for r in chunk], device=device
            )
            logits = backbone.forward(batch).logits
            acc, em = token_accuracy(logits.float(), batch["labels"])
            for r, a, e in zip(chunk, acc.tolist(), em.tolist()):
                results[r] = (a, e)
    per_fact: list[dict[str, list[tuple[float, float]]]] = [{k: [] for k in SCORE_KINDS} for _ in facts]
    for r, (i, kind, _, _) in enumerate(rows):
        per_fact[i][kind].append(results[r])

    def mean(values: list[tuple[float, float]]) -> tuple[float, float] | None:
        if not values:
            return None
        return (sum(v[0] for v in values) / len(values), sum(v[1] for v in values) / len(values))

    return [FactScore(f.id, *(mean(per_fact[i][k]) for k in SCORE_KINDS)) for i, f in enumerate(facts)]


def to_zsre_record(fact: Fact) -> dict[str, str]:
    """The exported record of one fact (:data:`ZSRE_FIELDS`; the first paraphrase is the rephrase)."""
    return {
        "prompt": fact.prompt,
        "target_new": fact.counterfactual,
        "ground_truth": fact.answer,
        "rephrase_prompt": fact.paraphrases[0],
        "locality_prompt": fact.locality_prompt,
        "locality_ground_truth": fact.locality_answer,
        "subject": fact.subject,
    }


def _write_json_atomic(path: str, payload: Any) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, ensure_ascii=False, indent=1)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _means(scores: Sequence[FactScore], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind in SCORE_KINDS:
        values = [v for v in (getattr(s, kind) for s in scores) if v is not None]
        n = len(values)
        out[f"{prefix}/{kind}_acc"] = sum(v[0] for v in values) / n if n else float("nan")
        out[f"{prefix}/{kind}_em"] = sum(v[1] for v in values) / n if n else float("nan")
    return out


def build_fact_benchmark(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
    facts: Sequence[Fact] | None = None,
    batch_size: int = 32,
    device: Any = None,
) -> FactBenchmark:
    """Keep the facts a pretrained model answers correctly and export them in EasyEdit's ZsRE layout.

    Args:
        model_dir: a saved text-only model folder (e.g. ``odedit_hf.models.get_model("smollm2")``).
        out: the JSON file to write (a list of :data:`ZSRE_FIELDS` records, written atomically).
        threshold: keep a fact when its answer token accuracy at the edit prompt is at least this;
            ``1.0`` (default) = every answer token top-1 correct.
        prompt_format: ``"raw"`` (default), ``"chat"`` or ``"chat_prefill"``; see
            :mod:`odedit_hf.data.facts.prompting`. Edits on the written file must use the same format.
        facts: the facts to score; default the shipped set (:func:`~odedit_hf.data.facts.load_facts`).
        batch_size: samples per forward pass.
        device: where to run the model (default: where it loads, the CPU).

    Returns:
        A :class:`FactBenchmark` with the counts, the kept ids, mean pre-edit scores and timings.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"build_fact_benchmark: threshold must be in (0, 1], got {threshold!r}.")
    facts = list(load_facts() if facts is None else facts)
    if not facts:
        raise ValueError("build_fact_benchmark: no facts to score.")
    out_path = os.path.abspath(os.fspath(out))
    start = time.perf_counter()
    prompts = load_fact_prompts(model_dir, prompt_format, device=device)
    loaded = time.perf_counter()
    scores = score_facts(prompts, facts, batch_size=batch_size)
    scored = time.perf_counter()
    kept = [(f, s) for f, s in zip(facts, scores) if s.answer[0] >= threshold - 1e-9]
    _write_json_atomic(out_path, [to_zsre_record(f) for f, _ in kept])
    per_relation: dict[str, dict[str, int]] = {}
    for f, s in zip(facts, scores):
        row = per_relation.setdefault(f.relation, {"facts": 0, "kept": 0})
        row["facts"] += 1
        row["kept"] += int(s.answer[0] >= threshold - 1e-9)
    result = FactBenchmark(
        path=out_path,
        model_dir=os.path.abspath(os.fspath(model_dir)),
        prompt_format=prompt_format,
        threshold=float(threshold),
        facts_version=FACTS_VERSION,
        n_facts=len(facts),
        n_kept=len(kept),
        kept_ids=[f.id for f, _ in kept],
        per_relation=per_relation,
        means={**_means(scores, "all"), **_means([s for _, s in kept], "kept")},
        load_seconds=round(loaded - start, 2),
        score_seconds=round(scored - loaded, 2),
        scores=scores,
    )
    logger.info(
        "fact benchmark: kept %d of %d facts (%.3f) at threshold %.2f, %s prompts; wrote %s",
        result.n_kept,
        result.n_facts,
        result.kept_fraction,
        threshold,
        prompt_format,
        out_path,
    )
    return result

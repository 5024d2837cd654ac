"""The edit metrics as a Hugging Face ``evaluate`` metric (``evaluate`` is in the ``extras`` extra).

``evaluate`` compares predictions with references; the edit metrics fit that shape on the target tokens:

* ``kind="accuracy"`` (reliability, generality, portability): ``predictions`` are the top-1 token ids at
  the positions that predict the target tokens, ``references`` the target ids. Returns the mean
  per-sample **token accuracy** and **exact match** -- :func:`odedit_hf.evaluation.token_accuracy`.
* ``kind="locality"``: ``predictions`` are the post-edit top-1 ids on the answer positions, ``references``
  the pre-edit ones. Returns the mean per-sample **agreement** (locality, mode ``answer``) --
  :func:`odedit_hf.evaluation.answer_agreement`.

Each sample is one list of ids (its own length); the mean is over samples, as the protocols average.
The metric version is part of the result (``metric_version``), as in every results file::

    from odedit_hf.evaluation.hf_metric import EditMetric, answer_ids
    metric = EditMetric(kind="accuracy")
    preds, refs = answer_ids(logits, labels)        # from a teacher-forced forward pass
    metric.compute(predictions=preds, references=refs)
    # {'token_accuracy': 0.83, 'exact_match': 0.5, 'num_samples': 4, 'metric_version': '1.1'}

or, as a script, ``evaluate.load(odedit_hf.evaluation.hf_metric.__file__, "locality")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    import datasets
    import evaluate
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "odedit_hf.evaluation.hf_metric needs the evaluate package: pip install 'odedit-hf[extras]' "
        "(or pip install evaluate)"
    ) from exc

from odedit_hf.evaluation.metrics import METRIC_VERSION

__all__ = ["KINDS", "EditMetric", "answer_ids"]

KINDS = ("accuracy", "locality")

_DESCRIPTION = (
    "Knowledge-editing metrics of odedit-hf on the target tokens: token accuracy and exact match "
    "(reliability, generality, portability), or top-1 agreement with the pre-edit model (locality, "
    "answer mode)."
)
_KWARGS = """
Args:
    predictions: list of lists of int -- per sample, the top-1 ids at the positions that predict the
        target (accuracy) or answer (locality) tokens; the post-edit model's.
    references: list of lists of int -- per sample, the target ids (accuracy) or the pre-edit model's
        top-1 ids on the same positions (locality); the same length as the sample's predictions.
Returns:
    accuracy: token_accuracy, exact_match, num_samples, metric_version.
    locality: locality, num_samples, metric_version.
"""


def answer_ids(logits: Any, labels: Any) -> tuple[list[list[int]], list[list[int]]]:
    """The top-1 ids and the labels at the labelled positions of a teacher-forced batch, per sample
    (logits at ``t`` predict ``labels[t + 1]``, the library's convention)."""
    from odedit_hf.backbones import IGNORE_INDEX, shift_logits_labels

    shifted_logits, shifted_labels = shift_logits_labels(logits, labels)
    top1 = shifted_logits.argmax(dim=-1)
    preds, refs = [], []
    for row_pred, row_label in zip(top1, shifted_labels, strict=True):
        mask = row_label != IGNORE_INDEX
        preds.append(row_pred[mask].tolist())
        refs.append(row_label[mask].tolist())
    return preds, refs


class EditMetric(evaluate.Metric):
    """``evaluate.Metric`` of the edit metrics; ``config_name`` (or ``kind=``) is ``accuracy`` or ``locality``."""

    def __init__(self, config_name: str | None = None, *, kind: str | None = None, **kwargs: Any) -> None:
        name = kind or config_name or "accuracy"
        if name not in KINDS:
            raise ValueError(f"EditMetric: kind must be one of {KINDS}, got {name!r}")
        super().__init__(config_name=name, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> dict:
        if len(predictions) == 0:
            raise ValueError("EditMetric: no samples")
        scores, exact = [], []
        for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
            if len(pred) != len(ref) or len(ref) == 0:
                raise ValueError(
                    f"EditMetric: sample {i} has {len(pred)} predictions and {len(ref)} references; each sample "
                    "needs the same, non-zero number of ids (answer_ids(logits, labels) builds them)"
                )
            hits = sum(int(a == b) for a, b in zip(pred, ref, strict=True))
            scores.append(hits / len(ref))
            exact.append(float(hits == len(ref)))
        n = len(scores)
        if self.config_name == "locality":
            return {"locality": sum(scores) / n, "num_samples": n, "metric_version": METRIC_VERSION}
        return {
            "token_accuracy": sum(scores) / n,
            "exact_match": sum(exact) / n,
            "num_samples": n,
            "metric_version": METRIC_VERSION,
        }

"""The edit metrics as an ``evaluate`` metric agree with the library's own metric functions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("evaluate", reason="the evaluate metric needs the extras extra")

from odedit_hf.evaluation import answer_agreement, token_accuracy  # noqa: E402
from odedit_hf.evaluation.hf_metric import EditMetric, answer_ids  # noqa: E402


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 7, 11, generator=g)
    labels = torch.full((5, 7), -100)
    for i, (lo, hi) in enumerate([(2, 4), (1, 6), (3, 7), (5, 7), (0, 2)]):
        labels[i, lo:hi] = torch.randint(0, 11, (hi - lo,), generator=g)
    # make sample 3 exactly right so exact match is not trivially 0
    shifted = labels[3, 1:]
    top = logits[3, :-1].argmax(-1)
    labels[3, 1:] = torch.where(shifted != -100, top, shifted)
    return logits, labels


def test_accuracy_matches_token_accuracy():
    logits, labels = _batch(0)
    preds, refs = answer_ids(logits, labels)
    got = EditMetric(kind="accuracy").compute(predictions=preds, references=refs)
    acc, exact = token_accuracy(logits, labels)
    assert got["token_accuracy"] == pytest.approx(float(acc.mean()))
    assert got["exact_match"] == pytest.approx(float(exact.mean())) and got["exact_match"] > 0
    assert got["num_samples"] == 5 and got["metric_version"]


def test_locality_matches_answer_agreement():
    post, labels = _batch(1)
    pre = post.clone()
    pre[:, :, 0] += 3.0  # changes some top-1 predictions, not all
    post_ids, _ = answer_ids(post, labels)
    pre_ids, _ = answer_ids(pre, labels)
    got = EditMetric(kind="locality").compute(predictions=post_ids, references=pre_ids)
    want = float(answer_agreement(pre, post, labels).mean())
    assert got["locality"] == pytest.approx(want) and 0.0 < want < 1.0


def test_evaluate_load_reads_the_module_as_a_metric_script():
    import evaluate

    from odedit_hf.evaluation import hf_metric

    metric = evaluate.load(hf_metric.__file__, "locality")
    assert metric.compute(predictions=[[1, 2], [3]], references=[[1, 0], [3]])["locality"] == pytest.approx(
        0.75
    )


def test_bad_input_says_which_sample():
    with pytest.raises(ValueError, match="sample 1 has 2 predictions and 1 references"):
        EditMetric().compute(predictions=[[1], [1, 2]], references=[[1], [1]])
    with pytest.raises(ValueError, match="kind must be one of"):
        EditMetric(kind="bleu")

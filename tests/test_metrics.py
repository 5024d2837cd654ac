"""Metric functions on hand-made logits whose right answers are known."""

from __future__ import annotations

import pytest
import torch

from odedit_hf.evaluation.metrics import (
    EASYEDIT_IMAGE_TOPK,
    answer_agreement,
    answer_top1,
    easyedit_agreement,
    group_scores,
    token_accuracy,
    topk_ids,
)

V = 12
IGN = -100


def one_hot_logits(ids: list[list[int]], vocab: int = V) -> torch.Tensor:
    """Logits (B, T, V) whose top-1 at [b, t] is ids[b][t], with a fixed, distinct order below it."""
    t = torch.tensor(ids)
    base = torch.linspace(0.0, 1.0, vocab).expand(*t.shape, vocab).clone()  # ties never happen
    return base.scatter(-1, t.unsqueeze(-1), 10.0)


def test_token_accuracy_known_answers():
    # sample 0: targets at positions 2, 3 (predicted from positions 1, 2), both right
    # sample 1: targets at positions 1, 2, 3; the prediction for position 2 is wrong
    labels = torch.tensor([[IGN, IGN, 5, 6], [IGN, 7, 8, 9]])
    preds = [[0, 5, 6, 0], [7, 4, 9, 0]]  # logits at t predict labels[t + 1]
    acc, em = token_accuracy(one_hot_logits(preds), labels)
    assert acc.tolist() == pytest.approx([1.0, 2 / 3])
    assert em.tolist() == [1.0, 0.0]


def test_token_accuracy_ignores_positions_outside_the_target():
    labels = torch.tensor([[IGN, IGN, 3, IGN]])  # one target token; padding after it
    right = one_hot_logits([[1, 3, 9, 9]])
    wrong_elsewhere = one_hot_logits([[9, 3, 1, 1]])
    assert token_accuracy(right, labels)[0].item() == 1.0
    assert token_accuracy(wrong_elsewhere, labels)[0].item() == 1.0
    assert token_accuracy(one_hot_logits([[1, 4, 9, 9]]), labels)[1].item() == 0.0


def test_token_accuracy_rejects_samples_without_target_and_bad_shapes():
    with pytest.raises(ValueError, match="no labelled target token"):
        token_accuracy(
            one_hot_logits([[1, 2, 3]]), torch.tensor([[5, IGN, IGN]])
        )  # label only at t=0: lost by the shift
    with pytest.raises(ValueError, match="same B and T"):
        token_accuracy(torch.zeros(1, 3, V), torch.zeros(1, 4, dtype=torch.long))


def test_answer_agreement_counts_only_answer_positions():
    labels = torch.tensor([[IGN, IGN, IGN, 4, 5]])  # answer tokens at 3, 4 -> predicted from positions 2, 3
    pre = one_hot_logits([[1, 2, 3, 4, 5]])
    post_prompt_changed = one_hot_logits(
        [[9, 9, 3, 4, 0]]
    )  # positions 0, 1, 4 differ: none predicts an answer
    post_one_answer_changed = one_hot_logits([[1, 2, 3, 7, 5]])  # position 3 differs
    assert answer_agreement(pre, post_prompt_changed, labels).item() == 1.0
    assert answer_agreement(pre, post_one_answer_changed, labels).item() == 0.5
    # agreement, not correctness: both models wrong in the same way still agree
    assert answer_agreement(pre, pre.clone(), labels).item() == 1.0


def test_answer_agreement_accepts_precomputed_ids():
    labels = torch.tensor([[IGN, 4, 5, 6], [IGN, IGN, 2, IGN]])
    pre = one_hot_logits([[4, 5, 6, 0], [0, 2, 1, 1]])
    post = one_hot_logits([[4, 0, 6, 0], [0, 2, 3, 3]])
    from_logits = answer_agreement(pre, post, labels)
    from_ids = answer_agreement(topk_ids(pre, EASYEDIT_IMAGE_TOPK), post, labels)
    assert from_logits.tolist() == pytest.approx([2 / 3, 1.0])
    assert torch.equal(from_logits, from_ids)


def test_easyedit_agreement_top1_over_all_real_positions():
    pre = one_hot_logits([[1, 2, 3, 4]])
    post = one_hot_logits([[1, 2, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0]])  # last position is padding
    assert easyedit_agreement(pre, post, mask, k=1).item() == pytest.approx(2 / 3)
    assert easyedit_agreement(pre, post, torch.ones(1, 4, dtype=torch.long), k=1).item() == pytest.approx(0.5)


def test_easyedit_agreement_is_element_wise_top_k():
    # Same top-10 set at the one position, but slots 1 and 2 swapped: element-wise comparison sees 8 of 10 equal.
    pre = torch.arange(V, dtype=torch.float32).flip(0).view(1, 1, V).clone()  # order 0, 1, 2, ..., 11
    post = pre.clone()
    post[0, 0, 1], post[0, 0, 2] = pre[0, 0, 2], pre[0, 0, 1]
    mask = torch.ones(1, 1, dtype=torch.long)
    assert easyedit_agreement(pre, post, mask, k=10).item() == pytest.approx(0.8)
    assert easyedit_agreement(pre, post, mask, k=1).item() == 1.0
    # a change below the top 10 does not count
    post2 = pre.clone()
    post2[0, 0, 10], post2[0, 0, 11] = pre[0, 0, 11], pre[0, 0, 10]
    assert easyedit_agreement(pre, post2, mask, k=10).item() == 1.0


def test_easyedit_agreement_checks_inputs():
    pre = one_hot_logits([[1, 2]])
    with pytest.raises(ValueError, match="no non-padding"):
        easyedit_agreement(pre, pre, torch.zeros(1, 2, dtype=torch.long), k=1)
    with pytest.raises(ValueError, match="precomputed ids"):
        easyedit_agreement(topk_ids(pre, 1), pre, torch.ones(1, 2, dtype=torch.long), k=10)
    with pytest.raises(ValueError, match="k must lie"):
        topk_ids(pre, V + 1)


def test_metrics_per_sample_in_a_batch_and_random_cross_check():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, V, generator=gen)
    labels = torch.full((3, 7), IGN)
    labels[0, 4:] = torch.tensor([1, 2, 3])
    labels[1, 6] = 5
    labels[2, 1:6] = torch.tensor([0, 1, 2, 3, 4])
    acc, em = token_accuracy(logits, labels)
    for b in range(3):  # the definition, written out by hand
        pos = (labels[b, 1:] != IGN).nonzero().flatten()
        right = [(logits[b, t].argmax() == labels[b, t + 1]).item() for t in pos.tolist()]
        assert acc[b].item() == pytest.approx(sum(right) / len(right))
        assert em[b].item() == float(all(right))


def test_group_scores_portability_and_unit_consistency_by_hand():
    # three members: targets of 2, 1 and 3 tokens; member 0 right, member 1 wrong, member 2 right on 2 of 3
    labels = torch.tensor([[IGN, IGN, 5, 6], [IGN, IGN, IGN, 7], [IGN, 8, 9, 10]])
    preds = [[0, 5, 6, 0], [0, 0, 3, 0], [8, 9, 1, 0]]
    acc, em = token_accuracy(one_hot_logits(preds), labels)
    assert acc.tolist() == pytest.approx([1.0, 0.0, 2 / 3]) and em.tolist() == [1.0, 0.0, 0.0]
    mean_acc, mean_em, consistency = group_scores(acc, em)
    assert mean_acc == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)  # portability (token accuracy), 0.5556
    assert mean_em == pytest.approx(1 / 3)  # portability EM
    assert consistency == 0.0  # not every member exactly right
    # all members exactly right -> consistency 1; one miss anywhere -> 0, whatever the mean
    right = torch.tensor([[IGN, IGN, 5, 6], [IGN, IGN, IGN, 7], [IGN, 8, 9, 10]])
    acc, em = token_accuracy(one_hot_logits([[0, 5, 6, 0], [0, 0, 7, 0], [8, 9, 10, 0]]), right)
    assert group_scores(acc, em) == (1.0, 1.0, 1.0)
    acc, em = torch.tensor([1.0, 1.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert group_scores(acc, em) == pytest.approx((0.875, 0.75, 0.0))
    with pytest.raises(ValueError, match="N >= 1"):
        group_scores(torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        group_scores(torch.ones(2), torch.ones(3))


def test_answer_top1_is_the_argmax_as_one_slot_and_serves_answer_agreement():
    pre = one_hot_logits([[4, 5, 6, 0], [0, 2, 1, 3]])
    ids = answer_top1(pre)
    assert ids.shape == (2, 4, 1) and ids.dtype == torch.int64
    assert ids[..., 0].tolist() == [[4, 5, 6, 0], [0, 2, 1, 3]]
    labels = torch.tensor([[IGN, 4, 5, 6], [IGN, IGN, 2, IGN]])
    post = one_hot_logits([[4, 0, 6, 0], [0, 2, 3, 3]])
    assert torch.equal(answer_agreement(ids, post, labels), answer_agreement(pre, post, labels))


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_metric_errors_name_the_function_the_shapes_and_the_fix():
    # each message pinned whole: the function it comes from, the shapes seen, what to do
    # (issue 20: mutation survivors of metrics.py)
    long = torch.long
    # 2-D logits with labels of the same (B, T): refused for the logits alone
    assert _message(token_accuracy, torch.zeros(1, 4), torch.zeros(1, 4, dtype=long)) == (
        "token_accuracy: expected logits (B, T, V) and labels (B, T) with the same B and T, "
        "got logits (1, 4) and labels (1, 4)"
    )
    assert _message(token_accuracy, torch.zeros(1, 3, 0), torch.zeros(1, 3, dtype=long)) == (
        "token_accuracy: the logits have an empty vocabulary dimension (shape (1, 3, 0))"
    )
    no_target = torch.tensor([[IGN, IGN, 3], [5, IGN, IGN]])  # sample 1's only label is lost by the shift
    hint = "build batches with Backbone.build_batch, whose labels cover the target tokens"
    assert _message(token_accuracy, one_hot_logits([[1, 2, 3], [1, 2, 3]]), no_target) == (
        f"token_accuracy: samples [1] have no labelled target token after the shift; {hint}"
    )
    # answer_agreement
    pre = one_hot_logits([[1, 2, 3, 4]])
    labels = torch.tensor([[IGN, IGN, 3, 4]])
    assert _message(answer_agreement, pre, pre, torch.zeros(1, 3, dtype=long)) == (
        "answer_agreement: expected logits (B, T, V) and labels (B, T) with the same B and T, "
        "got logits (1, 4, 12) and labels (1, 3)"
    )
    assert _message(answer_agreement, pre[:, :3], pre, labels) == (
        "answer_agreement: pre (1, 3, 12) and post (1, 4, 12) differ in (B, T)"
    )
    assert _message(answer_agreement, torch.zeros(1, 4, 0, dtype=long), pre, labels) == (
        "answer_agreement: precomputed ids must be (B, T, >= 1), got shape (1, 4, 0)"
    )
    assert _message(answer_agreement, pre, pre, torch.tensor([[4, IGN, IGN, IGN]])) == (
        f"answer_agreement: samples [0] have no labelled target token after the shift; {hint}"
    )
    # easyedit_agreement
    mask = torch.ones(1, 4, dtype=long)
    assert _message(easyedit_agreement, pre, pre, torch.ones(1, 3, dtype=long), k=1) == (
        "easyedit_agreement: expected post_logits (B, T, V) and attention_mask (B, T), got "
        "(1, 4, 12) and (1, 3)"
    )
    assert _message(easyedit_agreement, pre[:, :3], pre, mask, k=1) == (
        "easyedit_agreement: pre (1, 3, 12) and post (1, 4, 12) differ in (B, T)"
    )
    assert _message(easyedit_agreement, topk_ids(pre, 1), pre, mask, k=10) == (
        "easyedit_agreement: precomputed ids must be (B, T, >= 10), got shape (1, 4, 1)"
    )
    # one sample all padding is refused even when the other has real positions
    two = one_hot_logits([[1, 2], [3, 4]])
    assert _message(easyedit_agreement, two, two, torch.tensor([[1, 1], [0, 0]]), k=1) == (
        "easyedit_agreement: a sample has no non-padding position"
    )
    # topk_ids: V (12) differs from T (4), so the bound names the vocabulary size
    assert _message(topk_ids, torch.zeros(2, 3), 1) == "topk_ids: expected logits (B, T, V), got shape (2, 3)"
    assert _message(topk_ids, pre, V + 1) == "topk_ids: k must lie in [1, V=12], got 13"
    assert _message(topk_ids, pre, 0) == "topk_ids: k must lie in [1, V=12], got 0"

"""Edit metrics as plain functions on logits (teacher-forced, one forward pass, shifted logits).

Reliability and both generalities are **token accuracy** over the target tokens, with **exact
match** (every target token right) beside it. Locality is the **agreement** of the post-edit model
with the pre-edit model, in two modes that are always reported together:

* ``answer`` — top-1 agreement on the positions that predict the answer tokens only (the target of
  a locality sample is ``loc_ans`` / ``m_loc_a``). Agreement on the prompt positions says little
  about the fact, so this is the honest mode.
* ``easyedit`` — element-wise top-k agreement over every non-padding position of the unshifted
  logits (prompt, image placeholders and answer), ``k = 1`` for text locality and ``k = 10`` for
  multimodal locality, as EasyEdit computes it; comparable with published tables.

The optional probes reuse these: portability is token accuracy (and exact match) on each probe's new
target, hard-negative locality is the same two agreements on a look-alike's sample, and a knowledge unit
is scored by :func:`group_scores` — its mean token accuracy and its *consistency*, 1.0 only when every
member of the unit is exactly right.

Shapes: ``logits (B, T, V)``, ``labels (B, T)`` with ``-100`` at unlabelled positions (the
``build_batch`` convention); every function returns one value per sample, ``(B,)`` float32, except
:func:`group_scores`, which reduces one group of samples.
"""

from __future__ import annotations

import math

import torch

from odedit_hf.backbones import IGNORE_INDEX, shift_logits_labels

__all__ = [
    "EASYEDIT_IMAGE_TOPK",
    "EASYEDIT_TEXT_TOPK",
    "METRIC_VERSION",
    "answer_agreement",
    "answer_top1",
    "easyedit_agreement",
    "group_scores",
    "token_accuracy",
    "topk_ids",
]

#: Bumped whenever a metric's definition changes, so result files from different definitions are never mixed.
#: 1.1: the optional probe metrics (portability, hard-negative locality, knowledge-unit consistency) added;
#: the ten metrics of 1.0 unchanged. 1.2: text-only requests (ZsRE / CounterFact) scored: their multimodal
#: scores absent, their locality prompt fed with the request's task; multimodal requests unchanged.
METRIC_VERSION = "1.2"
#: EasyEdit's k for text locality (top-1) and multimodal locality (element-wise top-10).
EASYEDIT_TEXT_TOPK = 1
EASYEDIT_IMAGE_TOPK = 10


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"{where}: expected logits (B, T, V) and labels (B, T) with the same B and T, "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(
            f"{where}: the logits have an empty vocabulary dimension (shape {tuple(logits.shape)})"
        )


def _answer_mask(shifted_labels: torch.Tensor, where: str) -> torch.Tensor:
    mask = shifted_labels != IGNORE_INDEX
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{where}: samples {empty} have no labelled target token after the shift; "
            "build batches with Backbone.build_batch, whose labels cover the target tokens"
        )
    return mask


@torch.no_grad()
def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample token accuracy and exact match of the top-1 predictions on the target tokens.

    Args:
        logits: ``(B, T, V)`` logits of a teacher-forced forward pass.
        labels: ``(B, T)``; target token ids, ``-100`` elsewhere. Logits at ``t`` predict ``labels[t + 1]``.

    Returns:
        ``(accuracy, exact_match)``, each ``(B,)`` float32: the fraction of target tokens whose
        top-1 prediction is right, and 1.0 where all of them are.
    """
    _check_logits_labels(logits, labels, "token_accuracy")
    shifted_logits, shifted_labels = shift_logits_labels(logits, labels)
    mask = _answer_mask(shifted_labels, "token_accuracy")
    correct = (shifted_logits.argmax(dim=-1) == shifted_labels) & mask
    n_target = mask.sum(dim=1)
    n_correct = correct.sum(dim=1)
    accuracy = n_correct.float() / n_target.float()
    exact = (n_correct == n_target).float()
    return accuracy, exact


@torch.no_grad()
def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest logits at every position, ``(B, T, k)`` int64, best first.

    Top-k of the logits equals top-k of the softmax (softmax is monotonic), so no softmax is taken.
    """
    if logits.dim() != 3:
        raise ValueError(f"topk_ids: expected logits (B, T, V), got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"topk_ids: k must lie in [1, V={logits.shape[-1]}], got {k}")
    return logits.topk(k, dim=-1).indices


def _ids(pre: torch.Tensor, k: int, where: str) -> torch.Tensor:
    """Top-k ids from logits (floating) or already-computed ids (integer, last dim >= k)."""
    if pre.is_floating_point():
        return topk_ids(pre, k)
    if pre.dim() != 3 or pre.shape[-1] < k:
        raise ValueError(f"{where}: precomputed ids must be (B, T, >= {k}), got shape {tuple(pre.shape)}")
    return pre[..., :k]


@torch.no_grad()
def answer_top1(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 ids ``(B, T, 1)``: what :func:`answer_agreement` needs of the pre-edit model."""
    return topk_ids(logits, 1)


@torch.no_grad()
def answer_agreement(pre: torch.Tensor, post_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Locality, mode ``answer``: top-1 agreement of post- and pre-edit on the answer positions.

    Args:
        pre: pre-edit logits ``(B, T, V)``, or their top-k ids ``(B, T, k >= 1)`` (saves memory when
            the pre-edit outputs are kept for later, as the sequential protocol does).
        post_logits: post-edit logits ``(B, T, V)`` of the same batch.
        labels: ``(B, T)``; the answer tokens (``loc_ans`` / ``m_loc_a``), ``-100`` elsewhere.

    Returns:
        ``(B,)`` float32: the fraction of positions predicting an answer token where both models'
        top-1 predictions agree (whether or not either is the answer).
    """
    _check_logits_labels(post_logits, labels, "answer_agreement")
    if tuple(pre.shape[:2]) != tuple(post_logits.shape[:2]):
        raise ValueError(
            f"answer_agreement: pre {tuple(pre.shape)} and post {tuple(post_logits.shape)} differ in (B, T)"
        )
    # top-1 through topk on both sides, so that exact ties break the same way for pre and post
    pre_top1 = _ids(pre, 1, "answer_agreement")[:, :-1, 0]
    post_top1 = topk_ids(post_logits, 1)[:, :-1, 0]
    mask = _answer_mask(labels[:, 1:], "answer_agreement")
    agree = (pre_top1 == post_top1) & mask
    return agree.sum(dim=1).float() / mask.sum(dim=1).float()


@torch.no_grad()
def easyedit_agreement(
    pre: torch.Tensor, post_logits: torch.Tensor, attention_mask: torch.Tensor, *, k: int
) -> torch.Tensor:
    """Locality, mode ``easyedit``: element-wise top-k agreement over all non-padding positions.

    At each position the ``k`` best token ids of both models are compared slot by slot (slot ``j`` of
    pre with slot ``j`` of post), as EasyEdit does; the score is the fraction of equal slots.

    Args:
        pre: pre-edit logits ``(B, T, V)`` or their top-k ids ``(B, T, k' >= k)``.
        post_logits: post-edit logits ``(B, T, V)``.
        attention_mask: ``(B, T)``, 1 at real tokens, 0 at padding.
        k: 1 for text locality, 10 for multimodal locality (:data:`EASYEDIT_TEXT_TOPK`,
            :data:`EASYEDIT_IMAGE_TOPK`).

    Returns:
        ``(B,)`` float32 agreement in ``[0, 1]``.
    """
    if post_logits.dim() != 3 or tuple(attention_mask.shape) != tuple(post_logits.shape[:2]):
        raise ValueError(
            f"easyedit_agreement: expected post_logits (B, T, V) and attention_mask (B, T), got "
            f"{tuple(post_logits.shape)} and {tuple(attention_mask.shape)}"
        )
    if tuple(pre.shape[:2]) != tuple(post_logits.shape[:2]):
        raise ValueError(
            f"easyedit_agreement: pre {tuple(pre.shape)} and post {tuple(post_logits.shape)} differ in (B, T)"
        )
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("easyedit_agreement: a sample has no non-padding position")
    pre_ids = _ids(pre, k, "easyedit_agreement")
    post_ids = topk_ids(post_logits, k)
    equal = (pre_ids == post_ids).float().mean(dim=-1)  # (B, T): fraction of the k slots that agree
    return (equal * mask).sum(dim=1) / mask.sum(dim=1).float()


def group_scores(accuracy: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """Reduce the per-sample scores of one group (a request's portability probes or its knowledge unit).

    Args:
        accuracy: ``(N,)`` token accuracy of each member (:func:`token_accuracy`).
        exact: ``(N,)`` their exact match, 0.0 or 1.0.

    Returns:
        ``(mean accuracy, mean exact match, consistency)``: consistency is 1.0 when every member is
        exactly right, else 0.0.
    """
    if accuracy.dim() != 1 or tuple(accuracy.shape) != tuple(exact.shape) or accuracy.numel() == 0:
        raise ValueError(
            f"group_scores: expected two (N,) tensors with N >= 1, got {tuple(accuracy.shape)} and "
            f"{tuple(exact.shape)}"
        )
    mean_acc = math.fsum(accuracy.double().tolist()) / accuracy.numel()
    mean_em = math.fsum(exact.double().tolist()) / exact.numel()
    return mean_acc, mean_em, float(bool((exact == 1.0).all()))

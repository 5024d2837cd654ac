"""ODEdit's risks: ``R_rel`` (reliability), ``R_loc`` (locality), ``R_gen`` (generality).

Plain functions on tensors (tested against hand-computed values). The prompts of the three
environments come from the shared environment batches (:mod:`odedit_hf.editing.environments`):

- in-distribution: the ``edit`` group                                    (``R_rel``)
- semantic neighbours: the ``rephrase`` and ``image_rephrase`` groups    (``R_gen``)
- out-of-distribution: the ``loc`` and ``m_loc`` groups                  (``R_loc``)
  (+ ``hard_loc`` / ``hard_m_loc`` with ``hard_negatives``)

Every per-token quantity comes from :mod:`odedit_kernels` (``nll_with_omega``, ``kl_with_omega``,
``rbf_mmd``), which also returns the IRM ω-derivative of each row in the same pass.

Choices, documented once:

- ``R_rel`` is the mean NLL over the target tokens of all edit prompts (each token weighs the same),
  exactly :func:`odedit_hf.editing.nll_from_logits`, the loss of the plain editors.
- ``R_loc`` is the mean over rows of KL(pre || post); a row is a position predicting an answer token
  of ``loc_ans`` / ``m_loc_a`` (``loc_positions="answer"``) or any text position (``"all"``). The
  pre-edit logits come from one pass with the adapter disabled, before the first step.
- ``R_gen``: per request and rephrase kind, MMD^2 between the last-layer hidden states of the edit
  prompt and those of its rephrases, at the positions that predict the target tokens
  (``gen_positions="answer"``: the last prompt token and all target tokens but the last; these are
  the states whose next-token predictions must agree for the edit to generalise) or only at the last
  prompt token (``"last_prompt"``); averaged over requests and kinds. Bandwidths: multiples of the
  median pairwise distance among the pre-edit samples of the request, fixed for the whole edit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from odedit_hf.editing.environments import GROUPS, IGNORE_INDEX, EditBatch, GroupOutput

from .config import IRM_ENVIRONMENTS, REPHRASE_KINDS

if TYPE_CHECKING:
    from .config import ODEditConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ENVIRONMENTS",
    "PreEditState",
    "answer_rows",
    "gen_samples",
    "generality_risk",
    "locality_risk",
    "locality_rows",
    "median_bandwidths",
    "needed_groups",
    "reliability_risk",
    "reliability_risk_rows",
]

#: IRM environments and the groups that make each.
ENVIRONMENTS: dict[str, tuple[str, ...]] = dict(
    zip(IRM_ENVIRONMENTS, (("edit",), REPHRASE_KINDS, ("loc", "m_loc")), strict=True)
)


# ----------------------------------------------------------------------------------------------------
# Risk terms on tensors
# ----------------------------------------------------------------------------------------------------


def answer_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits rows that predict target tokens, and those tokens.

    Args:
        logits: ``(B, T, V)``; logits at ``t`` predict ``labels[t + 1]``.
        labels: ``(B, T)``, ``-100`` except at target tokens.

    Returns:
        ``(rows (N, V), targets (N,))`` in row-major order, N = number of target tokens.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"answer_rows: expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    if not bool(mask.any()):
        raise ValueError("answer_rows: no labelled target token; build the batch with Backbone.build_batch")
    return logits[:, :-1][mask], shifted_labels[mask]


def reliability_risk(
    logits: torch.Tensor, labels: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``R_rel`` = mean NLL of the target tokens, and its mean ω-derivative (the IRM gradient).

    Args:
        logits: ``(B, T, V)`` post-edit logits of the edit prompts.
        labels: ``(B, T)`` with the target tokens (``-100`` elsewhere).
        backend: kernel backend.

    Returns:
        ``(R_rel, dR_rel/domega)``, two 0-dim tensors differentiable w.r.t. ``logits``.
    """
    rows, targets = answer_rows(logits, labels)
    return reliability_risk_rows(rows, targets, backend=backend)


def reliability_risk_rows(
    rows: torch.Tensor, targets: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reliability_risk` on the answer rows already gathered (``(N, V)`` logits, ``(N,)`` targets)."""
    from odedit_kernels import nll_with_omega

    nll, domega = nll_with_omega(rows, targets, ignore_index=IGNORE_INDEX, backend=backend)
    return nll.mean(), domega.mean()


def locality_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """The logits rows that ``R_loc`` compares: ``(N, V)``.

    ``mode="answer"``: positions predicting the answer tokens. ``mode="all"``: every position whose
    own token and next token are real text (not padding, not image placeholders).
    """
    if mode == "answer":
        return answer_rows(logits, labels)[0]
    if mode != "all":
        raise ValueError(f"locality_rows: mode must be 'answer' or 'all', got {mode!r}")
    text = attention_mask.bool()
    if image_mask is not None:
        text = text & ~image_mask.bool()
    mask = text[:, :-1] & text[:, 1:]
    if not bool(mask.any()):
        raise ValueError("locality_rows: no text position to compare; is the prompt empty?")
    return logits[:, :-1][mask]


def locality_risk(
    pre_rows: torch.Tensor, post_rows: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``R_loc`` = mean over rows of KL(softmax(pre) || softmax(post)), and the mean ω-derivative.

    Args:
        pre_rows: ``(N, V)`` pre-edit logits (constants).
        post_rows: ``(N, V)`` post-edit logits at the same positions.

    Returns:
        ``(R_loc, dR_loc/domega)``, 0-dim tensors differentiable w.r.t. ``post_rows``.
    """
    from odedit_kernels import kl_with_omega

    if pre_rows.shape != post_rows.shape:
        raise ValueError(
            f"locality_risk: pre-edit rows {tuple(pre_rows.shape)} and post-edit rows {tuple(post_rows.shape)} "
            "differ; the pre-edit pass must see the very same batch"
        )
    kl, domega = kl_with_omega(pre_rows.detach().to(post_rows.dtype), post_rows, backend=backend)
    return kl.mean(), domega.mean()


def gen_samples(hidden: torch.Tensor, labels: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The MMD samples of each row of a batch: ``[(n_i, H)]``, one tensor per row.

    Args:
        hidden: ``(B, T, H)`` last-layer hidden states.
        labels: ``(B, T)`` target labels (``-100`` elsewhere).
        mode: ``"answer"`` (states at the positions predicting target tokens) or ``"last_prompt"``
            (the state of the last prompt token only).
    """
    if mode not in ("answer", "last_prompt"):
        raise ValueError(f"gen_samples: mode must be 'answer' or 'last_prompt', got {mode!r}")
    mask = labels[:, 1:] != IGNORE_INDEX
    states = hidden[:, :-1]
    out = []
    for row in range(hidden.shape[0]):
        positions = mask[row].nonzero().flatten()
        if positions.numel() == 0:
            raise ValueError(f"gen_samples: row {row} has no target token")
        if mode == "last_prompt":
            positions = positions[:1]
        out.append(states[row, positions])
    return out


def median_bandwidths(samples: Sequence[torch.Tensor], multipliers: Sequence[float]) -> tuple[float, ...]:
    """Bandwidths ``c_q * median pairwise distance`` of the pooled samples (the median heuristic).

    A zero median (all samples equal) falls back to the mean sample norm, then to 1.0, so that the
    bandwidths stay valid.
    """
    pooled = torch.cat([s.detach().float().reshape(-1, s.shape[-1]) for s in samples], dim=0)
    median = 0.0
    if pooled.shape[0] >= 2:
        d = torch.cdist(pooled, pooled)
        upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
        median = float(upper.median())
    if not math.isfinite(median) or median <= 0.0:
        median = float(pooled.norm(dim=-1).mean())
    if not math.isfinite(median) or median <= 0.0:
        median = 1.0
    return tuple(float(c) * median for c in multipliers)


def generality_risk(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[float]]], *, backend: str = "auto"
) -> torch.Tensor:
    """``R_gen`` = mean over ``(x, y, sigmas)`` pairs of the multi-scale RBF MMD^2 between ``x`` and ``y``.

    Args:
        pairs: ``(x (n, H), y (m, H), sigmas)`` — the edit prompt's samples, one rephrase kind's samples
            and the bandwidths, for each request and kind.
    """
    from odedit_kernels import rbf_mmd

    if not pairs:
        raise ValueError("generality_risk: no (edit, rephrase) pair; enable a rephrase kind")
    values = [rbf_mmd(x, y.to(x.dtype), tuple(sigmas), backend=backend) for x, y, sigmas in pairs]
    return torch.stack(values).mean()


def needed_groups(config: ODEditConfig) -> tuple[str, ...]:
    """The prompt groups a step computes under ``config`` (the penalty needs every environment)."""
    groups = ["edit"]
    if config.gen_risk or config.irm_penalty:
        groups += list(config.rephrase_kinds)
    if config.loc_risk or config.irm_penalty:
        groups += ["loc", "m_loc"]
        if config.hard_negatives:
            groups += ["hard_loc", "hard_m_loc"]
    return tuple(g for g in GROUPS if g in groups)


@dataclass
class PreEditState:
    """What ODEdit measures once per edit on the pre-edit model (adapter disabled).

    Attributes:
        loc_rows: group (``loc``, ``m_loc``) -> pre-edit logits rows ``(N, V)`` (detached).
        bandwidths: request index -> MMD bandwidths.
    """

    loc_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    bandwidths: dict[int, tuple[float, ...]] = field(default_factory=dict)


def gen_pairs(
    outputs: Mapping[str, GroupOutput],
    edit_batch: EditBatch,
    config: ODEditConfig,
    bandwidths: Mapping[int, Sequence[float]] | None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, Sequence[float]]], dict[int, list[torch.Tensor]]]:
    """The ``(x, y, sigmas)`` pairs of ``R_gen`` and, per request, all its samples (for bandwidths)."""
    edit = outputs["edit"]
    xs = edit.answer_hidden_per_row(config.gen_positions)
    per_request: dict[int, list[torch.Tensor]] = {i: [x] for i, x in enumerate(xs)}
    ys: dict[tuple[int, str], list[torch.Tensor]] = {}
    for kind in (k for k in config.rephrase_kinds if k in outputs):  # text-only batches: no image rephrases
        group = outputs[kind]
        for owner, y in zip(edit_batch.owners[kind], group.answer_hidden_per_row(config.gen_positions)):
            ys.setdefault((owner, kind), []).append(y)
            per_request[owner].append(y)
    pairs = []
    for (owner, _kind), y_list in ys.items():
        sigmas = config.mmd_bandwidths or (bandwidths or {}).get(owner)
        x = xs[owner].detach() if config.gen_anchor_edit else xs[owner]
        pairs.append((x, torch.cat(y_list, dim=0), sigmas))
    return pairs, per_request

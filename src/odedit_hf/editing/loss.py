"""The shared edit loss: mean NLL of the target tokens under teacher forcing.

Every editor and ODEdit's ``R_rel`` use this one function; the per-token NLL comes from
:func:`odedit_kernels.nll_with_omega` (fused Triton on CUDA, the pure-torch reference on CPU) so the
math lives once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from odedit_hf.backbones import Backbone

__all__ = ["LossFn", "model_inputs", "nll_from_logits", "target_nll"]

#: A pluggable edit loss: ``(model, backbone, batch) -> scalar tensor``; ``batch`` comes from
#: ``Backbone.build_batch`` (its ``labels`` mark the target tokens).
LossFn = Callable[["nn.Module", "Backbone", Mapping[str, torch.Tensor]], torch.Tensor]


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without ``labels``: the model then skips its own loss (a second pass over B×T×V)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the labelled target tokens of a batch (logits at ``t`` predict ``labels[t + 1]``).

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, ``-100`` at unlabelled positions.

    Returns:
        A scalar float32 tensor, differentiable w.r.t. ``logits``: the sum of the per-token NLL over
        all target tokens of the batch, divided by their number (each token weighs the same).
    """
    from odedit_hf.backbones import IGNORE_INDEX, shift_logits_labels
    from odedit_kernels import nll_with_omega

    shifted_logits, shifted_labels = shift_logits_labels(logits, labels)
    n_tokens = int((shifted_labels != IGNORE_INDEX).sum())
    if n_tokens == 0:
        raise ValueError(
            "nll_from_logits: the batch has no labelled target token; build it with Backbone.build_batch"
        )
    nll, _ = nll_with_omega(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)
    return nll.sum() / n_tokens


def target_nll(
    model: nn.Module, backbone: Backbone, batch: Mapping[str, torch.Tensor], **kwargs: Any
) -> torch.Tensor:
    """The edit loss: one forward pass of ``model`` on ``batch``, mean NLL of the target tokens.

    Args:
        model: the (PEFT-wrapped) model to run; its active adapter is what the loss trains.
        backbone: the model's :class:`~odedit_hf.backbones.Backbone` (unused here; part of the
            :data:`LossFn` signature so that losses needing hidden states or the spec plug in alike).
        batch: from ``Backbone.build_batch``.
    """
    if kwargs:
        raise ValueError(f"target_nll: unknown keyword arguments {sorted(kwargs)}")
    if "labels" not in batch:
        raise ValueError("target_nll: the batch has no 'labels'; build it with Backbone.build_batch")
    logits = model(**model_inputs(batch)).logits
    return nll_from_logits(logits, batch["labels"])

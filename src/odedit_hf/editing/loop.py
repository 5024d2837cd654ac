"""The light per-edit optimisation loop (a Trainer's start-up would dominate a single edit).

A few dozen Adam steps on the active adapter's parameters with a pluggable loss; ODEdit passes its
own loss (and a ``post_step`` hook for its dual step) and gets the same loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .loss import LossFn, target_nll
from .protocol import EditStats

if TYPE_CHECKING:
    from torch import nn

    from odedit_hf.backbones import Backbone

logger = logging.getLogger(__name__)

__all__ = ["EditLoopConfig", "run_edit_loop"]


@dataclass
class EditLoopConfig:
    """Hyperparameters of the per-edit loop.

    Args:
        steps: the most optimiser steps per edit.
        lr: Adam learning rate.
        stop_loss: stop early once the loss is below this value (checked on the loss of the forward
            pass that would feed the next step, so the check costs nothing); ``None`` always runs
            ``steps`` steps. The steps actually taken are reported in :class:`EditStats`. With the
            target NLL, the default 0.1 means the target tokens' geometric-mean probability is above
            0.9: the target is reached, and further steps mostly cost locality.
        weight_decay: Adam weight decay (on the adapter parameters only).
        max_grad_norm: clip the gradient norm to this value; ``None`` = no clipping.
    """

    steps: int = 50
    lr: float = 5e-3
    stop_loss: float | None = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"EditLoopConfig.steps must be a positive int, got {self.steps!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"EditLoopConfig.{name} must be a finite non-negative number, got {value!r}")
            setattr(self, name, float(value))
        if self.lr == 0:
            raise ValueError("EditLoopConfig.lr must be > 0")
        for name in ("stop_loss", "max_grad_norm"):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"EditLoopConfig.{name} must be a positive finite number or None, got {value!r}"
                )
            setattr(self, name, float(value))


def run_edit_loop(
    model: nn.Module,
    backbone: Backbone,
    batch: Mapping[str, torch.Tensor],
    params: Iterable[torch.nn.Parameter],
    config: EditLoopConfig,
    *,
    loss_fn: LossFn = target_nll,
    post_step: Callable[[int], None] | None = None,
) -> EditStats:
    """Minimise ``loss_fn(model, backbone, batch)`` over ``params`` with Adam.

    The model is left in the mode it was in (editing runs in eval mode: dropout would make one
    edit's outcome depend on the RNG).

    Args:
        model: the PEFT-wrapped model.
        backbone: its backbone (passed on to ``loss_fn``).
        batch: the edit batch from ``Backbone.build_batch``, on the model's device.
        params: the parameters to train (those without ``requires_grad`` are skipped).
        config: steps, learning rate, early stop.
        loss_fn: the loss; default :func:`~odedit_hf.editing.loss.target_nll`.
        post_step: called with the step index after every optimiser step (e.g. FT-L's clamp, or a
            dual ascent step).

    Returns:
        :class:`EditStats` with the steps taken and the losses seen.

    Raises:
        ValueError: no trainable parameter, or the loss became NaN/inf (lower the learning rate).
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(
            "run_edit_loop: no parameter requires grad; is the adapter active and not in inference mode?"
        )
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    stopped_early = False
    steps = 0
    for step in range(config.steps + 1):
        loss = loss_fn(model, backbone, batch)
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            raise ValueError(
                f"run_edit_loop: the loss is {value} at step {step}; lower the learning rate (now {config.lr})"
            )
        if config.stop_loss is not None and value < config.stop_loss:
            stopped_early = True
            break
        if step == config.steps:
            break  # the last forward only measures the loss after the final step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        steps += 1
        if post_step is not None:
            post_step(step)
    optimizer.zero_grad(set_to_none=True)
    logger.debug("edit loop: %d steps, loss %.4g -> %.4g", steps, losses[0], losses[-1])
    return EditStats(steps=steps, final_loss=losses[-1], losses=losses, stopped_early=stopped_early)

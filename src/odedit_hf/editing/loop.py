"""The one per-edit optimisation loop (a Trainer's start-up would dominate a single edit).

A few dozen Adam steps on an edit's parameters with a pluggable :class:`StepObjective`: the plain
editors pass :class:`~odedit_hf.editing.editor.NLLObjective`, ODEdit its primal-dual objective, and
LDKE/ASAM theirs -- every method steps through :func:`run_edit_loop`. After every optimiser step the
loop runs the objective's ``after_optimizer_step`` (ODEdit's dual step) and then the adapter layers'
post-step constraints (:func:`~odedit_hf.editing.editor.apply_constraints`), which the Trainer path
applies too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .protocol import EditStats

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["EditDivergedError", "EditLoopConfig", "StepObjective", "run_edit_loop"]


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


class EditDivergedError(ValueError):
    """An edit's loss became NaN/inf; the adapter was restored to its state before the edit (when the
    loop was given a snapshot)."""


class StepObjective(Protocol):
    """What :func:`run_edit_loop` minimises.

    ``objective(step)`` runs the step's forward pass(es) and returns ``(total, stop_value, terms)``:
    the scalar loss to back-propagate, the scalar the early stop compares with ``stop_loss`` (the
    edit's NLL, so that every objective stops at the same reliability) and named terms for logs.
    ``after_optimizer_step(step)`` runs right after each optimiser step (ODEdit's dual step).
    Optionally, ``should_stop(step, stop_value) -> bool`` replaces the ``stop_loss`` test (ODEdit's
    warm-up schedule); the budget ``steps`` still bounds the loop.
    """

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]: ...

    def after_optimizer_step(self, step: int) -> None: ...


def _describe(terms: dict[str, Any]) -> str:
    out = {}
    for name, value in terms.items():
        try:
            out[name] = round(float(value.detach() if hasattr(value, "detach") else value), 6)
        except (TypeError, ValueError):
            continue
    return str(out)


def run_edit_loop(
    model: nn.Module,
    params: Iterable[torch.nn.Parameter],
    config: EditLoopConfig,
    objective: StepObjective,
    *,
    snapshot: Any | None = None,
) -> EditStats:
    """Minimise ``objective`` over ``params`` with Adam; the loop every method shares.

    The model is left in the mode it was in (editing runs in eval mode: dropout would make one
    edit's outcome depend on the RNG).

    Per step: ``objective(step)`` -> stop when its stop value is below ``config.stop_loss`` (or the
    budget is spent; that last forward only measures the loss) -> backward -> optional gradient
    clipping -> Adam step -> ``objective.after_optimizer_step(step)`` -> the adapter layers'
    post-step constraints.

    Args:
        model: the PEFT-wrapped model (its constrained layers are found once).
        params: the parameters to train (those without ``requires_grad`` are skipped).
        config: steps, learning rate, early stop.
        objective: the :class:`StepObjective`.
        snapshot: an adapter snapshot (``restore()``) to roll back to when the loop fails.

    Returns:
        :class:`EditStats` with the steps taken and the losses seen.

    Raises:
        EditDivergedError: the loss became NaN/inf (lower the learning rate); the adapter is restored
            when ``snapshot`` was given.
        ValueError: no trainable parameter.
    """
    from .editor import apply_constraints, constrained_layers

    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(
            "run_edit_loop: no parameter requires grad; is the adapter active and not in inference mode?"
        )
    layers = constrained_layers(model)
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    should_stop = getattr(objective, "should_stop", None)  # optional: the objective's own stop rule
    losses: list[float] = []
    stopped_early = False
    steps = 0
    try:
        for step in range(config.steps + 1):
            total, stop_value, terms = objective(step)
            value = float(total.detach())
            if not math.isfinite(value):
                raise EditDivergedError(
                    f"the edit loss is {value} at step {step} (terms: {_describe(terms)}); lower the learning "
                    f"rate (now {config.lr})" + ("; the adapter was restored" if snapshot is not None else "")
                )
            losses.append(value)
            if should_stop is not None:
                stop = bool(should_stop(step, stop_value))
            else:
                stop = config.stop_loss is not None and float(stop_value.detach()) < config.stop_loss
            if stop:
                stopped_early = True
                break
            if step == config.steps:
                break  # the last forward only measures the loss after the final step
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            objective.after_optimizer_step(step)
            if layers:
                apply_constraints(model, layers)
            steps += 1
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
    logger.debug("edit loop: %d steps, loss %.4g -> %.4g", steps, losses[0], losses[-1])
    return EditStats(steps=steps, final_loss=losses[-1], losses=losses, stopped_early=stopped_early)

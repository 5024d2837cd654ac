"""``EditSchedule``: the phases of one ODEdit edit, as the OOD-TV-IRM reference plays its game.

The reference (DESIGN §5, laizhr/OOD-TV-IRM) first fits the plain risk with the penalty weight at 0 for a
warm-up, then runs the primal–dual game for a fixed budget. Per edit here:

1. **warm-up** (``warmup_steps``): penalty weight 0, so the primal step descends ``R`` alone and the dual
   step does not run. With ``warmup_until_fit`` the warm-up ends as soon as ``R_rel < stop_rel`` (the
   edit is in; the step whose forward first shows it is already a primal–dual step), else after
   ``warmup_steps`` steps.
2. **primal–dual** (at most ``penalty_steps``): penalty weight 1 (``R + λ·P``), the dual step runs. The
   edit stops once ``R_rel < stop_rel`` and ``P < stop_penalty`` (``None``: no condition on ``P``), after
   at least ``min_penalty_steps`` steps of this phase, or when the phase's budget is spent.

The schedule is a small state machine driven by the edit loop, one call of each per step, the stop test
first (it decides when the warm-up ends)::

    schedule.reset()
    for step in range(schedule.total_steps + 1):
        terms = objective(forward, batch, lam)           # R and P, both kept
        if schedule.should_stop(step, float(terms.r_rel), float(terms.penalty)):
            break
        loss = terms.total if schedule.penalty_weight(step) else terms.risk
        ...primal backward and step...
        if schedule.dual_active(step):
            dual_step(lambda_net, dual_optimizer)

A natural choice for the λ-network's ``dual_slack`` is ``stop_penalty``: λ then rises while the penalty
is above the level at which the edit may stop, and falls below it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["EditSchedule"]


@dataclass
class EditSchedule:
    """Warm-up, then a primal–dual phase with a fixed budget, for one edit.

    Args:
        warmup_steps: the most steps with penalty weight 0 (0: the penalty acts from the first step).
        penalty_steps: the most steps of the primal–dual phase (>= 1).
        stop_rel: ``τ``: the edit may stop once ``R_rel < τ`` (``None``: run the whole budget).
        stop_penalty: ``ε``: ... and ``P < ε`` (``None``: no condition on the penalty).
        min_penalty_steps: primal–dual steps taken before the stop test may end the edit (so that the penalty
            acts at least this often even when the warm-up already reached ``τ``).
        warmup_until_fit: end the warm-up as soon as ``R_rel < τ`` (else it runs ``warmup_steps`` steps).
        penalty_needs_fit: an edit whose warm-up spent its budget without reaching ``R_rel < τ`` ends there
            (as the editor's own loop would) instead of entering the primal–dual phase unfitted, where the
            penalty of an unlikely target (P ~ 1e2–1e3) drives an adaptive λ to its clamp within a step.
    """

    warmup_steps: int = 0
    penalty_steps: int = 50
    stop_rel: float | None = 0.1
    stop_penalty: float | None = None
    min_penalty_steps: int = 1
    warmup_until_fit: bool = True
    penalty_needs_fit: bool = False
    _penalty_start: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, low in (("warmup_steps", 0), ("penalty_steps", 1), ("min_penalty_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EditSchedule.{name} must be an int >= {low}, got {value!r}")
        if self.min_penalty_steps > self.penalty_steps:
            raise ValueError(
                f"EditSchedule.min_penalty_steps={self.min_penalty_steps} exceeds penalty_steps="
                f"{self.penalty_steps}; lower it or raise the budget"
            )
        for name in ("stop_rel", "stop_penalty"):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"EditSchedule.{name} must be a finite number > 0 or None, got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.warmup_until_fit, bool):
            raise ValueError(
                f"EditSchedule.warmup_until_fit must be True or False, got {self.warmup_until_fit!r}"
            )
        self.reset()

    @classmethod
    def from_start(cls, steps: int, stop_rel: float | None) -> EditSchedule:
        """The original ODEdit loop: the penalty from step 0, stop once ``R_rel < stop_rel``, at most ``steps``."""
        return cls(
            warmup_steps=0, penalty_steps=steps, stop_rel=stop_rel, stop_penalty=None, min_penalty_steps=0
        )

    @property
    def total_steps(self) -> int:
        """The most optimiser steps an edit can take (warm-up and primal–dual budgets together)."""
        return self.warmup_steps + self.penalty_steps

    @property
    def penalty_start(self) -> int | None:
        """The step at which the primal–dual phase began (``None``: still warming up)."""
        return self._penalty_start

    def reset(self) -> None:
        """Back to the start of an edit."""
        self._penalty_start = 0 if self.warmup_steps == 0 else None
        #: whether the last :meth:`should_stop` that returned True did so by the stop rule (not the budget)
        self.stopped_by_rule = False

    def in_warmup(self, step: int) -> bool:
        """Whether ``step`` is a warm-up step (penalty weight 0, no dual step)."""
        return self._penalty_start is None or step < self._penalty_start

    def penalty_weight(self, step: int) -> float:
        """The weight of ``λ·P`` in the loss of ``step``: 0 in the warm-up, 1 after."""
        return 0.0 if self.in_warmup(step) else 1.0

    def dual_active(self, step: int) -> bool:
        """Whether the dual step runs after the primal step of ``step``."""
        return not self.in_warmup(step)

    def should_stop(self, step: int, r_rel: float, penalty: float | None) -> bool:
        """Whether the edit ends at ``step`` (before its optimiser step), given that step's ``R_rel`` and ``P``.

        Call once per step, in order: in the warm-up it also decides when the primal–dual phase begins.
        """
        self.stopped_by_rule = False
        if self.in_warmup(step):
            fitted = self.stop_rel is not None and r_rel < self.stop_rel
            if self.warmup_until_fit and fitted:
                # the edit is in: this very step is the first of the primal-dual phase
                self._penalty_start = step
                logger.debug("EditSchedule: warm-up ends before step %d (R_rel %.4g)", step, r_rel)
            else:
                if step + 1 >= self.warmup_steps:
                    self._penalty_start = step + 1
                    logger.debug("EditSchedule: warm-up budget ends after step %d (R_rel %.4g)", step, r_rel)
                return False
        done = step - self._penalty_start
        if done == 0 and self.penalty_needs_fit and self.warmup_steps > 0 and step == self.warmup_steps:
            if self.stop_rel is not None and not r_rel < self.stop_rel:
                return True  # the warm-up's budget ran out before the edit was in
        if done >= self.min_penalty_steps and self.stop_rel is not None and r_rel < self.stop_rel:
            if self.stop_penalty is None or (penalty is not None and penalty < self.stop_penalty):
                self.stopped_by_rule = True
                return True
        return done >= self.penalty_steps

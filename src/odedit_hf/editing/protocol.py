"""The interface every editing method implements (plain editors and ODEdit alike)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

__all__ = ["EditMethod", "EditStats"]


@dataclass
class EditStats:
    """What one call of :meth:`EditMethod.edit` did.

    Args:
        steps: optimiser steps taken (fewer than the budget when the loop stopped early).
        final_loss: the last loss computed (``None`` for methods that do not optimise).
        losses: the loss at every step, in order (the last one may be the stopping check).
        stopped_early: whether the loop stopped because the loss fell below its ``stop_loss``.
    """

    steps: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"EditStats.steps must be a non-negative int, got {self.steps!r}")
        if self.final_loss is not None:
            self.final_loss = float(self.final_loss)
            if math.isnan(self.final_loss):
                raise ValueError("EditStats.final_loss is NaN: the edit diverged; lower the learning rate")


@runtime_checkable
class EditMethod(Protocol):
    """An editing method: which parameters an edit trains (a PEFT config), and how it trains them.

    Protocols own the adapter's life (wrap once, re-initialise, roll back); a method only trains the
    active adapter of the ``peft_model`` it is given.
    """

    name: str

    def peft_config(self, backbone: Backbone) -> PeftConfig:
        """The PEFT config whose adapter holds the edit (its targets from the backbone registry)."""
        ...

    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Train the active adapter of ``peft_model`` in place so the model gives each request's ``alt``."""
        ...

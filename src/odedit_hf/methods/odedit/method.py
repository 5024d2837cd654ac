"""``ODEditMethod``: ODEdit as a wrapper method (``--method odedit+EDITOR``), with its primal-dual
objective stepped by the shared edit loop.

Plug-and-play: the wrapped editor (FT-L, LoRA, GRACE, T-Patcher, ...) supplies the PEFT config of the
edit parameters and its hooks (growth before the edit, its own loss terms, constraints in its layers,
identity check, snapshot), all forwarded by :class:`~odedit_hf.editing.wrapper.Wrapper`; ODEdit
supplies the objective. The per-edit loop is :func:`~odedit_hf.editing.run_edit_loop` (the one every
method uses), on the very loss of :class:`~odedit_hf.methods.odedit.trainer.ODEditTrainer`
(:class:`~odedit_hf.methods.odedit.objective.ODEditObjective`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from odedit_hf.editing.editor import Editor, model_device
from odedit_hf.editing.environments import build_edit_batch
from odedit_hf.editing.loop import EditDivergedError, run_edit_loop
from odedit_hf.editing.wrapper import Wrapper

from .config import ODEDIT_CONFIG_VERSION, ODEditConfig
from .objective import ODEditObjective, build_lambda_network, dual_step
from .risks import needed_groups
from .schedule import EditSchedule

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import EditStats
    from odedit_hf.editing.environments import EditBatch

    from .lambda_net import LambdaNetwork

logger = logging.getLogger(__name__)

__all__ = [
    "ODEditDivergedError",
    "ODEditMethod",
    "PrimalDualObjective",
    "edit_schedule",
    "objective_field_names",
]

#: Kept for callers of the first release: a diverged ODEdit edit raises the loop's error.
ODEditDivergedError = EditDivergedError


def objective_field_names() -> list[str]:
    """The :class:`ODEditConfig` fields that are ODEdit's own hyperparameters (not peft bookkeeping)."""
    return ODEditConfig.option_names()


def edit_schedule(config: ODEditConfig, loop: Any) -> EditSchedule:
    """The :class:`EditSchedule` of one edit under ``config`` (``schedule``) and the editor's ``loop``.

    ``"from_start"`` is the editor's own loop rule (penalty from step 0, stop once ``R_rel < stop_loss``,
    at most ``loop.steps``); ``"warmup"`` plays the reference's warm-up (at most ``warmup_steps``, by default
    ``loop.steps``) and primal-dual budget.
    """
    if config.schedule == "from_start":
        return EditSchedule.from_start(loop.steps, loop.stop_loss)
    return EditSchedule(
        warmup_steps=loop.steps if config.warmup_steps is None else config.warmup_steps,
        penalty_steps=config.penalty_steps,
        stop_rel=loop.stop_loss,
        stop_penalty=config.stop_penalty if config.irm_penalty else None,
        min_penalty_steps=config.min_penalty_steps,
        warmup_until_fit=True,
        penalty_needs_fit=True,
    )


class PrimalDualObjective:
    """One ODEdit step for :func:`run_edit_loop`: λ from the λ-network, the ODEdit terms, the editor's
    own terms; after each primal optimiser step, the dual (ascent) step on the λ-network.

    The :class:`EditSchedule` decides, from each step's ``R_rel`` and ``P``, when the edit stops
    (:meth:`should_stop`, called by the loop), whether the step's loss carries ``λ·P`` (not in the warm-up:
    the loss is then ``R`` alone, so the penalty sends no gradient to the edit parameters) and whether the
    dual step runs. :attr:`trace` holds what the edit did: λ at the first primal-dual step and at the last
    forward, the steps of each phase and the dual steps taken.

    Args:
        objective: the :class:`ODEditObjective` (its pre-edit state prepared, or ``first_is_pre_edit``).
        editor: the wrapped editor (its :meth:`~odedit_hf.editing.Editor.extra_loss` is added).
        peft_model: the model being edited.
        edit_batch: the environments' prompts.
        params: the edit parameters (the λ-network's input).
        lambda_net, dual_optimizer: from :func:`build_lambda_network`.
        first_is_pre_edit: step 0's forward is the pre-edit model (the adapter is still the identity).
        schedule: the edit's phases (default: the penalty from step 0, stop once ``R_rel < 0.1``).
    """

    def __init__(
        self,
        objective: ODEditObjective,
        editor: Editor,
        peft_model: PeftModel,
        edit_batch: EditBatch,
        params: Sequence[torch.nn.Parameter],
        lambda_net: LambdaNetwork,
        dual_optimizer: torch.optim.Optimizer | None,
        *,
        first_is_pre_edit: bool,
        schedule: EditSchedule | None = None,
    ) -> None:
        self.objective = objective
        self.editor = editor
        self.peft_model = peft_model
        self.edit_batch = edit_batch
        self.params = list(params)
        self.lambda_net = lambda_net
        self.dual_optimizer = dual_optimizer
        self.first_is_pre_edit = first_is_pre_edit
        self.forward = objective.backbone.forward
        self.last_terms: dict[str, float] = {}
        self.schedule = schedule if schedule is not None else EditSchedule.from_start(50, 0.1)
        self.schedule.reset()
        self._stop = False
        self.trace: dict[str, Any] = {
            "lambda_start": None,
            "lambda_end": None,
            "warmup_steps": 0,
            "penalty_steps": 0,
            "dual_steps": 0,
        }

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        cfg = self.objective.config
        lam = self.lambda_net(self.params) if cfg.irm_penalty else None
        terms = self.objective(
            self.forward, self.edit_batch, lam, pre_edit=self.first_is_pre_edit and step == 0
        )
        penalty = None if terms.penalty is None else float(terms.penalty.detach())
        self._stop = self.schedule.should_stop(step, float(terms.r_rel.detach()), penalty)
        with_penalty = self.schedule.penalty_weight(step) > 0
        total = terms.total if with_penalty else terms.risk
        if lam is not None and with_penalty:
            value = float(lam.detach())
            if self.trace["lambda_start"] is None:
                self.trace["lambda_start"] = value
            self.trace["lambda_end"] = value
        extra = self.editor.extra_loss(self.peft_model)
        for value in extra.values():
            total = total + value
        named: dict[str, Any] = dict(terms.as_floats())
        named.update(extra)
        self.last_terms = terms.as_floats()
        return total, terms.r_rel, named

    def should_stop(self, step: int, stop_value: torch.Tensor) -> bool:
        """The schedule's decision for ``step`` (taken in :meth:`__call__` from its ``R_rel`` and ``P``)."""
        return self._stop

    def after_optimizer_step(self, step: int) -> None:
        active = self.schedule.dual_active(step)
        self.trace["penalty_steps" if active else "warmup_steps"] += 1  # optimiser steps taken, per phase
        stepped = dual_step(self.lambda_net, self.dual_optimizer, skip=not active)
        self.trace["dual_steps"] += int(stepped)


class ODEditMethod(Wrapper):
    """ODEdit around a base editor method.

    Args:
        editor: the wrapped editing method (e.g. ``get_method("ftl")``, ``get_method("lora")``); its
            loop (step budget, learning rate, early stop) is ODEdit's too. The early stop looks at
            ``R_rel`` (the edit's NLL, the plain editors' loss), so ODEdit and its editor stop at the
            same reliability.
        objective: :class:`ODEditConfig` hyperparameters (``alpha``, ``beta``, ``lambda_mode``, ...), as
            a mapping; or pass them as keyword arguments.
    """

    name: ClassVar[str] = "odedit"
    config_class: ClassVar[type[ODEditConfig]] = ODEditConfig
    wrapper_supports_gradient_checkpointing: ClassVar[bool] = True  # tested: same edit with and without

    def __init__(self, editor: Editor, objective: Mapping[str, Any] | None = None, **options: Any) -> None:
        self.editor = editor
        allowed = set(objective_field_names())
        merged = {**dict(objective or {}), **options}
        unknown = sorted(set(merged) - allowed)
        if unknown:
            raise ValueError(
                f"ODEditMethod: unknown ODEdit hyperparameters {unknown}; known: {sorted(allowed)}"
            )
        self.objective = merged
        self._check_editor()

    def __repr__(self) -> str:
        return f"ODEditMethod(editor={self.editor!r}, objective={self.objective!r})"

    def options(self) -> dict[str, Any]:
        return {"editor": self.editor, **self.objective}

    def wrapper_memory_bytes(self, num_edit_parameters: int) -> int:
        """The λ-network's parameters and gradients (fp32; its dual optimiser is plain SGD, no state)."""
        from .lambda_net import lambda_network_num_parameters

        options = self.resolved_config()["options"]  # every ODEdit option, defaults included
        if not options.get("irm_penalty", True):
            return 0
        n = lambda_network_num_parameters(
            options["lambda_mode"], num_edit_parameters, options["lambda_hidden_size"], options["sketch_dim"]
        )
        return 2 * 4 * n

    def resolved_config(self) -> dict[str, Any]:
        """The wrapper's resolved config (every ODEdit option, defaults included) and ``config_version``."""
        out = super().resolved_config()
        out["config_version"] = ODEDIT_CONFIG_VERSION
        return out

    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Edit ``requests`` (one optimisation) into the active adapter with the primal-dual objective.

        Raises:
            EditDivergedError: the loss became NaN/inf; the adapter is back to its state before this
                call (the base weights are never written).
        """
        adapter = peft_model.active_adapter
        config = peft_model.peft_config[adapter]
        if not isinstance(config, ODEditConfig):
            raise ValueError(
                f"ODEditMethod.edit: adapter {adapter!r} is a {type(config).__name__}; wrap the model with "
                "get_peft_model(model, method.peft_config(backbone))"
            )
        if len(requests) > 1 and not self.editor.supports_batch:
            raise ValueError(
                f"{self.name}: the editor {self.editor.name!r} edits one request at a time (got {len(requests)})"
            )
        snapshot = self.snapshot(peft_model, adapter)
        self.before_edit(peft_model, backbone, requests)
        device = model_device(peft_model)
        edit_batch = build_edit_batch(
            backbone, requests, needed_groups(config), num_rephrases=config.num_rephrases, device=device
        )
        # the frozen vision tower runs once per image batch of this edit (prepare pass and every step)
        with backbone.frozen_vision_cache():
            objective = ODEditObjective(config, backbone)
            # the pre-edit reference (loc/m_loc distributions, MMD bandwidths) comes from the adapter-disabled
            # model; while the editor's adapter is still the identity, step 0's forward is that model
            first_is_pre_edit = self.adapter_is_identity(peft_model)
            if not first_is_pre_edit:
                with peft_model.disable_adapter():
                    objective.prepare(backbone.forward, edit_batch)
            params = self.edit_parameters(peft_model)
            lambda_net, dual_optimizer = build_lambda_network(config, params, device=device)
            schedule = edit_schedule(config, self.loop)
            step_objective = PrimalDualObjective(
                objective,
                self.editor,
                peft_model,
                edit_batch,
                params,
                lambda_net,
                dual_optimizer,
                first_is_pre_edit=first_is_pre_edit,
                schedule=schedule,
            )
            loop = self.loop
            if loop.steps != schedule.total_steps:  # warmup: the warm-up and primal-dual budgets together
                loop = dataclasses.replace(loop, steps=schedule.total_steps)
            stats = run_edit_loop(peft_model, params, loop, step_objective, snapshot=snapshot)
        stats.stopped_early = schedule.stopped_by_rule
        trace = dict(step_objective.trace, steps=stats.steps, stopped_by_rule=stats.stopped_early)
        start, end = trace["lambda_start"], trace["lambda_end"]
        trace["log_lambda_ratio"] = math.log(end / start) if start and end and start > 0 and end > 0 else None
        #: what the last edit did (λ at its first primal-dual step and at its last forward, steps per phase)
        self.last_edit_trace = trace
        logger.debug(
            "ODEdit: %d steps, last terms %s, trace %s", stats.steps, step_objective.last_terms, trace
        )
        self.after_edit(peft_model, backbone, requests, stats)
        return stats

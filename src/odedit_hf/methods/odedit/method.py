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

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from odedit_hf.editing.editor import Editor, model_device
from odedit_hf.editing.environments import build_edit_batch
from odedit_hf.editing.loop import EditDivergedError, run_edit_loop
from odedit_hf.editing.wrapper import Wrapper

from .config import ODEditConfig
from .objective import ODEditObjective, build_lambda_network, dual_step
from .risks import needed_groups

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import EditStats
    from odedit_hf.editing.environments import EditBatch

    from .lambda_net import LambdaNetwork

logger = logging.getLogger(__name__)

__all__ = ["ODEditDivergedError", "ODEditMethod", "PrimalDualObjective", "objective_field_names"]

#: Kept for callers of the first release: a diverged ODEdit edit raises the loop's error.
ODEditDivergedError = EditDivergedError


def objective_field_names() -> list[str]:
    """The :class:`ODEditConfig` fields that are ODEdit's own hyperparameters (not peft bookkeeping)."""
    return ODEditConfig.option_names()


class PrimalDualObjective:
    """One ODEdit step for :func:`run_edit_loop`: λ from the λ-network, the ODEdit terms, the editor's
    own terms; after each primal optimiser step, the dual (ascent) step on the λ-network.

    Args:
        objective: the :class:`ODEditObjective` (its pre-edit state prepared, or ``first_is_pre_edit``).
        editor: the wrapped editor (its :meth:`~odedit_hf.editing.Editor.extra_loss` is added).
        peft_model: the model being edited.
        edit_batch: the environments' prompts.
        params: the edit parameters (the λ-network's input).
        lambda_net, dual_optimizer: from :func:`build_lambda_network`.
        first_is_pre_edit: step 0's forward is the pre-edit model (the adapter is still the identity).
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

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        cfg = self.objective.config
        lam = self.lambda_net(self.params) if cfg.irm_penalty else None
        terms = self.objective(
            self.forward, self.edit_batch, lam, pre_edit=self.first_is_pre_edit and step == 0
        )
        total = terms.total
        extra = self.editor.extra_loss(self.peft_model)
        for value in extra.values():
            total = total + value
        named: dict[str, Any] = dict(terms.as_floats())
        named.update(extra)
        self.last_terms = terms.as_floats()
        return total, terms.r_rel, named

    def after_optimizer_step(self, step: int) -> None:
        dual_step(self.lambda_net, self.dual_optimizer)


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
            step_objective = PrimalDualObjective(
                objective,
                self.editor,
                peft_model,
                edit_batch,
                params,
                lambda_net,
                dual_optimizer,
                first_is_pre_edit=first_is_pre_edit,
            )
            stats = run_edit_loop(peft_model, params, self.loop, step_objective, snapshot=snapshot)
        logger.debug("ODEdit: %d steps, last terms %s", stats.steps, step_objective.last_terms)
        self.after_edit(peft_model, backbone, requests, stats)
        return stats

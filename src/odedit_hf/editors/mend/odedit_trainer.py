"""``ODEditMENDTrainer``: MEND's hypernetwork meta-trained under ODEdit's objective (``odedit+mend``).

ODEdit+MEND is MEND whose hypernetwork learned, over the train split, to produce updates that are good under
ODEdit's objective; an edit is then MEND's single forward/backward (``--method mend --mend.editor-weights``).
A training step is :class:`~.trainer.MENDTrainer`'s (the edit prompt's ``u``/``δ`` on the base model, the
hypernetwork's factors applied as a temporary delta) with the post-update model scored by
:class:`~odedit_hf.methods.odedit.objective.ODEditObjective` instead of MEND's edit NLL + locality KL:

    loss = R_rel + alpha·R_loc + beta·R_gen + λ·P,   P = (Σ_e |∂R_e/∂ω|)²  (IRM-TV)

on the request's prompt groups (:class:`~odedit_hf.methods.odedit.trainer.ODEditCollator`); the pre-edit
state the objective compares with (locality rows, MMD bandwidths) comes from the base model, once per request.
λ comes from ODEdit's λ-network (:func:`~odedit_hf.methods.odedit.objective.build_lambda_network`) whose
input is the hypernetwork's parameters (the parameters the primal step optimises, as the edit parameters are
in :class:`~odedit_hf.methods.odedit.trainer.ODEditTrainer`). The Trainer's optimiser step is the primal
(descent) step on the hypernetwork; right after each optimiser step ODEdit's own callback runs the dual
(ascent) step on the λ-network (:func:`~odedit_hf.methods.odedit.objective.dual_step`, ODEditTrainer's
``dual_step``): under gradient accumulation the signal ``∂loss/∂λ`` is summed over the accumulated backwards
and the dual step runs once per optimiser step, never per micro-batch; under several processes the
signal is averaged over the processes first (as the hypernetwork's gradients are, through DDP's forward), so
every process's λ-network takes the same step. The per-edit schedule of ODEdit
(``schedule``, ``warmup_steps``, ``penalty_steps``, ``stop_penalty``) has no meaning here and is not used.

Validation reports ``eval_loss`` = the ODEdit risk without the penalty (``R_rel + alpha·R_loc + beta·R_gen``:
λ changes during training, so ``λ·P`` would make the best-model choice drift), ``eval_penalty``, and
MEND's own validation terms (``eval_mend_loss``, ``eval_edit_acc``, ``eval_rephrase_acc``, ``eval_loc_agree``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from odedit_hf.methods.odedit.config import ODEditConfig
from odedit_hf.methods.odedit.objective import LossTerms, ODEditObjective, build_lambda_network
from odedit_hf.methods.odedit.risks import PreEditState
from odedit_hf.methods.odedit.trainer import ODEditCollator, ODEditTrainer, _DualStepCallback

from .method import token_rows
from .trainer import MENDCollator, MENDTrainer, MENDTrainingArguments

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

    from .hypernet import MENDNet

logger = logging.getLogger(__name__)

__all__ = ["ODEditMENDCollator", "ODEditMENDTrainer"]


class ODEditMENDCollator(MENDCollator):
    """:class:`~.trainer.MENDCollator`'s batch plus ODEdit's ``edit_batch`` (the groups its objective needs)."""

    def __init__(self, backbone: Backbone, config: ODEditConfig) -> None:
        super().__init__(backbone)
        self.odedit = ODEditCollator(backbone, config)

    def __call__(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        out = super().__call__(requests)
        out.update(self.odedit(requests))
        return out


class ODEditMENDTrainer(MENDTrainer):
    """``Trainer`` for MEND's hypernetwork under ODEdit's objective (see the module docstring).

    Args:
        net, args, backbone, train_dataset, eval_dataset, **kwargs: as :class:`~.trainer.MENDTrainer`
            (``args.edit_weight`` / ``args.loc_weight`` must keep their defaults: ODEdit's ``alpha``/``beta``
            weigh the terms here; ``args.lambda_learning_rate`` overrides the config's ``lambda_lr``).
        odedit_config: the :class:`~odedit_hf.methods.odedit.config.ODEditConfig` whose objective scores the
            post-update model (its ``editor`` is the MEND adapter's config).
    """

    loss_scale = ODEditTrainer.loss_scale  # ODEdit's own pieces of the dual step, reused as they are
    current_lambda = ODEditTrainer.current_lambda

    def __init__(
        self,
        net: MENDNet,
        args: MENDTrainingArguments,
        backbone: Backbone,
        train_dataset: Sequence[EditRequest],
        eval_dataset: Sequence[EditRequest] | None = None,
        *,
        odedit_config: ODEditConfig,
        **kwargs: Any,
    ) -> None:
        if not isinstance(odedit_config, ODEditConfig):
            raise ValueError(
                f"ODEditMENDTrainer: odedit_config must be an ODEditConfig, got {type(odedit_config).__name__}"
            )
        if isinstance(args, MENDTrainingArguments) and (args.edit_weight != 1.0 or args.loc_weight != 1.0):
            raise ValueError(
                "ODEditMENDTrainer: edit_weight/loc_weight weigh MEND's own loss and do not apply under ODEdit's "
                "objective; set ODEdit's alpha (R_loc) and beta (R_gen) instead (--odedit.alpha, --odedit.beta)"
            )
        self.odedit_config = odedit_config
        super().__init__(net, args, backbone, train_dataset, eval_dataset, **kwargs)
        self.objective = ODEditObjective(odedit_config, backbone)
        self._pre_states: dict[Any, PreEditState] = {}
        self._edit_params = [p for p in net.parameters() if p.requires_grad]
        config = odedit_config
        if args.lambda_learning_rate is not None:
            import dataclasses

            config = dataclasses.replace(odedit_config, lambda_lr=args.lambda_learning_rate)
        self.lambda_net, self.dual_optimizer = build_lambda_network(
            config, self._edit_params, device=args.device, init_seed=args.seed
        )
        self._loss_scale: float | None = None
        self.dual_steps = 0  # dual optimiser steps taken (one per primal optimiser step at most)
        self.add_callback(_DualStepCallback(self))

    def make_collator(self, backbone: Backbone) -> MENDCollator:
        return ODEditMENDCollator(backbone, self.odedit_config)

    def dual_step(self) -> bool:
        """ODEditTrainer's dual step (ascent on the λ-network, once per optimiser step); counts the steps."""
        stepped = ODEditTrainer.dual_step(self)
        self.dual_steps += int(stepped)
        return stepped

    # ------------------------------------------------------------------ the loss
    def odedit_terms(self, inputs: dict[str, Any]) -> LossTerms:
        """ODEdit's :class:`~odedit_hf.methods.odedit.objective.LossTerms` of the post-update model."""
        device = self.args.device
        edit_inputs = {k: v.to(device) for k, v in inputs["edit_inputs"].items()}
        edit_batch = inputs["edit_batch"].to(device)
        key = inputs.get("keys")
        # the pre-edit state per request key (case ids repeat across the world's train files)
        self.objective.pre = (
            self._pre_states.setdefault(key, PreEditState()) if key is not None else PreEditState()
        )
        with self.backbone.frozen_vision_cache():
            rows, _ = token_rows(self.backbone, edit_inputs, self.layers)
            self.objective.prepare(self._forward, edit_batch)  # the base model: no delta pending yet
            lam = self.lambda_net(self._edit_params) if self.odedit_config.irm_penalty else None
            with contextlib.ExitStack() as stack:
                for index, (layer, (u, d)) in enumerate(zip(self.layers, rows)):
                    a, b = self.net.factors(index, u.to(device), d.to(device))
                    stack.enter_context(layer.pending(a, b))
                return self.objective(self._forward, edit_batch, lam)

    def step_terms(self, inputs: dict[str, Any]) -> LossTerms:  # type: ignore[override]
        """The training terms of one batch: the forward of the module the Trainer wraps."""
        return self.odedit_terms(inputs)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """``R_rel + alpha·R_loc + beta·R_gen + λ·P`` of the post-update model."""
        terms = model(inputs)  # through DistributedDataParallel's forward under several processes
        floats = terms.as_floats()
        if not torch.isfinite(terms.total):
            raise ValueError(
                f"ODEdit+MEND training: the loss is not finite at step {self.state.global_step} ({floats}); "
                "lower learning_rate or edit_lr_learning_rate"
            )
        for name, value in floats.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1
        return (terms.total, terms) if return_outputs else terms.total

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        """``eval_loss`` = the risk without ``λ·P``; MEND's own validation terms beside it."""
        with torch.no_grad():
            terms = self.odedit_terms(inputs)
            mend = self.mend_terms(inputs)
        values: dict[str, Any] = {("mend_loss" if k == "loss" else k): v for k, v in mend.items()}
        values.update({name: getattr(terms, name) for name in ("r_rel", "r_loc", "r_gen", "penalty")})
        self.record_eval(values, len(inputs["keys"]))
        return terms.risk.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean ODEdit terms since the last log (``odedit/r_rel``, ``odedit/lambda``, ...), λ and η."""
        if self._count and "loss" in logs:
            sums, count = self.gathered_sums()
            for name, total in sums.items():
                logs[f"odedit/{name}"] = total / count
            logs["mend/edit_lr_mean"] = float(self.net.edit_lrs.detach().mean())
        # skip MENDTrainer.log (its terms are not computed in training here)
        super(MENDTrainer, self).log(logs, start_time)

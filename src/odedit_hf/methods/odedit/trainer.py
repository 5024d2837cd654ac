"""``ODEditTrainingArguments`` + ``ODEditTrainer``: batch edits under ``transformers.Trainer``.

The Trainer runs the primal step (its optimiser on the edit parameters, with its scheduler,
gradient accumulation, clipping, mixed precision and multi-GPU through accelerate);
:meth:`ODEditTrainer.compute_loss` is the very objective of the per-edit loop
(:class:`~odedit_hf.methods.odedit.objective.ODEditObjective`); the dual step (gradient ascent on the
λ-network, its own plain SGD with ``maximize=True``) runs right after each primal optimiser step, from a
callback, with the λ-network's gradients averaged across processes. Under fp16 mixed precision the
loss is multiplied by the ``GradScaler``'s scale before the backward: the dual step divides the
penalty signal it recorded by that scale, and it is skipped whenever the scaler skipped the primal step
(inf/NaN gradients). The λ-network's initial weights are seeded from ``TrainingArguments.seed``, so every
process starts from the same network.

The train dataset is a sequence of :class:`~odedit_hf.data.EditRequest`; a batch of ``k`` requests is
one batch edit. The λ-network is training state, not part of the edit: the saved adapter (a checkpoint
or ``save_model``) holds the edit parameters only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from odedit_hf.editing.editor import apply_constraints, constrained_layers
from odedit_hf.editing.environments import EditBatch, build_edit_batch

from .config import ODEditConfig
from .objective import ODEditObjective, build_lambda_network, dual_step
from .risks import needed_groups

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

logger = logging.getLogger(__name__)

__all__ = ["ODEditCollator", "ODEditTrainer", "ODEditTrainingArguments"]


@dataclass
class ODEditTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for ODEdit batch edits.

    Args:
        lambda_learning_rate (`float`, *optional*):
            Learning rate of the dual (ascent) step on the λ-network; default the adapter config's
            ``lambda_lr``.
        remove_unused_columns (`bool`, defaults to `False`):
            Must stay `False`: the dataset holds edit requests, not model inputs.
    """

    lambda_learning_rate: float | None = field(
        default=None, metadata={"help": "Dual learning rate; default ODEditConfig.lambda_lr."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must be False: the dataset holds EditRequest objects."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remove_unused_columns:
            raise ValueError(
                "ODEditTrainingArguments.remove_unused_columns must be False: the train dataset holds EditRequest "
                "objects, which the collator turns into model inputs"
            )
        if self.lambda_learning_rate is not None and not self.lambda_learning_rate > 0:
            raise ValueError(
                f"ODEditTrainingArguments.lambda_learning_rate must be > 0 (or None), got {self.lambda_learning_rate}"
            )


class _Requests(torch.utils.data.Dataset):
    def __init__(self, requests: Sequence[EditRequest]) -> None:
        self.requests = list(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> EditRequest:
        return self.requests[index]


class ODEditCollator:
    """Turns a list of edit requests into ``{"edit_batch": EditBatch}`` (tokenised, on the CPU)."""

    def __init__(self, backbone: Backbone, config: ODEditConfig) -> None:
        self.backbone = backbone
        self.config = config

    def __call__(self, requests: Sequence[EditRequest]) -> dict[str, EditBatch]:
        return {
            "edit_batch": build_edit_batch(
                self.backbone,
                list(requests),
                needed_groups(self.config),
                num_rephrases=self.config.num_rephrases,
            )
        }


class _DualStepCallback(TrainerCallback):
    def __init__(self, trainer: ODEditTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback API
        # the scale every backward of this step used (the scaler may change it inside the optimiser step)
        self.trainer._loss_scale = self.trainer.loss_scale()

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback API
        self.trainer.dual_step()


class _ConstraintCallback(TrainerCallback):
    """The adapter layers' post-step constraints (e.g. FT-L's norm clamp), after every optimiser step,
    exactly as the per-edit loop applies them."""

    def __init__(self, model: Any) -> None:
        self.layers = constrained_layers(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - TrainerCallback API
        if self.layers:
            apply_constraints(None, self.layers)


class ODEditTrainer(Trainer):
    """``Trainer`` for ODEdit batch edits.

    Args:
        model: a PEFT model whose active adapter is an :class:`ODEditConfig` adapter
            (``get_peft_model(model, ODEditConfig(editor=...))``).
        args: :class:`ODEditTrainingArguments`.
        train_dataset: the edit requests (``EditRequest``); a batch of them is one batch edit.
        backbone: the model's :class:`~odedit_hf.backbones.Backbone`.
        editor: the wrapped editor method (optional): its own loss terms
            (:meth:`~odedit_hf.editing.Editor.extra_loss`) are added to every step's loss, as in the
            per-edit loop. The adapter layers' post-step constraints are applied either way.
        **kwargs: passed to ``transformers.Trainer`` (``callbacks``, ``optimizers``, ...); not
            ``data_collator`` (ODEdit builds its own batches).
    """

    def __init__(
        self,
        model: Any,
        args: ODEditTrainingArguments,
        train_dataset: Sequence[EditRequest],
        backbone: Backbone,
        editor: Any | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, ODEditTrainingArguments):
            raise ValueError(
                f"ODEditTrainer: args must be ODEditTrainingArguments, got {type(args).__name__}"
            )
        if "data_collator" in kwargs:
            raise ValueError("ODEditTrainer: data_collator is fixed (ODEditCollator); do not pass one")
        peft_config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
        if not isinstance(peft_config, ODEditConfig):
            raise ValueError(
                "ODEditTrainer: the model's active adapter must be an ODEditConfig adapter; wrap it with "
                "peft.get_peft_model(model, ODEditConfig(editor=...))"
            )
        if len(train_dataset) == 0:
            raise ValueError("ODEditTrainer: train_dataset holds no edit request")
        self.backbone = backbone
        self.editor = editor
        self.odedit_config = peft_config
        super().__init__(
            model=model,
            args=args,
            train_dataset=_Requests(train_dataset),
            data_collator=ODEditCollator(backbone, peft_config),
            **kwargs,
        )
        self.objective = ODEditObjective(peft_config, backbone)
        self._edit_params = [p for p in model.parameters() if p.requires_grad]
        if not self._edit_params:
            raise ValueError(
                "ODEditTrainer: the model has no trainable edit parameter; is the adapter in inference mode?"
            )
        config = peft_config
        if args.lambda_learning_rate is not None:
            import dataclasses

            config = dataclasses.replace(peft_config, lambda_lr=args.lambda_learning_rate)
        # seeded from the run's seed, which every process shares (not from each process's RNG state)
        self.lambda_net, self.dual_optimizer = build_lambda_network(
            config, self._edit_params, device=args.device, init_seed=args.seed
        )
        self._loss_scale: float | None = None
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        self.add_callback(_DualStepCallback(self))
        self.add_callback(_ConstraintCallback(model))

    # ------------------------------------------------------------------ forward helpers
    def _forward_fn(self, model: Any):
        spec = self.backbone.spec

        def forward(batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
            if spec.text_only_forward is not None and "pixel_values" not in batch:
                # e.g. BLIP-2 text-only prompts: through the wrapped causal LM (same modules, adapters included)
                return self.backbone.forward(batch, **kwargs)
            return model(**batch, **kwargs)

        return forward

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``R_rel + alpha·R_loc + beta·R_gen + λ·P`` for the batch of edit requests in ``inputs``."""
        edit_batch: EditBatch = inputs["edit_batch"].to(self.args.device)
        unwrapped = self.accelerator.unwrap_model(model)
        if self.objective._missing(edit_batch):
            was_training = unwrapped.training
            unwrapped.eval()  # the pre-edit reference must not see dropout
            try:
                with unwrapped.disable_adapter():
                    self.objective.prepare(self.backbone.forward, edit_batch)
            finally:
                unwrapped.train(was_training)
        lam = self.lambda_net(self._edit_params) if self.odedit_config.irm_penalty else None
        terms = self.objective(self._forward_fn(model), edit_batch, lam)
        if self.editor is not None:
            for value in self.editor.extra_loss(unwrapped).values():
                terms.total = terms.total + value
        for name, value in terms.as_floats().items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value
        self._term_count += 1
        return (terms.total, terms) if return_outputs else terms.total

    def loss_scale(self) -> float:
        """The mixed-precision loss scale the backward multiplies the loss by (1.0 without a scaler)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def dual_step(self) -> bool:
        """Ascend the λ-network on the penalty signal of the primal backward (averaged across processes).

        The signal is divided by the loss scale of the step; nothing moves when the primal optimiser step was
        skipped (a loss scaler found inf/NaN gradients). Returns whether the dual optimiser stepped.
        """
        reduce = None
        if self.accelerator.num_processes > 1:

            def reduce(t: torch.Tensor) -> torch.Tensor:
                return self.accelerator.reduce(t, reduction="mean")

        scale = self._loss_scale if self._loss_scale is not None else self.loss_scale()
        self._loss_scale = None
        return dual_step(
            self.lambda_net,
            self.dual_optimizer,
            reduce=reduce,
            loss_scale=scale,
            skip=bool(self.accelerator.optimizer_step_was_skipped),
        )

    def current_lambda(self) -> float:
        """λ for the current edit parameters."""
        with torch.no_grad():
            return float(self.lambda_net(self._edit_params))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean ODEdit terms since the last log (``odedit/r_rel``, ``odedit/lambda``, ...)."""
        if self._term_count:
            for name, total in self._term_sums.items():
                logs[f"odedit/{name}"] = total / self._term_count
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

"""``MENDTrainingArguments`` + ``MENDTrainer``: MEND's meta-training under ``transformers.Trainer``.

Every training example is one edit request of the train split. A step:

1. one forward/backward of the target NLL on the request's edit prompt through the *base* model (the MEND
   adapter is empty during training) gives, per edited module, the layer inputs ``u`` and output gradients
   ``δ`` of every token (:func:`~.method.token_rows`);
2. the hypernetwork turns them into the update factors ``(A, B)``, differentiably;
3. the update is applied as a temporary delta (:meth:`~.layer.MENDLayer.pending`: the forward adds
   ``(x Aᵀ) Bᵀ``; nothing is written into the model) and one forward runs every prompt group of the request
   (:func:`~odedit_hf.editing.environments.build_edit_batch`): the **edit loss** is the mean target NLL of the
   edit prompt, its text rephrase and its image rephrase; the **locality loss** is the KL divergence of the
   pre-edit to the post-edit next-token distributions on the answer positions of the text and multimodal
   locality prompts (the pre-edit distributions come from a no-grad forward of the base model);
4. ``loss = edit_weight · L_edit + loc_weight · L_loc``; the Trainer's backward reaches the hypernetwork and
   the per-layer steps ``η_l`` (their own learning rate, ``edit_lr_learning_rate``), its optimiser steps,
   clips, accumulates and logs as usual.

Before the first step the normalisation statistics of ``u`` and ``δ`` are filled from ``norm_samples`` training
edits and then frozen (the base model does not change during training, so the statistics are stationary).
Evaluation runs the same loss on the validation requests (``eval_loss``) and reports the post-edit token
accuracy of the edit and rephrase prompts and the top-1 agreement on the locality prompts; the best
network by ``metric_for_best_model`` is kept in memory and restored when training ends, and
:class:`transformers.EarlyStoppingCallback` stops training after ``early_stopping_patience`` evaluations
without improvement.

Under several processes (``torchrun`` / ``accelerate launch``) the loss is the forward of the module the
Trainer wraps in ``DistributedDataParallel`` (:class:`_NetHolder`), so the backward all-reduces the
hypernetwork's gradients; the statistics pass is split over the processes and merged
(:meth:`MENDTrainer.fill_statistics`); the validation figures are gathered one row per request
(:meth:`MENDTrainer.record_eval`) and the training logs' terms summed over the processes: every replica
trains, evaluates and keeps the same network. ``N`` processes of one request each train what one process
trains with ``gradient_accumulation_steps = N``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from .hypernet import MENDNet
from .method import mend_layers, token_rows

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

logger = logging.getLogger(__name__)

__all__ = ["MENDCollator", "MENDTrainer", "MENDTrainingArguments"]

_EDIT_GROUPS = ("edit", "rephrase", "image_rephrase")
_LOC_GROUPS = ("loc", "m_loc")


@dataclass
class MENDTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for MEND's meta-training, with MEND's own terms and defaults fit for the
    embedded world on a CPU (see ``docs/editors/mend.md`` for where they depart from EasyEdit's).

    Args:
        edit_weight (`float`, defaults to 1.0):
            Weight of the edit loss (mean target NLL on the edit prompt and its rephrases after the update).
        loc_weight (`float`, defaults to 1.0):
            Weight of the locality loss (KL of pre- to post-edit predictions on the locality prompts).
        edit_lr_learning_rate (`float`, defaults to 3e-4):
            Learning rate of the per-layer edit steps ``η_l`` (MEND's ``lr_lr``).
        norm_samples (`int`, defaults to 64):
            Training edits whose token rows fill the normalisation statistics before the first step.
        early_stopping_patience (`int`, defaults to 4):
            Evaluations without improvement of ``metric_for_best_model`` before training stops; 0: never.
        lambda_learning_rate (`float`, *optional*):
            ``odedit+mend`` only (:class:`~.odedit_trainer.ODEditMENDTrainer`): learning rate of the dual
            (ascent) step on ODEdit's λ-network; default the ODEdit config's ``lambda_lr``.
    """

    edit_weight: float = field(default=1.0, metadata={"help": "Weight of the edit loss."})
    loc_weight: float = field(default=1.0, metadata={"help": "Weight of the locality (KL) loss."})
    edit_lr_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the edit steps."})
    norm_samples: int = field(default=64, metadata={"help": "Edits that fill the normalisation statistics."})
    early_stopping_patience: int = field(
        default=4, metadata={"help": "Evaluations without improvement before stopping; 0 = never."}
    )
    lambda_learning_rate: float | None = field(
        default=None, metadata={"help": "odedit+mend: dual learning rate (default ODEditConfig.lambda_lr)."}
    )
    # TrainingArguments defaults changed for MEND
    learning_rate: float = field(default=3e-5, metadata={"help": "Adam learning rate of the hypernetwork."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs over the train split."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Edits per step (a batch edit)."})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Edits per evaluation step."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "MEND uses a constant rate."})
    max_grad_norm: float = field(default=100.0, metadata={"help": "Gradient clipping (MEND: 100)."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate."})
    eval_steps: float | None = field(default=100, metadata={"help": "Steps between evaluations."})
    logging_steps: float = field(default=25, metadata={"help": "Steps between logs."})
    save_strategy: str = field(default="no", metadata={"help": "The artefact is written by train_editor."})
    metric_for_best_model: str | None = field(
        default="eval_loss", metadata={"help": "Early-stopping metric."}
    )
    greater_is_better: bool | None = field(default=False, metadata={"help": "Lower eval_loss is better."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "No experiment trackers."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must be False: the dataset holds EditRequest objects."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remove_unused_columns:
            raise ValueError(
                "MENDTrainingArguments.remove_unused_columns must be False: the datasets hold EditRequest objects"
            )
        for name in ("edit_weight", "loc_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"MENDTrainingArguments.{name} must be a number >= 0, got {value!r}")
        if not self.edit_lr_learning_rate >= 0:
            raise ValueError(
                f"MENDTrainingArguments.edit_lr_learning_rate must be >= 0, got {self.edit_lr_learning_rate!r}"
            )
        if self.lambda_learning_rate is not None and not self.lambda_learning_rate > 0:
            raise ValueError(
                f"MENDTrainingArguments.lambda_learning_rate must be > 0 (or None), got {self.lambda_learning_rate!r}"
            )
        for name in ("norm_samples", "early_stopping_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MENDTrainingArguments.{name} must be an int >= 0, got {value!r}")


class _Requests(torch.utils.data.Dataset):
    def __init__(self, requests: Sequence[EditRequest]) -> None:
        self.requests = list(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> EditRequest:
        return self.requests[index]


class MENDCollator:
    """Edit requests -> ``{"edit_inputs": the edit prompts' batch, "groups": every prompt group (EditBatch)}``."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def __call__(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        from odedit_hf.editing.environments import GROUPS, build_edit_batch
        from odedit_hf.editing.samples import edit_samples

        return {
            "edit_inputs": self.backbone.build_batch(edit_samples(list(requests))),
            "groups": build_edit_batch(self.backbone, list(requests), GROUPS),
            "keys": tuple((str(r.source), str(r.task), int(r.case_id)) for r in requests),
        }


class _NetHolder(nn.Module):
    """The module the Trainer optimises: the hypernetwork alone (the frozen base model is not part of it, so
    the Trainer neither moves nor saves it). Its forward is the trainer's loss of one batch, so that under
    several processes the step runs through ``DistributedDataParallel``'s forward and the backward
    all-reduces the hypernetwork's gradients (a loss computed beside the wrapper would leave each process
    with its own gradients and its own network)."""

    def __init__(self, net: MENDNet, loss: Any) -> None:
        super().__init__()
        self.net = net
        self.loss = loss  # the trainer's bound loss function (not a module: nothing registered)

    def forward(self, inputs: dict[str, Any]) -> Any:
        return self.loss(inputs)


class _EarlyStopping(EarlyStoppingCallback):
    """``EarlyStoppingCallback`` without its warning about ``load_best_model_at_end``: the trainer keeps the
    best network in memory and restores it at the end of training itself."""

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback API
        if args.metric_for_best_model is None or args.eval_strategy == "no":
            raise ValueError(
                "MEND early stopping needs metric_for_best_model and an eval_strategy of steps or epoch "
                "(or set early_stopping_patience=0)"
            )


class _KeepBest(TrainerCallback):
    def __init__(self, trainer: MENDTrainer) -> None:
        self.trainer = trainer

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001 - TrainerCallback API
        self.trainer._consider_best(metrics or {})

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback API
        self.trainer.restore_best()


class MENDTrainer(Trainer):
    """``Trainer`` for MEND's hypernetwork (see the module docstring).

    Args:
        net: the :class:`~.hypernet.MENDNet` to train (its ``config.modules`` are the edited modules).
        args: :class:`MENDTrainingArguments`.
        backbone: the base model's :class:`~odedit_hf.backbones.Backbone`; its model is wrapped with an empty
            MEND adapter for the duration (:meth:`close` unwraps it) and never changes.
        train_dataset: the training edit requests.
        eval_dataset: the validation edit requests (held out of the train split).
        **kwargs: passed to ``transformers.Trainer`` (``callbacks``, ...); not ``data_collator``.
    """

    def __init__(
        self,
        net: MENDNet,
        args: MENDTrainingArguments,
        backbone: Backbone,
        train_dataset: Sequence[EditRequest],
        eval_dataset: Sequence[EditRequest] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MENDTrainingArguments):
            raise ValueError(f"MENDTrainer: args must be MENDTrainingArguments, got {type(args).__name__}")
        if "data_collator" in kwargs:
            raise ValueError("MENDTrainer: data_collator is fixed (MENDCollator); do not pass one")
        if len(train_dataset) == 0:
            raise ValueError("MENDTrainer: train_dataset holds no edit request")
        if args.eval_strategy != "no" and not eval_dataset:
            raise ValueError(
                "MENDTrainer: eval_strategy is not 'no' but no eval_dataset (validation requests) given"
            )
        from peft import get_peft_model

        from .config import MENDConfig

        if hasattr(backbone.model, "peft_config"):
            raise ValueError("MENDTrainer: pass the plain base model (it already carries PEFT adapters)")
        self.backbone = backbone
        self.net = net
        backbone.model.to(args.device).eval().requires_grad_(False)
        self.peft_model = get_peft_model(backbone.model, MENDConfig(target_modules=list(net.config.modules)))
        self.layers = mend_layers(self.peft_model, net.config.modules)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if args.early_stopping_patience > 0:
            callbacks.append(_EarlyStopping(early_stopping_patience=args.early_stopping_patience))
        super().__init__(
            model=_NetHolder(net, self.step_terms),
            args=args,
            train_dataset=_Requests(train_dataset),
            eval_dataset=_Requests(eval_dataset) if eval_dataset else None,
            data_collator=self.make_collator(backbone),
            callbacks=callbacks,
            **kwargs,
        )
        self.add_callback(_KeepBest(self))
        self._sums: dict[str, float] = {}
        self._count = 0
        self._pre_cache: dict[Any, dict[str, torch.Tensor]] = {}
        self._eval_sums: dict[str, float] = {}
        self._eval_count = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        if not net.trained:
            self.fill_statistics(list(train_dataset)[: max(2, args.norm_samples)])

    # ------------------------------------------------------------------ set-up and tear-down
    def make_collator(self, backbone: Backbone) -> MENDCollator:
        """The collator of the training and validation requests (called once, in ``__init__``)."""
        return MENDCollator(backbone)

    @torch.no_grad()
    def fill_statistics(self, requests: Sequence[EditRequest]) -> None:
        """Fill the normalisation statistics of ``u`` and ``δ`` from ``requests`` (one edit prompt each); they
        are not changed afterwards.

        Under several processes each process takes its contiguous share of ``requests``, and the shares'
        summaries ``(count, mean, m2)`` are gathered and merged in process order on every process: every
        replica ends with the same statistics, those of all ``requests`` (as one process computes them, up
        to float64 rounding).
        """
        world = self.accelerator.num_processes
        if world > 1:
            from odedit_hf.evaluation.distributed import shard_bounds

            lo, hi = shard_bounds(len(requests), world, self.accelerator.process_index)
            stats = [m for t in self.net.transforms.values() for m in (t.stats_u, t.stats_d)]
            before = [(s.count.clone(), s.mean.clone(), s.m2.clone()) for s in stats]
            for s in stats:  # this process's share into empty statistics
                for buffer in (s.count, s.mean, s.m2):
                    buffer.zero_()
            self._add_statistics(requests[lo:hi])
            local = torch.cat([torch.cat([s.count.view(1), s.mean, s.m2]) for s in stats])
            gathered = self.accelerator.gather(local).view(world, -1)
            for s, saved in zip(stats, before):
                for buffer, value in zip((s.count, s.mean, s.m2), saved):
                    buffer.copy_(value)
            for rank in range(world):
                offset = 0
                for s in stats:
                    dim = s.mean.shape[0]
                    row = gathered[rank, offset : offset + 1 + 2 * dim]
                    s.merge(row[0], row[1 : 1 + dim], row[1 + dim :])
                    offset += 1 + 2 * dim
        else:
            self._add_statistics(requests)
        logger.info("MEND: normalisation statistics from %d training edits", len(requests))

    @torch.no_grad()
    def _add_statistics(self, requests: Sequence[EditRequest]) -> None:
        collator = MENDCollator(self.backbone)
        device = self.args.device
        for request in requests:
            batch = {k: v.to(device) for k, v in collator([request])["edit_inputs"].items()}
            rows, _ = token_rows(self.backbone, batch, self.layers)
            for index, (u, d) in enumerate(rows):
                self.net.update_stats(index, u, d)

    def close(self) -> None:
        """Remove the empty MEND adapter from the base model (it is left exactly as it was)."""
        if self.peft_model is not None:
            self.peft_model.unload()
            self.peft_model = None

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """Adam on the hypernetwork (``learning_rate``) and on the edit steps (``edit_lr_learning_rate``)."""
        if self.optimizer is None:
            args = self.args
            steps = [self.net.edit_lrs]
            others = [p for n, p in self.net.named_parameters() if n != "edit_lrs"]
            self.optimizer = torch.optim.AdamW(
                [
                    {"params": others, "lr": args.learning_rate, "weight_decay": args.weight_decay},
                    {"params": steps, "lr": args.edit_lr_learning_rate, "weight_decay": 0.0},
                ],
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            )
        return self.optimizer

    # ------------------------------------------------------------------ the loss
    def _forward(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        return self.backbone.forward(batch, **kwargs)

    def mend_terms(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss and its parts for one batch of requests (see the module docstring)."""
        from odedit_hf.editing.environments import run_groups

        device = self.args.device
        edit_inputs = {k: v.to(device) for k, v in inputs["edit_inputs"].items()}
        groups = inputs["groups"].to(device)
        with self.backbone.frozen_vision_cache():  # the frozen tower runs once per image batch
            rows, _ = token_rows(self.backbone, edit_inputs, self.layers)
            key = inputs.get("keys")
            pre = self._pre_cache.get(key) if key is not None else None
            if pre is None:  # the base model never changes: its locality predictions are cached per request
                with torch.no_grad():
                    outs = run_groups(self._forward, self.backbone, groups)
                pre = {g: outs[g].answer_logits.detach() for g in _LOC_GROUPS if g in outs}
                if key is not None:
                    self._pre_cache[key] = pre
            with contextlib.ExitStack() as stack:
                for index, (layer, (u, d)) in enumerate(zip(self.layers, rows)):
                    a, b = self.net.factors(index, u.to(device), d.to(device))
                    stack.enter_context(layer.pending(a, b))
                post = run_groups(self._forward, self.backbone, groups)
        nlls, accs = [], []
        for g in _EDIT_GROUPS:
            if g in post:
                out = post[g]
                nlls.append(F.cross_entropy(out.answer_logits.float(), out.answer_targets))
                accs.append((out.answer_logits.argmax(-1) == out.answer_targets).float().mean())
        kls, agree = [], []
        for g in _LOC_GROUPS:
            if g in post:
                p0 = F.log_softmax(pre[g].float(), dim=-1)
                p1 = F.log_softmax(post[g].answer_logits.float(), dim=-1)
                kls.append(F.kl_div(p1, p0, log_target=True, reduction="batchmean"))
                agree.append((p0.argmax(-1) == p1.argmax(-1)).float().mean())
        edit_loss = torch.stack(nlls).mean()
        loc_loss = torch.stack(kls).mean() if kls else edit_loss.new_zeros(())
        total = self.args.edit_weight * edit_loss + self.args.loc_weight * loc_loss
        return {
            "loss": total,
            "edit_loss": edit_loss,
            "loc_loss": loc_loss,
            "edit_acc": accs[0],
            "rephrase_acc": torch.stack(accs[1:]).mean() if len(accs) > 1 else accs[0],
            "loc_agree": torch.stack(agree).mean() if agree else edit_loss.new_ones(()),
        }

    def step_terms(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training loss terms of one batch: the forward of the module the Trainer wraps."""
        return self.mend_terms(inputs)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        terms = model(inputs)  # through DistributedDataParallel's forward under several processes
        if not torch.isfinite(terms["loss"]):
            raise ValueError(
                f"MEND training: the loss is not finite at step {self.state.global_step} "
                f"({ {k: float(v) for k, v in terms.items()} }); lower learning_rate or edit_lr_learning_rate"
            )
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
        self._count += 1
        return (terms["loss"], terms) if return_outputs else terms["loss"]

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        """The validation loss of one batch (the edit's own backward runs inside, with gradients enabled)."""
        with torch.no_grad():
            terms = self.mend_terms(inputs)
        self.record_eval({k: v for k, v in terms.items() if k != "loss"}, len(inputs["keys"]))
        return terms["loss"].detach(), None, None

    def record_eval(self, values: dict[str, Any], n: int) -> None:
        """Add one validation batch of ``n`` requests to the means the evaluation reports (``None`` values:
        a term the batch does not have; a metric is reported when some batch has it).

        The batch's values count once per request, gathered across processes as the Trainer gathers
        ``eval_loss`` (the padding a process's last batch gets is dropped): every process reports the means
        over the whole validation set, one process's means.
        """
        names = sorted(values)
        row = []
        for name in names:
            value = values[name]
            row += [0.0, 0.0] if value is None else [float(value), 1.0]
        row_t = torch.tensor(row, dtype=torch.float64, device=self.args.device)
        rows = self.accelerator.gather_for_metrics(row_t.expand(n, -1).contiguous())
        totals = rows.sum(0).tolist()
        for i, name in enumerate(names):
            if totals[2 * i + 1] > 0:
                self._eval_sums[name] = self._eval_sums.get(name, 0.0) + totals[2 * i]
        self._eval_count += rows.shape[0]

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """The Trainer's loop, with the mean edit/rephrase accuracy and locality agreement added."""
        self._eval_sums, self._eval_count = {}, 0
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        prefix = metric_key_prefix
        for name, total in self._eval_sums.items():
            output.metrics[f"{prefix}_{name}"] = total / max(self._eval_count, 1)
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean MEND terms since the last log (``mend/edit_loss``, ``mend/edit_acc``, ...) and the
        edit steps ``η``."""
        if self._count and "loss" in logs:
            sums, count = self.gathered_sums()
            for name, total in sums.items():
                if name != "loss":
                    logs[f"mend/{name}"] = total / count
            logs["mend/edit_lr_mean"] = float(self.net.edit_lrs.detach().mean())
        super().log(logs, start_time)

    def gathered_sums(self) -> tuple[dict[str, float], int]:
        """The training terms summed since the last log and their count, over every process (each process
        sums its own batches); resets them."""
        from accelerate.utils import gather_object

        parts = [(self._sums, self._count)]
        if self.accelerator.num_processes > 1:
            parts = gather_object(parts)
        sums: dict[str, float] = {}
        for part, _ in parts:
            for name, total in part.items():
                sums[name] = sums.get(name, 0.0) + total
        self._sums, self._count = {}, 0
        return sums, sum(count for _, count in parts)

    # ------------------------------------------------------------------ the best network
    def _consider_best(self, metrics: dict[str, float]) -> None:
        name = self.args.metric_for_best_model or "eval_loss"
        if not name.startswith("eval_"):
            name = f"eval_{name}"
        value = metrics.get(name)
        if value is None:
            return
        better = self.best_metric is None or (
            value > self.best_metric if self.args.greater_is_better else value < self.best_metric
        )
        if better:
            self.best_metric, self.best_step = float(value), int(self.state.global_step)
            self._best_state = copy.deepcopy(
                {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            )

    def restore_best(self) -> None:
        """Put the best network seen at an evaluation back (nothing when there was no evaluation)."""
        if self._best_state is not None:
            self.net.load_state_dict(self._best_state)
            logger.info(
                "MEND: restored the best network (%s %.4g at step %s)",
                self.args.metric_for_best_model,
                self.best_metric,
                self.best_step,
            )

"""``SERACTrainingArguments`` + ``SERACTrainer``: SERAC's scope classifier and counterfactual model trained
under ``transformers.Trainer``, and :func:`train_serac`, which writes the artefact.

Every training example is one edit record of the train split. A batch of ``B`` records fills the cache
with their ``B`` edits (context text + the base model's pooled features of the edit prompt and image);
then, through the very routing the edited model uses (:class:`~.model.SERACModel` in soft mode,
``p = (1 - s) p_base + s p_cf``), the loss is EasyEdit's SERAC_MULTI loss

    ``rephrase_weight * NLL(rephrase) + image_rephrase_weight * NLL(image rephrase)
    + loc_weight * KL(p_base || p)(text locality)``  (0.1, 0.1, 1.0),

plus two terms of ours, switchable (weight ``0`` turns one off): ``m_loc_weight * KL`` on the multimodal
locality rows (EasyEdit has no image-locality term) and ``bce_weight * BCE`` of the best scope score
against in-scope (rephrase, image rephrase: 1) and out-of-scope (text and image locality: 0). The KL terms
are over the target tokens of the locality rows. On the training split only, two augmentations: the
rephrase and image rephrase are drawn from the record's ``rephrases`` / ``image_rephrases`` when it has
them, and with probability ``alt_resample`` the edit's new answer is replaced by the answer of another
record (so the counterfactual model learns to read the answer from the cached text rather than to
memorise the split's answers). Validation batches are the records as they are.

Evaluation reports ``eval_loss`` and, over the validation split, ``eval_scope_acc`` (the hard switch's
accuracy: in-scope rows above the threshold, locality rows below; also per group, ``eval_scope_acc_<group>``) and ``eval_cf_acc`` (token accuracy of
the hard-routed output on the rephrase and image-rephrase rows); early stopping watches ``eval_loss``
and the best evaluation's weights are restored at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from odedit_hf.editing.loss import model_inputs, nll_from_logits

from .artefact import Architecture, base_identity, save_artefact
from .layer import Linear
from .method import (
    adapter_tensors,
    context_ids,
    default_architecture,
    peft_config_for,
    prompt_markers,
    serac_layer,
    serac_tuner,
)

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

logger = logging.getLogger(__name__)

__all__ = ["SERACCollator", "SERACTrainer", "SERACTrainingArguments", "SERACTrainingConfig", "train_serac"]

_POSITIVE = ("rephrase", "image_rephrase")
_NEGATIVE = ("loc", "m_loc")


@dataclass
class SERACTrainingConfig:
    """What SERAC trains (the architecture) and on what loss.

    Args:
        rank, alpha: the counterfactual model's low-rank deltas (scaling ``alpha / rank``).
        cf_layers: decoder layers whose linear modules get deltas (``None``: all).
        proj_dim: the scope classifier's projection width.
        copy_dim: the counterfactual model's copy head width (``0``: none).
        cls_layer: the ``hidden_states`` entry the classifier pools (``-1``: the last).
        pooling: ``"last"`` (the last prompt position's state; default, see docs/editors/serac.md for the
            measurement) or ``"mean"`` (the mean over the prompt positions).
        similarity: ``"l2"`` (``exp(-scale * squared L2)``, EasyEdit) or ``"cos"``.
        threshold: the scope threshold used at inference and by ``eval_scope_acc``.
        rephrase_weight, image_rephrase_weight, loc_weight: EasyEdit's loss weights (0.1, 0.1, 1.0).
        m_loc_weight: KL on the multimodal locality rows (ours; ``0``: off).
        bce_weight: BCE of the scope score (ours; ``0``: off, the classifier then learns through the mixture
            only, as in EasyEdit).
        classifier_lr_scale: the classifier's learning rate is ``learning_rate * classifier_lr_scale``.
        val_fraction: share of the train records held out for validation (at least one record).
        alt_resample: probability of replacing a training edit's new answer by another record's answer.
        early_stopping_patience: evaluations without a better ``eval_loss`` before stopping.
    """

    rank: int = 16
    alpha: float = 32.0
    cf_layers: list[int] | None = None
    proj_dim: int = 64
    copy_dim: int = 32
    cls_layer: int = -1
    pooling: str = "last"
    similarity: str = "l2"
    threshold: float = 0.5
    rephrase_weight: float = 0.1
    image_rephrase_weight: float = 0.1
    loc_weight: float = 1.0
    m_loc_weight: float = 1.0
    bce_weight: float = 1.0
    classifier_lr_scale: float = 1.0
    val_fraction: float = 0.2
    alt_resample: float = 0.5
    early_stopping_patience: int = 5

    def __post_init__(self) -> None:
        for name in ("rephrase_weight", "image_rephrase_weight", "loc_weight", "m_loc_weight", "bce_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"SERACTrainingConfig.{name} must be a number >= 0, got {value!r}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ValueError(f"SERACTrainingConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0.0 <= float(self.alt_resample) <= 1.0:
            raise ValueError(f"SERACTrainingConfig.alt_resample must be in [0, 1], got {self.alt_resample!r}")
        if self.classifier_lr_scale <= 0:
            raise ValueError(
                f"SERACTrainingConfig.classifier_lr_scale must be > 0, got {self.classifier_lr_scale!r}"
            )
        if isinstance(self.early_stopping_patience, bool) or self.early_stopping_patience < 1:
            raise ValueError(
                "SERACTrainingConfig.early_stopping_patience must be an int >= 1, "
                f"got {self.early_stopping_patience!r}"
            )


@dataclass
class SERACTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with SERAC's preset for the embedded tiny world (CPU, minutes).

    Every ``TrainingArguments`` field works; the defaults changed here: ``learning_rate`` 1e-3 (EasyEdit:
    1e-5 over 50k steps), ``per_device_train_batch_size`` 8 (edits cached together), ``num_train_epochs``
    40, evaluation and logging every 12 steps, no checkpoints (the best evaluation's weights are kept in
    memory), ``remove_unused_columns`` False (the dataset holds edit records), ``report_to`` none.
    """

    output_dir: str | None = field(default=None, metadata={"help": "Trainer folder (no checkpoints)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Edits per batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Edits per eval batch."})
    num_train_epochs: float = field(default=40.0, metadata={"help": "Epochs over the train records."})
    eval_strategy: str = field(default="steps", metadata={"help": "Evaluate every eval_steps."})
    eval_steps: float | None = field(default=12, metadata={"help": "Steps between evaluations."})
    logging_steps: float = field(default=12, metadata={"help": "Steps between logs."})
    save_strategy: str = field(default="no", metadata={"help": "No checkpoints."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "No integrations."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False."})
    metric_for_best_model: str | None = field(default="eval_loss", metadata={"help": "Early stopping."})
    greater_is_better: bool | None = field(default=False, metadata={"help": "Lower eval_loss is better."})
    warmup_steps: float = field(default=0, metadata={"help": "No warm-up."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Batches built in-process."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Small CPU batches."})

    def __post_init__(self) -> None:
        if self.remove_unused_columns:
            raise ValueError(
                "SERACTrainingArguments.remove_unused_columns must be False: the dataset holds edit records"
            )
        super().__post_init__()


class _Records(torch.utils.data.Dataset):
    """Edit records, each with whether the collator augments it (the training split only)."""

    def __init__(self, requests: Sequence[EditRequest], *, augment: bool) -> None:
        self.requests = list(requests)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> tuple[EditRequest, bool]:
        return self.requests[index], self.augment


class SERACCollator:
    """Builds one training batch from ``B`` edit records: ``edit`` (prompt + image -> new answer, whose
    features fill the cache), ``context`` (``(B, L)`` cached texts, ``-1``-padded), ``rephrase``,
    ``image_rephrase``, ``loc`` and ``m_loc`` (teacher-forced batches; the image groups only for records
    with images). Items are ``(record, augment)`` pairs (see :class:`_Records`) or bare records (not
    augmented)."""

    def __init__(
        self, backbone: Backbone, config: SERACTrainingConfig, *, answers: Sequence[str] = (), seed: int = 0
    ) -> None:
        self.backbone = backbone
        self.config = config
        self.answers = sorted(set(answers))
        self.rng = random.Random(seed)

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        from odedit_hf.backbones import PromptSample
        from odedit_hf.data.images import load_rgb_image
        from odedit_hf.editors.ike.layer import pad_rows

        pairs = [item if isinstance(item, tuple) else (item, False) for item in items]
        requests = [r for r, _ in pairs]
        augment = any(a for _, a in pairs)
        kept = list(range(len(requests)))
        if any(r.text_only for r in requests) and not all(r.text_only for r in requests):
            kept = [i for i, r in enumerate(requests) if not r.text_only] or kept
            requests = [requests[i] for i in kept]
        text_only = requests[0].text_only
        groups: dict[str, list[PromptSample]] = {g: [] for g in ("edit", *_POSITIVE, *_NEGATIVE)}
        contexts = []
        for r in requests:
            alt = r.alt
            if augment and self.answers and self.rng.random() < self.config.alt_resample:
                others = [a for a in self.answers if a != r.alt]
                alt = self.rng.choice(others) if others else alt
            rephrase = r.rephrase
            if augment and r.rephrases:
                rephrase = self.rng.choice(list(r.rephrases))
            image = None if text_only else r.load_image("image")
            groups["edit"].append(PromptSample(prompt=r.src, target=alt, image=image, task=r.task))
            groups["rephrase"].append(PromptSample(prompt=rephrase, target=alt, image=image, task=r.task))
            groups["loc"].append(
                PromptSample(prompt=r.loc, target=r.loc_ans, task="vqa" if not text_only else r.task)
            )
            if not text_only:
                path = r.image_rephrase
                if augment and r.image_rephrases:
                    path = self.rng.choice(list(r.image_rephrases))
                rimage = load_rgb_image(path, source=r.source, index=r.case_id, field="image_rephrase")
                groups["image_rephrase"].append(
                    PromptSample(prompt=r.src, target=alt, image=rimage, task=r.task)
                )
                groups["m_loc"].append(
                    PromptSample(prompt=r.m_loc_q, target=r.m_loc_a, image=r.load_image("m_loc"), task="vqa")
                )
            contexts.append(context_ids(self.backbone, r.src, alt, r.task))
        out: dict[str, Any] = {
            name: self.backbone.build_batch(samples) for name, samples in groups.items() if samples
        }
        out["context"] = pad_rows(contexts)
        # which items the rows are (a mixed batch drops its text-only records), for the validation statistics
        out["kept"] = torch.tensor(kept, dtype=torch.long)
        out["n_items"] = len(items)
        return out


class _KeepBest(TrainerCallback):
    """Keeps a copy of the trainable tensors at the best ``eval_loss``; :meth:`restore` puts them back."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.best: float | None = None
        self.state: list[torch.Tensor] | None = None
        self.best_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001 - TrainerCallback API
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and (self.best is None or loss < self.best):
            self.best = float(loss)
            self.best_step = int(state.global_step)
            self.state = [p.detach().clone() for p in self.params]

    def restore(self) -> None:
        if self.state is not None:
            with torch.no_grad():
                for p, value in zip(self.params, self.state):
                    p.copy_(value)


class _LossModule(torch.nn.Module):
    """The module the Trainer wraps: the PEFT model, whose forward is SERAC's loss of one batch (every
    prompt group and the cache filled inside one forward). Under several processes the step then runs
    through one ``DistributedDataParallel`` forward, whose backward all-reduces the classifier's and the
    deltas' gradients once; and the cache (buffers) is loaded after the forward's buffer broadcast, never
    overwritten by the main process's batch."""

    def __init__(self, peft_model: Any, loss: Any) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.loss = loss  # the trainer's bound loss function (not a module)

    def forward(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(self.peft_model, inputs)


class SERACTrainer(Trainer):
    """``Trainer`` whose loss is SERAC's (see the module docstring).

    Args:
        model: a PEFT model with a SERAC adapter (its trainable tensors: the classifier and the deltas); the
            Trainer optimises it through a module whose forward is the loss (``trainer.peft_model`` is it).
        serac_config: the loss weights and threshold.
        *args, **kwargs: as ``Trainer``.
    """

    def __init__(self, model: Any, *args: Any, serac_config: SERACTrainingConfig, **kwargs: Any) -> None:
        self.peft_model = model
        super().__init__(_LossModule(model, self.serac_loss), *args, **kwargs)
        self.serac_config = serac_config
        self._eval_stats: dict[str, float] | None = None

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        total, terms = model(inputs)  # through DistributedDataParallel's forward under several processes
        return (total, {"terms": terms}) if return_outputs else total

    def serac_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SERAC's loss of one batch on the PEFT ``model`` and its detached terms."""
        cfg = self.serac_config
        tuner = serac_tuner(model)
        adapter = model.active_adapter
        layer = serac_layer(model, adapter)
        markers = layer.serac_markers[adapter]
        features = tuner.base_features(adapter, inputs["edit"])
        layer.load_cache(
            adapter,
            {"serac_cache_ids": inputs["context"], "serac_cache_feat": features, "serac_markers": markers},
        )
        weights = {
            "rephrase": cfg.rephrase_weight,
            "image_rephrase": cfg.image_rephrase_weight,
            "loc": cfg.loc_weight,
            "m_loc": cfg.m_loc_weight,
        }
        total = features.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        tuner.soft = True
        try:
            for group in (*_POSITIVE, *_NEGATIVE):
                if group not in inputs or (weights[group] == 0 and cfg.bce_weight == 0):
                    continue
                batch = inputs[group]
                mixed = model(**model_inputs(batch)).logits
                scores = tuner.last_scores
                labels = batch["labels"]
                positive = group in _POSITIVE
                if positive:
                    term = nll_from_logits(mixed, labels)
                else:
                    term = _kl_on_targets(tuner.last_base_logits.detach(), mixed, labels)
                terms[group] = term.detach()
                total = total + weights[group] * term
                if cfg.bce_weight > 0:
                    target = torch.full_like(scores, 1.0 if positive else 0.0)
                    bce = torch.nn.functional.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), target)
                    total = total + cfg.bce_weight * bce
                    terms[f"bce_{group}"] = bce.detach()
                if self._eval_stats is not None:
                    self._record(group, scores.detach(), tuner, labels, cfg.threshold)
        finally:
            tuner.soft = False
            layer.load_cache(adapter, {**layer.empty_cache(), "serac_markers": markers})
        return total, terms

    #: the per-record columns of the validation statistics (see :meth:`_record`)
    _COLUMNS = (
        *(f"scope_{kind}_{g}" for g in (*_POSITIVE, *_NEGATIVE) for kind in ("hits", "rows")),
        "cf_acc_sum",
        "cf_rows",
    )

    def _record(self, group: str, scores: torch.Tensor, tuner: Any, labels: torch.Tensor, th: float) -> None:
        """Per row (one per kept record of the batch): whether the scope switch routes it right, and for the
        in-scope groups the token accuracy of the hard-routed output; summed by :meth:`prediction_step`."""
        from odedit_hf.evaluation import token_accuracy

        rows = self._eval_rows
        routed = scores > th
        correct = routed if group in _POSITIVE else ~routed
        rows[:, self._COLUMNS.index(f"scope_hits_{group}")] = correct.to(rows.dtype)
        rows[:, self._COLUMNS.index(f"scope_rows_{group}")] = 1.0
        if group in _POSITIVE:
            # the hard switch's output: counterfactual logits where routed, base logits elsewhere
            base = tuner.last_base_logits.detach()
            cf = tuner.last_cf_logprobs.detach()
            hard = torch.where(routed[:, None, None], cf, base.float().log_softmax(-1))
            acc, _ = token_accuracy(hard, labels)
            rows[:, self._COLUMNS.index("cf_acc_sum")] += acc.to(rows.dtype)
            rows[:, self._COLUMNS.index("cf_rows")] += 1.0

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: ANN001 - Trainer API
        """The validation loss of one batch; its scope and counterfactual statistics are gathered across
        processes one row per record (the padding a process's last batch gets is dropped, as for
        ``eval_loss``), so that every process reports the statistics of the whole validation split."""
        inputs = self._prepare_inputs(inputs)
        kept = inputs["kept"]
        self._eval_rows = torch.zeros(
            len(kept), len(self._COLUMNS), dtype=torch.float64, device=self.args.device
        )
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        per_item = torch.zeros(
            int(inputs["n_items"]), len(self._COLUMNS), dtype=torch.float64, device=self.args.device
        )
        per_item[kept.to(per_item.device)] = self._eval_rows
        totals = self.accelerator.gather_for_metrics(per_item).sum(0).tolist()
        for name, value in zip(self._COLUMNS, totals):
            self._eval_stats[name] = self._eval_stats.get(name, 0.0) + value
        return loss.detach(), None, None

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._eval_stats = {}
        try:
            output = super().evaluation_loop(*args, **kwargs)
            stats = self._eval_stats
        finally:
            self._eval_stats = None
        prefix = kwargs.get("metric_key_prefix", args[3] if len(args) > 3 else "eval")
        groups = (*_POSITIVE, *_NEGATIVE)
        scope_rows = sum(stats.get(f"scope_rows_{g}", 0.0) for g in groups)
        if scope_rows:
            scope_hits = sum(stats.get(f"scope_hits_{g}", 0.0) for g in groups)
            output.metrics[f"{prefix}_scope_acc"] = scope_hits / scope_rows
        for group in (*_POSITIVE, *_NEGATIVE):
            if stats.get(f"scope_rows_{group}"):
                output.metrics[f"{prefix}_scope_acc_{group}"] = (
                    stats[f"scope_hits_{group}"] / stats[f"scope_rows_{group}"]
                )
        if stats.get("cf_rows"):
            output.metrics[f"{prefix}_cf_acc"] = stats["cf_acc_sum"] / stats["cf_rows"]
        return output


def _kl_on_targets(
    base_logits: torch.Tensor, mixed_logprobs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean over the target tokens of ``KL(p_base || p_mixed)`` (logits at ``t`` predict ``labels[t+1]``)."""
    from odedit_hf.backbones import IGNORE_INDEX

    mask = labels[:, 1:] != IGNORE_INDEX
    base = base_logits[:, :-1].float().log_softmax(-1)[mask]
    mixed = mixed_logprobs[:, :-1][mask]
    return (base.exp() * (base - mixed)).sum(-1).mean()


def _init_scale(
    peft_model: Any,
    backbone: Backbone,
    layer: Any,
    adapter: str,
    records: Sequence[EditRequest],
    batch_size: int,
) -> None:
    """Start the classifier's scale where the median distance between two different training edits scores
    0.1 (an untrained scale of 1 scores every input ~0 on a wide model, and the BCE / mixture gradients
    then vanish)."""
    import math

    from odedit_hf.editing.editor import model_device
    from odedit_hf.editing.samples import edit_samples

    tuner = serac_tuner(peft_model)
    feats = []
    for start in range(0, len(records), batch_size):
        group = [r for r in records[start : start + batch_size] if not r.text_only] or list(
            records[start : start + batch_size]
        )
        batch = backbone.build_batch(edit_samples(group), device=model_device(peft_model))
        feats.append(tuner.base_features(adapter, batch))
    with torch.no_grad():
        proj = layer.project(adapter, torch.cat(feats))
        if layer.serac_similarity[adapter] != "l2" or proj.shape[0] < 2:
            return
        dist = torch.cdist(proj, proj).pow(2)
        off = dist[~torch.eye(dist.shape[0], dtype=torch.bool, device=dist.device)]
        median = float(off.median())
        if median > 0:
            layer.serac_log_scale[adapter].fill_(math.log(math.log(10.0) / median))


def _split(requests: Sequence[EditRequest], fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    n_val = min(len(requests) - 1, max(1, round(len(requests) * fraction)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [requests[i] for i in train], [requests[i] for i in val]


def train_serac(
    backbone: Backbone,
    train_requests: Sequence[EditRequest],
    out_dir: str,
    config: SERACTrainingConfig | None = None,
    args: TrainingArguments | None = None,
) -> str:
    """Train SERAC's scope classifier and counterfactual model for ``backbone`` and write the artefact.

    Args:
        backbone: the base model; it is wrapped for training and unwrapped afterwards (its weights never
            change: only the adapter's classifier and deltas train).
        train_requests: edit records of a train split (at least two; ``config.val_fraction`` of them is held
            out for validation).
        out_dir: the artefact folder (written atomically; see :mod:`.artefact`).
        config: architecture and loss (default :class:`SERACTrainingConfig`).
        args: ``TrainingArguments`` (default :class:`SERACTrainingArguments` with ``output_dir`` inside
            ``out_dir``'s parent, no checkpoints).

    Under several processes (``torchrun`` / ``accelerate launch``; one replica per process) the Trainer
    all-reduces the gradients, so every process ends with the same weights; only the main process writes
    ``out_dir`` and every process returns once it is written. A batch fills the cache with its own edits:
    ``per_device_train_batch_size`` is the cache each loss routes through, so ``N`` processes of batch ``B``
    are not one process of batch ``N·B`` (the scope classifier competes among ``B`` edits, not ``N·B``).

    Returns:
        ``out_dir`` (absolute), ready for ``SERACMethod(editor_weights=out_dir)``.
    """
    return run_serac_training(backbone, train_requests, out_dir, config, args)[0]


def run_serac_training(
    backbone: Backbone,
    train_requests: Sequence[EditRequest],
    out_dir: str,
    config: SERACTrainingConfig | None = None,
    args: TrainingArguments | None = None,
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """:func:`train_serac`, also returning the artefact's training record and history (on every process:
    only the main process writes the artefact)."""
    import os
    import tempfile
    import time

    from peft import get_peft_model

    config = config or SERACTrainingConfig()
    requests = list(train_requests)
    if len(requests) < 2:
        raise ValueError(
            f"train_serac: need at least 2 train records (one for validation), got {len(requests)}"
        )
    scratch = None
    if args is None:
        scratch = tempfile.mkdtemp(prefix="serac-trainer-")
        args = SERACTrainingArguments(output_dir=scratch)
    if getattr(args, "remove_unused_columns", False):
        raise ValueError(
            "train_serac: args.remove_unused_columns must be False (the dataset holds edit records)"
        )
    train, val = _split(requests, config.val_fraction, args.seed)
    answers = [r.alt for r in train] + [r.pred for r in train]
    architecture: Architecture = default_architecture(
        backbone,
        rank=config.rank,
        alpha=config.alpha,
        proj_dim=config.proj_dim,
        copy_dim=config.copy_dim,
        cls_layer=config.cls_layer,
        pooling=config.pooling,
        similarity=config.similarity,
        cf_layers=config.cf_layers,
    )
    identity = base_identity(backbone.base_model)
    was_training = backbone.model.training
    torch.manual_seed(args.seed)
    peft_model = get_peft_model(backbone.model, peft_config_for(architecture, config.threshold))
    try:
        peft_model.eval()  # dropout off in the frozen base; the Trainer's train() is undone below
        adapter = peft_model.active_adapter
        layer = serac_layer(peft_model, adapter)
        layer.set_markers(adapter, prompt_markers(backbone))
        classifier = layer.classifier_parameters(adapter)
        _init_scale(peft_model, backbone, layer, adapter, train, args.per_device_train_batch_size)
        deltas = [
            p for m in peft_model.modules() if isinstance(m, Linear) for p in m.delta_parameters(adapter)
        ]
        classifier = classifier + layer.copy_parameters(
            adapter
        )  # the copy head learns at the classifier's rate
        for p in [*classifier, *deltas]:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [
                {"params": deltas, "lr": args.learning_rate},
                {"params": classifier, "lr": args.learning_rate * config.classifier_lr_scale},
            ],
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
        )
        keep = _KeepBest([*classifier, *deltas])
        trainer = SERACTrainer(
            peft_model,
            args=args,
            train_dataset=_Records(train, augment=True),
            eval_dataset=_Records(val, augment=False),
            # each process draws its own augmentations (the same draws on every process would pair them up)
            data_collator=SERACCollator(
                backbone, config, answers=answers, seed=args.seed + 1_000_003 * args.process_index
            ),
            optimizers=(optimizer, None),
            callbacks=[EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience), keep],
            serac_config=config,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        keep.restore()
        for p in [*classifier, *deltas]:
            p.requires_grad_(False)
        tensors = adapter_tensors(peft_model, adapter)
        history = list(trainer.state.log_history)
        logger.info(
            "SERAC: trained in %.1f s (%d steps; best eval_loss %s at step %s)",
            seconds,
            trainer.state.global_step,
            keep.best,
            keep.best_step,
        )
    finally:
        peft_model.unload()
        backbone.model.train(was_training)
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    training = {
        "config": dataclasses.asdict(config),
        "arguments": {
            k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))
        },
        "train_records": len(train),
        "val_records": len(val),
        "train_seconds": seconds,
        "steps": trainer.state.global_step,
        "best_eval_loss": keep.best,
        "best_step": keep.best_step,
    }
    out_dir = os.path.abspath(out_dir)
    if trainer.is_world_process_zero():
        save_artefact(
            out_dir,
            architecture,
            tensors,
            threshold=config.threshold,
            identity=identity,
            training=training,
            history=history,
        )
    trainer.accelerator.wait_for_everyone()
    return out_dir, training, history

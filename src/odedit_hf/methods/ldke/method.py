"""``LDKEMethod``: LDKE as a wrapper method (``--method ldke+EDITOR``).

Per edit (:meth:`LDKEMethod.before_edit`, after the wrapped editor's own ``before_edit``):

1. **Disentanglement Classifier** (``classifier``): one forward pass over the edit's environment
   prompts (:func:`~odedit_hf.editing.environments.build_edit_batch`) reads the classifier features;
   a logistic probe is trained with the answer-predicting positions of the edit prompt and its
   rephrases as positives, every position of the locality prompts and of earlier edits' prompts as
   negatives, and stored in the adapter's classifier state.
2. **Fast Localization** (``localization``): one forward + backward of the edit prompt's NLL scores each
   candidate decoder layer (``|dL/dW · W|`` summed over its edited projections, or ``‖dL/dW‖``) and
   keeps the ``k`` best; :meth:`edit_parameters` then gives the loop only the editor's parameters in
   those layers. The chosen layers and the time it took are in :attr:`LDKEMethod.localization_log`.

The loop is the shared one on the plain target NLL plus the editor's own terms
(:class:`~odedit_hf.editing.NLLObjective`), so LDKE+X and X stop at the same reliability.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from odedit_hf.editing.editor import Editor, FFNEditor, model_device
from odedit_hf.editing.environments import IGNORE_INDEX, build_edit_batch
from odedit_hf.editing.loss import target_nll
from odedit_hf.editing.samples import edit_samples
from odedit_hf.editing.wrapper import Wrapper

from .classifier import GateSnapshot, train_logistic
from .config import LDKEConfig

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import EditStats
    from odedit_hf.editing.rollback import BaseWeights

    from .model import LDKEModel

logger = logging.getLogger(__name__)

__all__ = ["LDKEMethod", "LDKESnapshot", "layer_scores"]

_POSITIVE_GROUPS = ("edit", "rephrase", "image_rephrase")
_NEGATIVE_GROUPS = ("loc", "m_loc")


class LDKESnapshot:
    """The wrapped editor's snapshot plus the classifier state's; ``restore()`` restores both."""

    def __init__(self, editor_snapshot: Any, gate: GateSnapshot) -> None:
        self.editor_snapshot = editor_snapshot
        self.gate = gate

    def restore(self) -> None:
        self.editor_snapshot.restore()
        self.gate.restore()


def layer_scores(
    peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest], score: str
) -> dict[int, float]:
    """Fast Localization's attribution: one forward + backward of the requests' target NLL.

    For every adapter layer (module ``m`` in decoder layer ``l``) with input ``x`` and output ``y``,
    ``dL/dW = Σ_t (dL/dy_t) x_tᵀ`` for its base weight ``W``; the layer's score sums
    ``Σ |dL/dW ⊙ W|`` (``"grad_x_weight"``) or ``‖dL/dW‖_F`` (``"grad_norm"``) over its modules. A base
    layer without a 2-D weight of shape ``(out, in)`` scores ``Σ |dL/dy ⊙ y|`` instead.
    """
    tuner: LDKEModel = peft_model.base_model
    records: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> Any:
        if tuner.layer_index_of(module) is None or not isinstance(output, torch.Tensor):
            return None
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        records.append((module, args[0].detach(), output))
        return output

    modules = [m for m in peft_model.modules() if tuner.layer_index_of(m) is not None]
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        batch = backbone.build_batch(edit_samples(requests), device=model_device(peft_model))
        with torch.enable_grad():
            loss = target_nll(peft_model, backbone, batch)
            grads = torch.autograd.grad(loss, [y for _, _, y in records], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    scores: dict[int, float] = {i: 0.0 for i in tuner.candidate_layers()}
    with torch.no_grad():
        for (module, x, y), g in zip(records, grads):
            if g is None:
                continue
            index = tuner.layer_index_of(module)
            weight = getattr(module.get_base_layer(), "weight", None)
            g2 = g.reshape(-1, g.shape[-1]).float()
            x2 = x.reshape(-1, x.shape[-1]).float()
            if weight is not None and weight.dim() == 2 and tuple(weight.shape) == (g2.shape[1], x2.shape[1]):
                grad_w = g2.T @ x2
                value = (grad_w * weight.float()).abs().sum() if score == "grad_x_weight" else grad_w.norm()
            else:
                value = (g2 * y.detach().reshape(-1, y.shape[-1]).float()).abs().sum()
            scores[index] += float(value)
    return scores


class LDKEMethod(Wrapper):
    """LDKE around a base editor method.

    Args:
        editor: the wrapped editing method (e.g. ``get_method("lora")``, ``get_method("ftl")``); its loop
            (step budget, learning rate, early stop) is LDKE's too.
        **options: :class:`LDKEConfig` hyperparameters (``k``, ``localization``, ``classifier``, ...).

    Attributes:
        localization_log: one entry per edit: ``case_ids``, the chosen ``layers``, the per-layer
            ``scores``, ``localization_s`` and ``classifier_s`` (seconds).
    """

    name: ClassVar[str] = "ldke"
    config_class: ClassVar[type[LDKEConfig]] = LDKEConfig

    def __init__(self, editor: Editor, **options: Any) -> None:
        self.editor = editor
        allowed = set(LDKEConfig.option_names())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"LDKEMethod: unknown LDKE hyperparameters {unknown}; known: {sorted(allowed)}")
        self._options = dict(options)
        self._check_editor()
        if self._options.get("candidate_layers") is not None and not isinstance(editor, FFNEditor):
            raise ValueError(
                f"LDKEMethod: candidate_layers applies to FFN editors (ftl, lora); {editor.name!r} chooses its "
                f"own layer: set the editor's layer option instead"
            )
        self.localization_log: list[dict[str, Any]] = []
        self._chosen: set[int] | None = None
        self._pool: list[torch.Tensor] = []

    def __repr__(self) -> str:
        return f"LDKEMethod(editor={self.editor!r}, options={self._options!r})"

    def options(self) -> dict[str, Any]:
        return {"editor": self.editor, **self._options}

    @property
    def merges(self) -> bool:
        """Whether an LDKE adapter may be merged: only with the classifier off."""
        return not self._options.get("classifier", True)

    # ------------------------------------------------------------------ the adapter
    def peft_config(self, backbone: Backbone) -> LDKEConfig:
        """The editor's config on the candidate layers (FFN editors: ``candidate_layers``, default all)."""
        editor = self.editor
        candidates = self._options.get("candidate_layers")
        if isinstance(editor, FFNEditor):
            if editor.layers is None:
                layers = list(range(backbone.num_layers())) if candidates is None else list(candidates)
                editor = dataclasses.replace(editor, layers=layers)
            elif candidates is not None and sorted(candidates) != sorted(editor.layers):
                raise ValueError(
                    f"LDKE: candidate_layers {candidates} and the editor's layers {list(editor.layers)} disagree; "
                    "set one of them"
                )
        return LDKEConfig(editor=editor.peft_config(backbone), **self.config_options())

    def config_options(self) -> dict[str, Any]:
        return dict(self._options)

    def _config(self, peft_model: PeftModel) -> LDKEConfig:
        adapter = peft_model.active_adapter
        config = peft_model.peft_config[adapter]
        if not isinstance(config, LDKEConfig):
            raise ValueError(
                f"LDKEMethod: adapter {adapter!r} is a {type(config).__name__}; wrap the model with "
                "get_peft_model(model, method.peft_config(backbone))"
            )
        return config

    def snapshot(
        self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None
    ) -> LDKESnapshot:
        """The editor's snapshot and a copy of the classifier state (both restored by ``restore()``)."""
        return LDKESnapshot(
            self.editor.snapshot(peft_model, adapter_name, base=base),
            GateSnapshot(peft_model.base_model.gate_state(adapter_name)),
        )

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """The editor's edit parameters in the layers Fast Localization chose (all, before any edit)."""
        params = self.editor.edit_parameters(peft_model)
        if self._chosen is None:
            return params
        tuner: LDKEModel = peft_model.base_model
        layer_of_param: dict[int, int] = {}
        for module in peft_model.modules():
            index = tuner.layer_index_of(module)
            if index is None:
                continue
            base_ids = {id(p) for p in module.get_base_layer().parameters()}
            for p in module.parameters():
                if id(p) not in base_ids:
                    layer_of_param[id(p)] = index
        kept = [
            p for p in params if layer_of_param.get(id(p), -1) in self._chosen or id(p) not in layer_of_param
        ]
        if not kept:
            raise ValueError(
                f"LDKE: the editor has no edit parameter in the chosen layers {sorted(self._chosen)}; "
                "raise k or turn localization off"
            )
        return kept

    # ------------------------------------------------------------------ the edit
    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Edit ``requests`` into the active adapter: classifier, localisation, then the shared loop."""
        self._config(peft_model)
        if len(requests) > 1 and not self.editor.supports_batch:
            raise ValueError(
                f"{self.name}: the editor {self.editor.name!r} edits one request at a time (got {len(requests)})"
            )
        try:
            return super().edit(peft_model, backbone, requests)
        finally:
            self._chosen = None

    def before_edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> None:
        self.editor.before_edit(peft_model, backbone, requests)
        config = self._config(peft_model)
        tuner: LDKEModel = peft_model.base_model
        state = tuner.gate_state()
        entry: dict[str, Any] = {"case_ids": [int(r.case_id) for r in requests]}
        start = time.perf_counter()
        if config.classifier:
            if int(state.count) + len(requests) > state.capacity:
                raise ValueError(
                    f"LDKE: {int(state.count)} of {state.capacity} classifier slots are used and this edit needs "
                    f"{len(requests)} more; raise --ldke.classifier_capacity"
                )
            for request in requests:
                self._train_classifier(peft_model, backbone, request, config)
        entry["classifier_s"] = time.perf_counter() - start
        candidates = tuner.candidate_layers()
        start = time.perf_counter()
        if config.localization and len(candidates) > config.k:
            scores = layer_scores(peft_model, backbone, requests, config.localization_score)
            chosen = sorted(sorted(scores, key=lambda i: (-scores[i], i))[: config.k])
            entry["scores"] = {str(i): s for i, s in scores.items()}
        else:
            chosen = list(candidates)
        entry["localization_s"] = time.perf_counter() - start
        entry["layers"] = chosen
        self._chosen = set(chosen)
        with torch.no_grad():
            state.used_layers[chosen] = 1
        self.localization_log.append(entry)
        logger.info(
            "LDKE: edit %s -> layers %s (localisation %.3fs, classifier %.3fs)",
            entry["case_ids"],
            chosen,
            entry["localization_s"],
            entry["classifier_s"],
        )

    def _train_classifier(
        self, peft_model: PeftModel, backbone: Backbone, request: EditRequest, config: LDKEConfig
    ) -> None:
        tuner: LDKEModel = peft_model.base_model
        groups = (*_POSITIVE_GROUPS, *_NEGATIVE_GROUPS)
        edit_batch = build_edit_batch(
            backbone, [request], groups, num_rephrases=config.num_rephrases, device=model_device(peft_model)
        )
        pos: list[torch.Tensor] = []
        neg: list[torch.Tensor] = []
        anchor: list[torch.Tensor] = []
        with torch.no_grad():
            for b, batch in enumerate(edit_batch.batches):
                backbone.forward({k: v for k, v in batch.items() if k != "labels"})
                features = tuner.last_features()
                if features is None:
                    raise ValueError(
                        "LDKE: the classifier features were not captured; is the LDKE adapter active?"
                    )
                answer = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
                answer[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
                valid = batch["attention_mask"].bool()
                for group, (bi, lo, hi) in edit_batch.slices.items():
                    if bi != b:
                        continue
                    rows = features[lo:hi]
                    if group in _POSITIVE_GROUPS:
                        picked = rows[answer[lo:hi]]
                        pos.append(picked)
                        if group == "edit":
                            anchor.append(picked)
                    else:
                        neg.append(rows[valid[lo:hi]])
        positives = torch.cat(pos)
        own_negatives = torch.cat(neg)
        pool = torch.cat(self._pool) if self._pool else own_negatives[:0]
        negatives = torch.cat([own_negatives, pool.to(own_negatives.device)])
        weight, bias = train_logistic(
            positives,
            negatives,
            steps=config.classifier_steps,
            lr=config.classifier_lr,
            weight_decay=config.classifier_weight_decay,
            anchor=torch.cat(anchor),
        )
        anchor_logits = torch.cat(anchor) @ weight + bias
        if bool((anchor_logits <= 0).any()):
            logger.warning(
                "LDKE: the classifier of case %s does not fire on %d of the edit prompt's %d answer positions; "
                "the edit cannot hold there (raise classifier_steps or lower classifier_weight_decay)",
                request.case_id,
                int((anchor_logits <= 0).sum()),
                anchor_logits.numel(),
            )
        tuner.gate_state().add(weight, bias)
        if config.negative_pool:
            # this edit's prompts are unrelated records for the next edits (positives and negatives alike)
            self._pool.append(torch.cat([positives, own_negatives]).cpu())
            while sum(len(p) for p in self._pool) > config.negative_pool and len(self._pool) > 1:
                self._pool.pop(0)
            if sum(len(p) for p in self._pool) > config.negative_pool:
                self._pool[0] = self._pool[0][-config.negative_pool :]

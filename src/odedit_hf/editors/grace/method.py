"""GRACE as an :class:`~odedit_hf.editing.Editor` (``get_method("grace")``): the codebook grows in
``before_edit``, the current edit's value is trained by the shared loop on the target NLL."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from odedit_hf.editing.editor import Editor, model_device, no_layer_changes

from .config import REPLACEMENTS, VALUE_INITS

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import EditStats
    from odedit_hf.editing.rollback import BaseWeights

    from .config import GRACEConfig
    from .layer import GRACELayer

logger = logging.getLogger(__name__)

__all__ = ["EXPAND_SLACK", "GRACEMethod", "GRACESnapshot", "grace_layers"]

#: Relative margin added to a radius widened to ``d`` (expand): the new query lies exactly on the
#: boundary, and its layer input recomputed in another batch (the evaluation's, ODEdit's environments)
#: differs by float rounding, which would put it just outside.
EXPAND_SLACK = 1e-3


def grace_layers(peft_model: Any, adapter_name: str) -> list[tuple[str, GRACELayer]]:
    """``(module name, layer)`` of every GRACE layer of ``peft_model`` that holds ``adapter_name``, in
    module order."""
    from .layer import GRACELayer

    return [
        (name, module)
        for name, module in peft_model.named_modules()
        if isinstance(module, GRACELayer) and adapter_name in module.grace_keys
    ]


class GRACESnapshot:
    """The codebooks of one adapter at a point in time; :meth:`restore` puts them back exactly (size,
    keys, radii, labels, values, and which values are trainable), so a rollback deletes the entries
    added since and undoes every radius change.

    Args:
        peft_model: the PEFT-wrapped model.
        adapter_name: the adapter whose codebooks to copy.
    """

    def __init__(self, peft_model: Any, adapter_name: str) -> None:
        layers = grace_layers(peft_model, adapter_name)
        if not layers:
            raise ValueError(
                f"GRACESnapshot: the model has no GRACE layer holding adapter {adapter_name!r}; "
                "wrap it with get_peft_model(model, method.peft_config(backbone)) first"
            )
        self.adapter_name = adapter_name
        self._states = [(layer, layer.codebook_state(adapter_name)) for _, layer in layers]

    @property
    def sizes(self) -> list[int]:
        """The codebook size of every layer at the snapshot."""
        return [int(state["keys"].shape[0]) for _, state in self._states]

    def restore(self) -> None:
        """Put every codebook back to its state at the snapshot."""
        for layer, state in self._states:
            layer.load_codebook_state(self.adapter_name, state)


def _check_positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"GRACEMethod.{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass
class GRACEMethod(Editor):
    """GRACE (Hartvigsen et al. 2023): a codebook at one layer. An edit's key is the layer input at the last
    prompt token; a query within a key's radius gets that key's trained value as the layer output.

    Per edit (``before_edit``), with ``d`` the distance from the new key to its nearest key: ``d > eps_init +
    ε_nearest`` adds an entry (radius ``eps_init``); otherwise a different label adds an entry and sets both
    radii to ``d / 2`` (split), and the same label widens the nearest radius to ``d`` (expand, with a relative
    margin of :data:`EXPAND_SLACK`; that entry's value is trained again). Only the current edit's value is trainable; it is trained with Adam on the
    target NLL by the shared loop. Sequential edits grow the codebook; a snapshot's ``restore`` shrinks it.

    Args:
        layer: the decoder layer of the codebook (negative from the end); default the last of the
            backbone's ``default_edit_layers``.
        projection: the FFN projection inside that layer (e.g. ``mlp.down_proj``); default the family's last
            ``default_edit_projections`` entry.
        steps: the most Adam steps per edit (the GRACE repo: 100; EasyEdit's multimodal configs: 20).
        lr: Adam learning rate of the value (GRACE and EasyEdit: 1.0).
        stop_loss: stop an edit once the target NLL is below this (``none``: never early).
        weight_decay: Adam weight decay on the value.
        max_grad_norm: clip the gradient norm to this value (``none``: no clipping).
        eps_init: radius of a new key, in the units of the codebook layer's input (EasyEdit: 1.0).
        replacement: positions a hit replaces: ``span`` (the hit and the following positions up to the
            key's number of target tokens, so every teacher-forced target position gets the value) or
            ``last`` (only positions whose own query is within a radius, EasyEdit's ``replace_last``).
        value_init: ``cold`` (a new value is uniform in [0, 1), as GRACE) or ``warm`` (the layer's output at
            the key position).
    """

    layer: int | None = None
    projection: str | None = None
    steps: int = 100
    lr: float = 1.0
    stop_loss: float | None = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    eps_init: float = 1.0
    replacement: str = "span"
    value_init: str = "cold"

    name: ClassVar[str] = "grace"

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"GRACEMethod.layer must be a decoder layer index or None, got {self.layer!r}")
        if self.projection is not None and (not isinstance(self.projection, str) or not self.projection):
            raise ValueError(
                f"GRACEMethod.projection must be a module name inside a layer (e.g. 'mlp.down_proj'), "
                f"got {self.projection!r}"
            )
        self.eps_init = _check_positive("eps_init", self.eps_init)
        if self.replacement not in REPLACEMENTS:
            raise ValueError(
                f"GRACEMethod.replacement must be one of {', '.join(REPLACEMENTS)}, got {self.replacement!r}"
            )
        if self.value_init not in VALUE_INITS:
            raise ValueError(
                f"GRACEMethod.value_init must be one of {', '.join(VALUE_INITS)}, got {self.value_init!r}"
            )
        self.loop  # noqa: B018 - validates the loop fields now, where the user set them
        #: per request of the last edit: ("add" | "split" | "expand", codebook index), for inspection
        self.last_updates: list[tuple[str, int]] = []

    # ------------------------------------------------------------------ what the edit trains
    def target_module(self, backbone: Backbone) -> str:
        """The fully qualified name of the codebook's ``nn.Linear``: the last module of the backbone's
        ``default_edit_module_names`` (narrowed to ``layer`` / ``projection`` when set)."""
        names = backbone.default_edit_module_names(
            layers=None if self.layer is None else [self.layer],
            projections=None if self.projection is None else [self.projection],
        )
        return names[-1]

    def peft_config(self, backbone: Backbone) -> GRACEConfig:
        from .config import GRACEConfig

        return GRACEConfig(
            target_modules=[self.target_module(backbone)],
            eps_init=self.eps_init,
            replacement=self.replacement,
            value_init=self.value_init,
        )

    # ------------------------------------------------------------------ hooks
    def before_edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> None:
        """Compute each request's key (the codebook layer's input at the last prompt token, one forward pass
        of the edit prompts with a hook, detached), apply the add / split / expand rule, and make the values
        this edit selects the only trainable ones."""
        from odedit_hf.backbones import IGNORE_INDEX
        from odedit_hf.editing.loss import model_inputs
        from odedit_hf.editing.samples import edit_samples

        adapter = peft_model.active_adapter
        layers = grace_layers(peft_model, adapter)
        if not layers:
            raise ValueError(
                f"GRACE: the model has no GRACE layer for the active adapter {adapter!r}; wrap it with "
                "get_peft_model(model, method.peft_config(backbone))"
            )
        batch = backbone.build_batch(edit_samples(requests), device=model_device(peft_model))
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def recorder(name: str):  # noqa: ANN202
            def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
                captured[name] = (args[0].detach(), output.detach())

            return hook

        handles = [layer.get_base_layer().register_forward_hook(recorder(name)) for name, layer in layers]
        try:
            with torch.no_grad():
                backbone.forward(model_inputs(batch))
        finally:
            for handle in handles:
                handle.remove()
        labels = batch["labels"]
        is_target = labels != IGNORE_INDEX
        key_positions = is_target.int().argmax(dim=1) - 1  # the last prompt token: before the first target
        if bool((key_positions < 0).any()):
            raise ValueError("GRACE: an edit sample has no prompt token before its target; give a prompt")
        self.last_updates = []
        for name, layer in layers:
            if name not in captured:
                raise ValueError(
                    f"GRACE: the codebook layer {name} did not run on the edit prompts; is it part of the model's "
                    "forward for these inputs?"
                )
            inputs, outputs = captured[name]
            chosen = []
            for row, position in enumerate(key_positions.tolist()):
                query = inputs[row, position]
                target = labels[row][is_target[row]].tolist()
                # one value row per position the hit replaces: the key's and, for "span", every
                # teacher-forced target position after it (the positions predicting the target tokens)
                rows = len(target) if layer.grace_replacement[adapter] == "span" else 1
                if layer.grace_value_init[adapter] == "warm":
                    value = outputs[row, position : position + rows]
                else:
                    value = torch.rand(rows, layer.out_features, device=query.device)
                action, index = _update_codebook(layer, adapter, query, target, value)
                chosen.append(index)
                self.last_updates.append((action, index))
            layer.set_trainable(adapter, chosen)

    def after_edit(
        self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest], stats: EditStats
    ) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            sizes = [
                layer.codebook_size(peft_model.active_adapter)
                for _, layer in grace_layers(peft_model, peft_model.active_adapter)
            ]
            logger.debug("GRACE: %s; codebook sizes %s; %d steps", self.last_updates, sizes, stats.steps)

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """The values of the current edit's entries (set by :meth:`before_edit`), in module order."""
        adapter = peft_model.active_adapter
        params = [
            layer.grace_values[adapter][i]
            for _, layer in grace_layers(peft_model, adapter)
            for i in layer.trainable_indices(adapter)
        ]
        if not params:
            raise ValueError(
                "GRACE: no value is selected for training; edit_parameters is meaningful after before_edit "
                "(method.edit calls it)"
            )
        return params

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """True only when every active GRACE codebook is empty (a cold value changes outputs at once)."""
        from .layer import GRACELayer

        return no_layer_changes(peft_model, GRACELayer, lambda layer, name: layer.codebook_size(name) > 0)

    def snapshot(
        self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None
    ) -> GRACESnapshot:
        """A :class:`GRACESnapshot` of the adapter's codebooks (``base`` is not needed: the base weights are
        never written)."""
        return GRACESnapshot(peft_model, adapter_name)


def _update_codebook(
    layer: GRACELayer, adapter: str, query: torch.Tensor, target: list[int], value: torch.Tensor
) -> tuple[str, int]:
    """GRACE's rule for one new key; returns the action and the index of the entry the edit trains."""
    eps_init = layer.grace_eps_init[adapter]
    distance, nearest = layer.nearest(adapter, query)
    if nearest < 0 or distance > eps_init + float(layer.grace_radii[adapter][nearest]):
        return "add", layer.add_entry(adapter, query, target, eps_init, value)
    if layer.label(adapter, nearest) != target:
        index = layer.add_entry(adapter, query, target, distance / 2, value)
        layer.set_radius(adapter, nearest, distance / 2)
        return "split", index
    if distance > float(layer.grace_radii[adapter][nearest]):
        layer.set_radius(adapter, nearest, distance * (1.0 + EXPAND_SLACK))
    return "expand", nearest

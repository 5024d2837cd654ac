"""The editor contract: :class:`Editor`, every hook a base editor or a wrapper method may implement,
each with a no-op default.

A base editor (``odedit_hf/editors/<name>/``) decides *which* parameters an edit trains and *how* they
act in the forward pass (its PEFT config and adapter layers). A wrapper method
(``odedit_hf/methods/<name>/``, see :mod:`odedit_hf.editing.wrapper`) wraps a base editor and decides
the objective. Both step through :func:`~odedit_hf.editing.loop.run_edit_loop`; the protocols
(:mod:`odedit_hf.evaluation.protocols`) own the adapter's life and call the hooks below in this order
for every edit::

    snapshot = method.snapshot(peft_model, adapter_name, base)   # once, right after wrapping
    method.edit(peft_model, backbone, requests)                    # -> before_edit, the loop, after_edit
    snapshot.restore()                                             # single / batch: roll back

Hooks (override what the editor needs; the defaults do nothing):

- :meth:`Editor.before_edit` -- grow the adapter for this edit (GRACE adds a codebook entry,
  T-Patcher adds patch neurons), cache what the editor's own losses need.
- :meth:`Editor.extra_loss` -- the editor's own loss terms, added to whatever objective runs (plain
  NLL, ODEdit's risk, ...): T-Patcher's activation and memory losses, WISE's margin loss.
- :meth:`Editor.after_edit` -- bookkeeping after the loop (WISE: shard, merge).
- :meth:`Editor.adapter_is_identity` -- ``True`` only when the active adapter changes no output
  *exactly* (lets ODEdit take the pre-edit state from step 0's forward).
- :meth:`Editor.edit_parameters` -- the tensors an edit optimises (default: the adapter's trainable
  parameters, in ``model.parameters()`` order).
- :meth:`Editor.snapshot` -- an object whose ``restore()`` rolls the adapter back to its state at the
  snapshot (default: a copy of the adapter parameters; editors whose state grows override it).
- Post-step constraints live in the adapter *layer* (:class:`ConstrainedLayer`), so that the per-edit
  loop and the Trainer path both apply them (:func:`apply_constraints`) after every optimiser step.

Class attributes declare what a wrapper may do with an editor (:attr:`Editor.wrappable`), whether an
edit trains parameters at all (:attr:`Editor.trains_at_edit`; IKE does not), whether it needs a
trained artefact (:attr:`Editor.needs_training`), and whether it can take several requests in one
edit (:attr:`Editor.supports_batch`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .loop import EditLoopConfig, run_edit_loop
from .loss import target_nll
from .protocol import EditStats
from .samples import edit_samples

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig, PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

    from .rollback import BaseWeights

logger = logging.getLogger(__name__)

__all__ = [
    "LOOP_FIELDS",
    "ConstrainedLayer",
    "Editor",
    "FFNEditor",
    "NLLObjective",
    "apply_constraints",
    "constrained_layers",
    "model_device",
    "no_layer_changes",
    "trainable_parameters",
]

#: Fields of an editor dataclass that configure the edit loop (see :class:`EditLoopConfig`).
LOOP_FIELDS: tuple[str, ...] = ("steps", "lr", "stop_loss", "weight_decay", "max_grad_norm")


def model_device(model: Any) -> Any:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def trainable_parameters(peft_model: Any) -> list[Any]:
    """The parameters an edit may train: those of the active adapter(s) with ``requires_grad``."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "no trainable parameter in the PEFT model; is the adapter active and not in inference mode?"
        )
    return params


class ConstrainedLayer:
    """Mixin of an adapter layer with a constraint applied after every optimiser step.

    Implement :meth:`apply_constraint` (in place, under ``torch.no_grad()``); :func:`apply_constraints`
    calls it for every active adapter, from the per-edit loop and from the Trainer path alike.
    """

    def apply_constraint(self, adapter_name: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def constrained_layers(model: Any) -> list[Any]:
    """The model's adapter layers that declare a post-step constraint."""
    return [m for m in model.modules() if isinstance(m, ConstrainedLayer)]


def apply_constraints(model: Any, layers: Sequence[Any] | None = None) -> None:
    """Apply every active adapter's post-step constraint (``layers``: from :func:`constrained_layers`)."""
    for layer in constrained_layers(model) if layers is None else layers:
        for name in layer.active_adapters:
            layer.apply_constraint(name)


def no_layer_changes(peft_model: Any, layer_type: type, changes: Any) -> bool:
    """True when the model has ``layer_type`` adapter layers, none merged, and ``changes(layer, name)`` is
    False for every active adapter name of every such layer (a helper for :meth:`Editor.adapter_is_identity`)."""
    import torch

    layers = [m for m in peft_model.modules() if isinstance(m, layer_type)]
    if not layers:
        return False
    with torch.no_grad():
        return not any(
            layer.merged or any(changes(layer, name) for name in layer.active_adapters) for layer in layers
        )


class NLLObjective:
    """The plain editors' objective: the target NLL of the edit batch plus the editor's own terms.

    Called by :func:`run_edit_loop` once per step; returns ``(total, stop_value, terms)`` where the
    early stop looks at the NLL alone (``R_rel`` in ODEdit's terms), so that every objective stops at
    the same reliability.
    """

    def __init__(self, editor: Editor, peft_model: Any, backbone: Backbone, batch: Mapping[str, Any]) -> None:
        self.editor = editor
        self.peft_model = peft_model
        self.backbone = backbone
        self.batch = batch

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        nll = target_nll(self.peft_model, self.backbone, self.batch)
        extra = self.editor.extra_loss(self.peft_model)
        total = nll
        for value in extra.values():
            total = total + value
        return total, nll, extra

    def after_optimizer_step(self, step: int) -> None:
        """Nothing: the plain objective has no dual variables."""


class Editor:
    """Base class of every editing method (base editors and wrapper methods).

    Subclasses are dataclasses whose fields are the method's hyperparameters (documented in the class
    docstring's ``Args:``; the CLI generates one ``--<name>.<field>`` option per field). They set the
    class attributes below and implement :meth:`peft_config`; everything else has a default.

    Attributes:
        name: the one name of the method: its folder, ``get_method`` name, PEFT type (upper case) and
            state-dict prefix (``name + "_"``).
        aliases: other names ``get_method`` and the CLI accept (e.g. ``ft`` for ``ftl``).
        kind: ``"editor"`` (a base editor) or ``"wrapper"`` (wraps a base editor).
        wrappable: whether a wrapper method (ODEdit, LDKE, ASAM) may wrap this editor.
        trains_at_edit: whether an edit optimises adapter parameters (IKE only changes prompts).
        needs_training: whether the editor needs a trained artefact before it can edit (MEND, SERAC).
        supports_batch: whether one edit may take several requests (the batch protocol).
        supports_gradient_checkpointing: whether an edit gives the same result when the decoder layers
            recompute their forward in the backward pass (``run_protocol(..., gradient_checkpointing=True)``):
            True only where no forward hook keeps per-forward state; checked by tests/test_checkpointing.py.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "editor"
    wrappable: ClassVar[bool] = True
    trains_at_edit: ClassVar[bool] = True
    needs_training: ClassVar[bool] = False
    supports_batch: ClassVar[bool] = True
    supports_gradient_checkpointing: ClassVar[bool] = False

    # ------------------------------------------------------------------ what the edit trains
    def peft_config(self, backbone: Backbone) -> PeftConfig:
        """The PEFT config whose adapter holds the edit (its targets from the backbone registry)."""
        raise NotImplementedError(f"{type(self).__name__} must implement peft_config(backbone)")

    @property
    def loop(self) -> EditLoopConfig:
        """The edit loop's budget and optimiser settings, from the fields named in :data:`LOOP_FIELDS`."""
        values = {f: getattr(self, f) for f in LOOP_FIELDS if hasattr(self, f)}
        return EditLoopConfig(**values)

    # ------------------------------------------------------------------ hooks (no-op defaults)
    def before_edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> None:
        """Called before the loop of every edit (grow the adapter, cache what :meth:`extra_loss` needs)."""

    def after_edit(
        self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest], stats: EditStats
    ) -> None:
        """Called after the loop of every edit (shard, merge, record statistics)."""

    def extra_loss(self, peft_model: PeftModel) -> dict[str, torch.Tensor]:
        """The editor's own loss terms of this step, already weighted (added to the objective)."""
        return {}

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """True only when the active adapter changes no output exactly (default: not known, False)."""
        return False

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """The tensors an edit optimises, in ``model.parameters()`` order."""
        return trainable_parameters(peft_model)

    def extra_memory_bytes(self, num_edit_parameters: int) -> int:
        """Bytes of the method's own state beyond the edit parameters, their gradients and Adam state (a
        hypernetwork, a λ-network, a memory), for :func:`odedit_hf.editing.memory.estimate_edit_memory`."""
        return 0

    def snapshot(self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None) -> Any:
        """An object whose ``restore()`` puts the adapter back to its state now (rollback, re-initialise)."""
        from .rollback import AdapterSnapshot

        return AdapterSnapshot(peft_model, adapter_name, base=base)

    # ------------------------------------------------------------------ the edit
    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Edit ``requests`` (one optimisation) into the active adapter of ``peft_model``.

        The default runs :meth:`before_edit`, the shared loop on :class:`NLLObjective` (the requests' edit
        prompts in one batch; the frozen vision tower runs once per image batch), then :meth:`after_edit`.
        """
        if len(requests) > 1 and not self.supports_batch:
            raise ValueError(
                f"{self.name}: this editor edits one request at a time (got {len(requests)}); "
                "use the single or sequential protocol"
            )
        self.before_edit(peft_model, backbone, requests)
        batch = backbone.build_batch(edit_samples(requests), device=model_device(peft_model))
        with backbone.frozen_vision_cache():
            stats = run_edit_loop(
                peft_model,
                self.edit_parameters(peft_model),
                self.loop,
                NLLObjective(self, peft_model, backbone, batch),
            )
        self.after_edit(peft_model, backbone, requests, stats)
        return stats

    # ------------------------------------------------------------------ options (CLI, results files)
    def options(self) -> dict[str, Any]:
        """The method's hyperparameters as a dict (its dataclass init fields)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def resolved_config(self) -> dict[str, Any]:
        """Everything that defines this method's behaviour, for results files (name + all options)."""
        return {"name": self.name, "options": _jsonable(self.options())}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Editor):
        return value.resolved_config()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _as_list(value: Any, kind: type) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, kind):
        return [value]
    return list(value)


class FFNEditor(Editor):
    """Shared part of the editors that act on the FFN projections of chosen decoder layers (FT-L, LoRA).

    Subclasses are dataclasses with ``layers`` and ``projections`` fields (``None``: the backbone
    registry's defaults).
    """

    layers: Sequence[int] | None
    projections: Sequence[str] | None

    def _normalise_targets(self) -> None:
        self.layers = _as_list(self.layers, int)
        self.projections = _as_list(self.projections, str)
        self.loop  # noqa: B018 - validates the loop fields now, where the user set them

    def target_modules(self, backbone: Backbone) -> list[str]:
        """Fully qualified names of the edited ``nn.Linear`` modules (backbone registry defaults).

        The one place where an FFN editor's default targets are worked out: ``layers`` default to the
        backbone's ``default_edit_layers()``, ``projections`` to the family's ``default_edit_projections``.
        """
        return backbone.default_edit_module_names(layers=self.layers, projections=self.projections)

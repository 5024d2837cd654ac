"""The plain editors (FT-L and LoRA) as :class:`~odedit_hf.editing.protocol.EditMethod` objects, and
the name -> method map used by the CLI.

The map holds ``"module:attribute"`` strings, imported only when a method is asked for, so adding a
method never imports the others (ODEdit registers itself with :func:`register_method`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .loop import EditLoopConfig, run_edit_loop
from .loss import target_nll
from .protocol import EditStats
from .samples import edit_samples

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

logger = logging.getLogger(__name__)

__all__ = [
    "FTMethod",
    "LoRAMethod",
    "available_methods",
    "get_method",
    "model_device",
    "register_method",
    "trainable_parameters",
]

# method name -> "module:callable"; the callable takes keyword hyperparameters and returns an EditMethod.
_METHODS: dict[str, str] = {
    "ft": "odedit_hf.editing.methods:FTMethod",
    "lora": "odedit_hf.editing.methods:LoRAMethod",
    "odedit": "odedit_hf.odedit.method:odedit_method",
}


def register_method(name: str, target: str, *, overwrite: bool = False) -> None:
    """Make ``get_method(name)`` build a method from ``target`` (``"package.module:factory"``), lazily.

    Raises:
        ValueError: ``target`` is not ``"module:attribute"``, or ``name`` is taken and ``overwrite`` is false.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"register_method: name must be a non-empty string without spaces, got {name!r}")
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"register_method: target must look like 'package.module:factory', got {target!r}")
    if name in _METHODS and _METHODS[name] != target and not overwrite:
        raise ValueError(
            f"register_method: {name!r} is already {_METHODS[name]!r}; pass overwrite=True to replace it"
        )
    _METHODS[name] = target


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str, **kwargs: Any) -> Any:
    """Build the method registered as ``name`` with hyperparameters ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a hyperparameter the method
            does not take.
    """
    if name not in _METHODS:
        raise ValueError(f"unknown editing method {name!r}; choose one of {', '.join(available_methods())}")
    module_name, _, attr = _METHODS[name].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"method {name!r}: bad hyperparameters {sorted(kwargs)}: {exc}") from exc


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


def _no_layer_changes(peft_model: Any, layer_type: type, changes: Callable[[Any, str], bool]) -> bool:
    """True when the model has ``layer_type`` adapter layers, none merged, and ``changes(layer, name)`` is
    False for every active adapter name of every such layer (``adapter_is_identity`` of the editors)."""
    import torch

    layers = [m for m in peft_model.modules() if isinstance(m, layer_type)]
    if not layers:
        return False
    with torch.no_grad():
        return not any(
            layer.merged or any(changes(layer, name) for name in layer.active_adapters) for layer in layers
        )


@dataclass
class _PlainEditor:
    """Shared part of the plain editors: targets, the loop's hyperparameters, and ``edit``."""

    layers: Sequence[int] | None = None
    projections: Sequence[str] | None = None
    steps: int = 50
    lr: float = 5e-3
    stop_loss: float | None = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    loop: EditLoopConfig = field(init=False, repr=False)

    name = "plain"

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            self.layers = list(self.layers)
        if self.projections is not None:
            if isinstance(self.projections, str):
                self.projections = [self.projections]
            self.projections = list(self.projections)
        self.loop = EditLoopConfig(
            steps=self.steps,
            lr=self.lr,
            stop_loss=self.stop_loss,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )

    def target_modules(self, backbone: Backbone) -> list[str]:
        """Fully qualified names of the edited ``nn.Linear`` modules (backbone registry defaults)."""
        layers = self.layers if self.layers is not None else backbone.default_edit_layers()
        projections = (
            self.projections if self.projections is not None else backbone.spec.default_edit_projections
        )
        return backbone.ffn_module_names(layers=layers, projections=projections)

    def post_step(self, peft_model: PeftModel) -> Any:
        """A hook run after every optimiser step (``None``: nothing to do)."""
        return None

    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Minimise the target NLL of the requests' edit samples (all in one batch) over the adapter.

        The frozen vision tower runs once per image batch (``Backbone.frozen_vision_cache``).
        """
        batch = backbone.build_batch(edit_samples(requests), device=model_device(peft_model))
        with backbone.frozen_vision_cache():
            return run_edit_loop(
                peft_model,
                backbone,
                batch,
                trainable_parameters(peft_model),
                self.loop,
                loss_fn=target_nll,
                post_step=self.post_step(peft_model),
            )


@dataclass
class FTMethod(_PlainEditor):
    """FT-L: a dense trainable delta on the chosen FFN projections (default: the family's
    ``default_edit_projections`` in its ``default_edit_layers``).

    Args:
        layers: decoder layer indices (negative from the end); default the backbone's.
        projections: FFN projection names inside a layer; default the backbone's.
        steps, lr, stop_loss, weight_decay, max_grad_norm: see :class:`~odedit_hf.editing.loop.EditLoopConfig`.
        norm_constraint: clamp every delta entry to ``[-c, c]`` after each step (EasyEdit FT-L); ``None`` = free.
    """

    norm_constraint: float | None = None

    name = "ft"

    def peft_config(self, backbone: Backbone) -> PeftConfig:
        from odedit_hf.editors.ft import FTLConfig

        return FTLConfig(target_modules=self.target_modules(backbone), norm_constraint=self.norm_constraint)

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """Whether the active FT-L adapter changes nothing yet (every active delta is exactly zero)."""
        from odedit_hf.editors.ft import FTLLayer

        def changes(layer: Any, name: str) -> bool:
            return name in layer.ftl_delta and bool(layer.ftl_delta[name].any())

        return _no_layer_changes(peft_model, FTLLayer, changes)

    def post_step(self, peft_model: PeftModel) -> Any:
        if self.norm_constraint is None:
            return None
        from odedit_hf.editors.ft import FTLLayer

        layers = [m for m in peft_model.modules() if isinstance(m, FTLLayer)]

        def clamp(step: int) -> None:
            for layer in layers:
                for name in layer.active_adapters:
                    layer.apply_norm_constraint(name)

        return clamp


@dataclass
class LoRAMethod(_PlainEditor):
    """LoRA (peft's own) on the same targets as FT-L.

    Args:
        layers, projections, steps, lr, stop_loss, weight_decay, max_grad_norm: as :class:`FTMethod`.
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha`` (the update is scaled by ``alpha / rank``).
    """

    rank: int = 8
    alpha: float = 16.0

    name = "lora"

    def peft_config(self, backbone: Backbone) -> PeftConfig:
        from odedit_hf.editors.lora import lora_config_for

        layers = self.layers if self.layers is not None else backbone.default_edit_layers()
        return lora_config_for(
            backbone, layers=layers, projections=self.projections, rank=self.rank, alpha=self.alpha
        )

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """Whether the active LoRA adapter changes nothing yet (plain LoRA with every active ``B`` zero)."""
        from peft.tuners.lora import LoraLayer

        def changes(layer: Any, name: str) -> bool:
            if name not in layer.lora_B:
                return False
            return bool(layer.use_dora.get(name, False)) or bool(layer.lora_B[name].weight.any())

        return _no_layer_changes(peft_model, LoraLayer, changes)

"""FT-L as an :class:`~odedit_hf.editing.Editor` (``get_method("ftl")``, alias ``ft``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from odedit_hf.editing.editor import FFNEditor, no_layer_changes

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone

    from .config import FTLConfig

__all__ = ["FTLMethod"]


@dataclass
class FTLMethod(FFNEditor):
    """FT-L: a dense trainable delta on the chosen FFN projections (default: the family's
    ``default_edit_projections`` in its ``default_edit_layers``), trained on the target NLL.

    Args:
        layers: decoder layer indices to edit (negative from the end); default the backbone's.
        projections: FFN projection names inside a layer (e.g. ``mlp.down_proj``); default the backbone's.
        steps: the most optimiser steps per edit.
        lr: Adam learning rate.
        stop_loss: stop an edit once the target NLL is below this (``none``: never early).
        weight_decay: Adam weight decay on the delta.
        max_grad_norm: clip the gradient norm to this value (``none``: no clipping).
        norm_constraint: clamp every delta entry to ``[-c, c]`` after each step (EasyEdit FT-L); ``none`` = free.
    """

    layers: Sequence[int] | None = None
    projections: Sequence[str] | None = None
    steps: int = 50
    lr: float = 5e-3
    stop_loss: float | None = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    norm_constraint: float | None = None

    name: ClassVar[str] = "ftl"
    aliases: ClassVar[tuple[str, ...]] = ("ft",)
    supports_gradient_checkpointing: ClassVar[bool] = True  # no forward hook with state (tested)

    def __post_init__(self) -> None:
        self._normalise_targets()

    def peft_config(self, backbone: Backbone) -> FTLConfig:
        from .config import FTLConfig

        return FTLConfig(target_modules=self.target_modules(backbone), norm_constraint=self.norm_constraint)

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """Whether the active FT-L adapter changes nothing yet (every active delta is exactly zero)."""
        from .layer import FTLLayer

        def changes(layer: Any, name: str) -> bool:
            return name in layer.ftl_delta and bool(layer.ftl_delta[name].any())

        return no_layer_changes(peft_model, FTLLayer, changes)

"""LoRA as an :class:`~odedit_hf.editing.Editor` (``get_method("lora")``): peft's own ``LoraConfig`` on the
targets the backbone registry names."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from odedit_hf.editing.editor import FFNEditor, no_layer_changes

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from odedit_hf.backbones import Backbone

__all__ = ["LoRAMethod"]


@dataclass
class LoRAMethod(FFNEditor):
    """LoRA (peft's own) on the same targets as FT-L, trained on the target NLL.

    Args:
        layers: decoder layer indices to edit (negative from the end); default the backbone's.
        projections: FFN projection names inside a layer (e.g. ``mlp.down_proj``); default the backbone's.
        steps: the most optimiser steps per edit.
        lr: Adam learning rate.
        stop_loss: stop an edit once the target NLL is below this (``none``: never early).
        weight_decay: Adam weight decay on the adapter.
        max_grad_norm: clip the gradient norm to this value (``none``: no clipping).
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha`` (the update is scaled by ``alpha / rank``).
    """

    layers: Sequence[int] | None = None
    projections: Sequence[str] | None = None
    steps: int = 50
    lr: float = 5e-3
    stop_loss: float | None = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    rank: int = 8
    alpha: float = 16.0

    name: ClassVar[str] = "lora"
    supports_gradient_checkpointing: ClassVar[bool] = True  # no forward hook with state (tested)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAMethod.rank must be a positive int, got {self.rank!r}")
        self._normalise_targets()

    def peft_config(self, backbone: Backbone) -> LoraConfig:
        return lora_config_for(backbone, self.target_modules(backbone), rank=self.rank, alpha=self.alpha)

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """Whether the active LoRA adapter changes nothing yet (plain LoRA with every active ``B`` zero)."""
        from peft.tuners.lora import LoraLayer

        def changes(layer: Any, name: str) -> bool:
            if name not in layer.lora_B:
                return False
            return bool(layer.use_dora.get(name, False)) or bool(layer.lora_B[name].weight.any())

        return no_layer_changes(peft_model, LoraLayer, changes)


def lora_config_for(
    backbone: Backbone,
    target_modules: Sequence[str] | None = None,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    **kwargs: Any,
) -> LoraConfig:
    """A ``peft.LoraConfig`` on ``target_modules`` (fully qualified names, e.g. from
    :meth:`FFNEditor.target_modules`).

    Args:
        backbone: the model's backbone.
        target_modules: the ``nn.Linear`` modules to adapt; default the backbone's
            ``default_edit_module_names()``.
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        dropout: ``lora_dropout``; 0 by default, so that one edit does not depend on the RNG.
        **kwargs: any other ``LoraConfig`` field (e.g. ``use_rslora=True``); unknown names raise.

    Returns:
        A ``LoraConfig``; ``B`` starts at zero (peft's default), so a fresh adapter changes nothing.
    """
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"lora_config_for: unknown LoraConfig fields {unknown}")
    for fixed in ("target_modules", "r", "lora_alpha", "lora_dropout"):
        if fixed in kwargs:
            raise ValueError(f"lora_config_for: pass {fixed!r} through its own argument, not **kwargs")
    if target_modules is None:
        target_modules = backbone.default_edit_module_names()
    return LoraConfig(
        target_modules=list(target_modules),
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        **kwargs,
    )

"""LoRA as a base editor: peft's own ``LoraConfig`` on the targets the backbone registry names.

Nothing is registered: LoRA adapters are plain peft adapters (``PeftType.LORA``), saved and loaded
with peft alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["lora_config_for"]


def lora_config_for(
    backbone: Any,
    *,
    layers: Sequence[int] | int | None = None,
    projections: Sequence[str] | str | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    **kwargs: Any,
) -> Any:
    """A ``peft.LoraConfig`` on the backbone's default edit targets (or the ones given).

    Args:
        backbone: an :class:`odedit_hf.backbones.Backbone`.
        layers: decoder layer indices (negative counts from the end); default the backbone's
            ``default_edit_layers()``.
        projections: FFN projection names inside a decoder layer; default the family's
            ``default_edit_projections``.
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        dropout: ``lora_dropout``; 0 by default, so that one edit does not depend on the RNG.
        **kwargs: any other ``LoraConfig`` field (e.g. ``use_rslora=True``); unknown names raise.

    Returns:
        A ``LoraConfig`` whose ``target_modules`` are fully qualified module names. ``B`` starts at
        zero (peft's default), so a fresh adapter leaves the model unchanged.
    """
    import dataclasses

    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_config_for: rank must be a positive int, got {rank!r}")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"lora_config_for: unknown LoraConfig fields {unknown}")
    for fixed in ("target_modules", "r", "lora_alpha", "lora_dropout"):
        if fixed in kwargs:
            raise ValueError(f"lora_config_for: pass {fixed!r} through its own argument, not **kwargs")
    if layers is None:
        layers = backbone.default_edit_layers()
    if projections is None:
        projections = backbone.spec.default_edit_projections
    targets = backbone.ffn_module_names(layers=layers, projections=projections)
    return LoraConfig(
        target_modules=list(targets), r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", **kwargs
    )

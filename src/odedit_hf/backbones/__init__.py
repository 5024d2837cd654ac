"""Model-type registry and the :class:`Backbone` wrapper (batch building, layer/FFN lookup, hidden states)."""

from __future__ import annotations

from odedit_hf.backbones.backbone import IGNORE_INDEX, Backbone, PromptSample, shift_logits_labels
from odedit_hf.backbones.processing import ImageTextProcessor
from odedit_hf.backbones.registry import (
    BackboneSpec,
    UnsupportedModelError,
    get_backbone_spec,
    register_backbone,
    supported_model_types,
    unregister_backbone,
)

__all__ = [
    "IGNORE_INDEX",
    "Backbone",
    "BackboneSpec",
    "ImageTextProcessor",
    "PromptSample",
    "UnsupportedModelError",
    "get_backbone_spec",
    "register_backbone",
    "shift_logits_labels",
    "supported_model_types",
    "unregister_backbone",
]

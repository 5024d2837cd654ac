"""FT-L tuner: wraps the targeted ``nn.Linear`` modules of a model in :class:`~.layer.Linear`."""

from __future__ import annotations

import logging
from typing import Any

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner

from odedit_hf.editing.tuner import EditorTuner

from .config import FTLConfig
from .layer import FTLLayer, Linear

logger = logging.getLogger(__name__)

__all__ = ["FTLModel"]


class FTLModel(EditorTuner, BaseTuner):
    """FT-L as a peft tuner: ``get_peft_model(model, FTLConfig(...))`` builds it.

    ``_create_and_replace`` is reusable on its own: a wrapper method (ODEdit) can call it for each
    target to put FT-L deltas under its own adapter name.
    """

    prefix: str = "ftl_"
    tuner_layer_cls = FTLLayer
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "FT-L"
    config_cls = FTLConfig
    layer_factory = Linear

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict[str, Any]) -> PeftConfig:
        if peft_config.target_modules is not None:
            return peft_config
        from odedit_hf.backbones import get_backbone_spec

        model_type = model_config.get("model_type")
        if model_type is None:
            raise ValueError(
                "FTLConfig.target_modules is None and the model has no config.model_type to look up "
                "default targets; pass target_modules explicitly (e.g. ['mlp.down_proj'])."
            )
        spec = get_backbone_spec(model_type)  # UnsupportedModelError says how to register a family
        peft_config.target_modules = set(spec.default_edit_projections)
        logger.info(
            "FT-L: no target_modules given; using %s from the %r backbone spec",
            spec.default_edit_projections,
            model_type,
        )
        return peft_config

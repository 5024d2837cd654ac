"""MEND tuner: wraps the targeted ``nn.Linear`` modules of a model in :class:`~.layer.Linear`."""

from __future__ import annotations

import logging

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from odedit_hf.editing.tuner import EditorTuner

from .config import MENDConfig
from .layer import Linear, MENDLayer

logger = logging.getLogger(__name__)

__all__ = ["MENDModel"]

_PEFT_PREFIX = "base_model.model."


class MENDModel(EditorTuner, BaseTuner):
    """MEND as a peft tuner: ``get_peft_model(model, MENDConfig(target_modules=[...]))``.

    The adapter trains nothing by gradient descent at edit time (the hypernetwork computes the update),
    so every parameter stays frozen. Loading a checkpoint resizes the factors to the checkpoint's rank
    first, so ``PeftModel.from_pretrained(fresh_model, path)`` reproduces sequential edits exactly.
    """

    prefix: str = "mend_"
    tuner_layer_cls = MENDLayer
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "MEND"
    config_cls = MENDConfig
    layer_factory = Linear

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)  # MEND's update comes from the hypernetwork, not from an optimiser

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Resize the factors of ``adapter_name`` to the checkpoint's rank, then peft's remap."""
        for module_name, module in model.named_modules():
            if not isinstance(module, MENDLayer) or adapter_name not in module.mend_a:
                continue
            short = module_name.removeprefix(_PEFT_PREFIX)
            for name in dict.fromkeys((module_name, _PEFT_PREFIX + short, short)):
                a = state_dict.get(f"{name}.mend_a")
                if a is not None and a.dim() == 2:
                    module.resize_factors(adapter_name, int(a.shape[0]))
                    break
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

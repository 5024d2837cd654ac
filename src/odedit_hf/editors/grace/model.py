"""GRACE tuner: wraps the targeted ``nn.Linear`` module(s) of a model in :class:`~.layer.Linear`."""

from __future__ import annotations

import logging

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from odedit_hf.editing.tuner import EditorTuner

from .config import GRACEConfig
from .layer import _NOT_MERGEABLE, GRACELayer, Linear, checkpoint_value_rows

logger = logging.getLogger(__name__)

__all__ = ["GRACEModel"]

_PEFT_PREFIX = "base_model.model."


class GRACEModel(EditorTuner, BaseTuner):
    """GRACE as a peft tuner: ``get_peft_model(model, GRACEConfig(target_modules=[...]))`` builds it.

    Loading a checkpoint resizes every codebook to the checkpoint's size first
    (:meth:`_remap_adapter_state_dict_for_load`), so ``PeftModel.from_pretrained(fresh_model, path)``
    reproduces a grown codebook exactly. Merging raises: a codebook is not a weight delta.
    """

    prefix: str = "grace_"
    tuner_layer_cls = GRACELayer
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "GRACE"
    config_cls = GRACEConfig
    layer_factory = Linear

    def _check_merge_allowed(self) -> None:
        raise ValueError(_NOT_MERGEABLE)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Resize every GRACE codebook of ``adapter_name`` to the checkpoint's size, then peft's remap."""
        for module_name, module in model.named_modules():
            if not isinstance(module, GRACELayer) or adapter_name not in module.grace_keys:
                continue
            short = module_name.removeprefix(_PEFT_PREFIX)
            for name in dict.fromkeys((module_name, _PEFT_PREFIX + short, short)):
                found = checkpoint_value_rows(state_dict, f"{name}.grace_", where=short)
                if found is not None:
                    module.resize_codebook(adapter_name, *found)
                    break
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

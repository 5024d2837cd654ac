"""GRACE tuner: wraps the targeted ``nn.Linear`` module(s) of a model in :class:`~.layer.Linear`."""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import GRACEConfig
from .layer import _NOT_MERGEABLE, GRACELayer, Linear, checkpoint_value_rows

logger = logging.getLogger(__name__)

__all__ = ["GRACEModel"]

_PEFT_PREFIX = "base_model.model."


class GRACEModel(BaseTuner):
    """GRACE as a peft tuner: ``get_peft_model(model, GRACEConfig(target_modules=[...]))`` builds it.

    Loading a checkpoint resizes every codebook to the checkpoint's size first
    (:meth:`_remap_adapter_state_dict_for_load`), so ``PeftModel.from_pretrained(fresh_model, path)``
    reproduces a grown codebook exactly. Merging raises: a codebook is not a weight delta.
    """

    prefix: str = "grace_"
    tuner_layer_cls = GRACELayer
    target_module_mapping: dict[str, list[str]] = {}

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(f"GRACEModel._create_and_replace: unknown keyword arguments {sorted(kwargs)}")
        if parameter_name is not None:
            raise ValueError(
                f"GRACE targets modules, not parameters; got parameter {parameter_name!r} of {current_key!r}"
            )
        if not isinstance(peft_config, GRACEConfig):
            raise ValueError(f"GRACEModel needs a GRACEConfig, got {type(peft_config).__name__}")
        if isinstance(target, GRACELayer):
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"GRACE target {current_key!r} is a {type(base).__name__}, not torch.nn.Linear; "
                "target an FFN projection (see the backbone registry's ffn_projections)."
            )
        new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a further adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

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

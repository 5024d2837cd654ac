"""T-Patcher tuner: wraps the FFN projections named by the config in :class:`~.layer.Linear` layers."""

from __future__ import annotations

import logging
from typing import Any

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import TPatcherConfig
from .layer import Linear, TPatcherLayer

logger = logging.getLogger(__name__)

__all__ = ["TPatcherModel"]


class TPatcherModel(BaseTuner):
    """T-Patcher as a peft tuner: ``get_peft_model(model, TPatcherConfig(...))`` builds it.

    The config names the FFN's key, (up) and value projections; each becomes a :class:`~.layer.Linear`
    with that role. Merging is refused (:meth:`_check_merge_allowed`).
    """

    prefix: str = "tpatcher_"
    tuner_layer_cls = TPatcherLayer
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
            raise ValueError(f"TPatcherModel._create_and_replace: unknown keyword arguments {sorted(kwargs)}")
        if parameter_name is not None:
            raise ValueError(
                f"T-Patcher targets modules, not parameters; got parameter {parameter_name!r} of {current_key!r}"
            )
        if not isinstance(peft_config, TPatcherConfig):
            raise ValueError(f"TPatcherModel needs a TPatcherConfig, got {type(peft_config).__name__}")
        role = peft_config.role_of(current_key)
        if isinstance(target, TPatcherLayer):
            if target.role != role:
                raise ValueError(
                    f"T-Patcher: {current_key!r} is the {target.role} projection of another adapter, "
                    f"not the {role} projection; all T-Patcher adapters of a model must patch the same FFN roles"
                )
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"T-Patcher target {current_key!r} is a {type(base).__name__}, not torch.nn.Linear; "
                "target FFN projections (see the backbone registry's ffn_projections)."
            )
        new_module = Linear(target, adapter_name, peft_config, role)
        if adapter_name not in self.active_adapters:
            # a further adapter is not trainable until set_adapter makes it active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "T-Patcher adapters cannot be merged: the patch neurons add hidden units to the FFN (a wider "
            "intermediate activation), which the fixed-size base projections cannot hold exactly. Keep the "
            "adapter unmerged (save_pretrained / PeftModel.from_pretrained keep the patch)."
        )

"""T-Patcher tuner: wraps the FFN projections named by the config in :class:`~.layer.Linear` layers."""

from __future__ import annotations

import logging
from typing import Any

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
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
        from odedit_hf.editing.tuner import replace_linear_target

        if not isinstance(peft_config, TPatcherConfig):
            raise ValueError(f"TPatcherModel needs a TPatcherConfig, got {type(peft_config).__name__}")
        role = peft_config.role_of(current_key)

        def same_role(layer: nn.Module) -> None:
            if layer.role != role:
                raise ValueError(
                    f"T-Patcher: {current_key!r} is the {layer.role} projection of another adapter, "
                    f"not the {role} projection; all T-Patcher adapters of a model must patch the same FFN roles"
                )

        replace_linear_target(
            self,
            editor="T-Patcher",
            config_cls=TPatcherConfig,
            layer_cls=TPatcherLayer,
            new_layer=lambda t: Linear(t, adapter_name, peft_config, role),
            peft_config=peft_config,
            adapter_name=adapter_name,
            target=target,
            target_name=target_name,
            parent=parent,
            current_key=current_key,
            parameter_name=parameter_name,
            kwargs=kwargs,
            check_existing=same_role,
        )

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "T-Patcher adapters cannot be merged: the patch neurons add hidden units to the FFN (a wider "
            "intermediate activation), which the fixed-size base projections cannot hold exactly. Keep the "
            "adapter unmerged (save_pretrained / PeftModel.from_pretrained keep the patch)."
        )

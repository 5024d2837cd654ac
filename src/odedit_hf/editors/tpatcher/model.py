"""T-Patcher tuner: wraps the FFN projections named by the config in :class:`~.layer.Linear` layers."""

from __future__ import annotations

import logging

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from odedit_hf.editing.tuner import EditorTuner

from .config import TPatcherConfig
from .layer import Linear, TPatcherLayer

logger = logging.getLogger(__name__)

__all__ = ["TPatcherModel"]


class TPatcherModel(EditorTuner, BaseTuner):
    """T-Patcher as a peft tuner: ``get_peft_model(model, TPatcherConfig(...))`` builds it.

    The config names the FFN's key, (up) and value projections; each becomes a :class:`~.layer.Linear`
    with that role. Merging is refused (:meth:`_check_merge_allowed`).
    """

    prefix: str = "tpatcher_"
    tuner_layer_cls = TPatcherLayer
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "T-Patcher"
    config_cls = TPatcherConfig

    def _new_layer(
        self, target: nn.Module, base: nn.Module, adapter_name: str, peft_config: PeftConfig, current_key: str
    ) -> nn.Module:
        return Linear(target, adapter_name, peft_config, peft_config.role_of(current_key))

    def _check_existing(self, layer: nn.Module, peft_config: PeftConfig, current_key: str) -> None:
        role = peft_config.role_of(current_key)
        if layer.role != role:
            raise ValueError(
                f"T-Patcher: {current_key!r} is the {layer.role} projection of another adapter, "
                f"not the {role} projection; all T-Patcher adapters of a model must patch the same FFN roles"
            )

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "T-Patcher adapters cannot be merged: the patch neurons add hidden units to the FFN (a wider "
            "intermediate activation), which the fixed-size base projections cannot hold exactly. Keep the "
            "adapter unmerged (save_pretrained / PeftModel.from_pretrained keep the patch)."
        )

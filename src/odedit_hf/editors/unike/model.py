"""UniKE tuner: patches the configured FFN projections (:class:`~.layer.PatchLinear`) and puts the latent
key-value memory on one self-attention output projection (:class:`~.layer.MemoryLinear`)."""

from __future__ import annotations

import logging

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from odedit_hf.editing.tuner import EditorTuner

from .config import UniKEConfig
from .layer import MemoryLinear, PatchLinear, UniKEMemoryLayer

logger = logging.getLogger(__name__)

__all__ = ["UniKEModel"]


class UniKEModel(EditorTuner, BaseTuner):
    """UniKE as a peft tuner: ``get_peft_model(model, UniKEConfig(...))`` builds it. Merging is refused."""

    prefix: str = "unike_"
    tuner_layer_cls = (PatchLinear, UniKEMemoryLayer)
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "UniKE"
    config_cls = UniKEConfig

    def _new_layer(
        self, target: nn.Module, base: nn.Module, adapter_name: str, peft_config: PeftConfig, current_key: str
    ) -> nn.Module:
        role = peft_config.role_of(current_key)
        if role == "memory":
            return MemoryLinear(target, adapter_name, peft_config)
        return PatchLinear(target, adapter_name, peft_config, role)

    def _check_existing(self, layer: nn.Module, peft_config: PeftConfig, current_key: str) -> None:
        role = peft_config.role_of(current_key)
        layer_cls = MemoryLinear if role == "memory" else PatchLinear
        if not isinstance(layer, layer_cls) or getattr(layer, "role", role) != role:
            raise ValueError(
                f"UniKE: {current_key!r} plays another role in another UniKE adapter; all UniKE adapters of "
                "a model must patch the same modules in the same roles"
            )

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "UniKE adapters cannot be merged: the patch neurons add hidden units to the FFN and the key-value "
            "memory is retrieved per position. Keep the adapter unmerged."
        )

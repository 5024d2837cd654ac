"""UniKE tuner: patches the configured FFN projections (:class:`~.layer.PatchLinear`) and puts the latent
key-value memory on one self-attention output projection (:class:`~.layer.MemoryLinear`)."""

from __future__ import annotations

import logging
from typing import Any

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import UniKEConfig
from .layer import MemoryLinear, PatchLinear, UniKEMemoryLayer

logger = logging.getLogger(__name__)

__all__ = ["UniKEModel"]


class UniKEModel(BaseTuner):
    """UniKE as a peft tuner: ``get_peft_model(model, UniKEConfig(...))`` builds it. Merging is refused."""

    prefix: str = "unike_"
    tuner_layer_cls = (PatchLinear, UniKEMemoryLayer)
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

        if not isinstance(peft_config, UniKEConfig):
            raise ValueError(f"UniKEModel needs a UniKEConfig, got {type(peft_config).__name__}")
        role = peft_config.role_of(current_key)
        layer_cls = MemoryLinear if role == "memory" else PatchLinear

        def same_role(layer: nn.Module) -> None:
            if not isinstance(layer, layer_cls) or getattr(layer, "role", role) != role:
                raise ValueError(
                    f"UniKE: {current_key!r} plays another role in another UniKE adapter; all UniKE adapters of "
                    "a model must patch the same modules in the same roles"
                )

        def new_layer(t: nn.Module) -> nn.Module:
            if role == "memory":
                return MemoryLinear(t, adapter_name, peft_config)
            return PatchLinear(t, adapter_name, peft_config, role)

        replace_linear_target(
            self,
            editor="UniKE",
            config_cls=UniKEConfig,
            layer_cls=(PatchLinear, UniKEMemoryLayer),
            new_layer=new_layer,
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
            "UniKE adapters cannot be merged: the patch neurons add hidden units to the FFN and the key-value "
            "memory is retrieved per position. Keep the adapter unmerged."
        )

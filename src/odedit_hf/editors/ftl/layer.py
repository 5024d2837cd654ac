"""FT-L adapter layer: a dense trainable delta on one ``nn.Linear``, kept beside the frozen base weight."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from odedit_hf.editing.editor import ConstrainedLayer

from .config import FTLConfig

logger = logging.getLogger(__name__)

__all__ = ["FTLLayer", "Linear"]


class FTLLayer(BaseTunerLayer, ConstrainedLayer):
    """Adapter state of FT-L on one layer: a delta per adapter name, the same shape as the base weight.

    ``ftl_delta[name]`` is the trainable ``(out_features, in_features)`` delta; ``ftl_norm_constraint[name]``
    the clamp bound from the adapter's config (or ``None``).
    """

    adapter_layer_names: tuple[str, ...] = ("ftl_delta",)
    other_param_names: tuple[str, ...] = ("ftl_norm_constraint",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"FTLLayer: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        self.ftl_delta = nn.ParameterDict({})
        self.ftl_norm_constraint: dict[str, float | None] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Exact unmerge: the base weight as it was before the first merge (float addition is not
        # invertible bit for bit, and rollback is checked by hashing the base weights).
        self._ftl_unmerged_weight: torch.Tensor | None = None
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"FT-L can only edit torch.nn.Linear modules, got {type(base).__name__}; "
                "choose FFN projections (see the backbone registry's ffn_projections)."
            )
        self.in_features = base.in_features
        self.out_features = base.out_features

    def update_layer(self, adapter_name: str, config: FTLConfig, **kwargs: Any) -> None:
        """Create (or replace) the delta of ``adapter_name``: zeros unless ``config.init_weights`` is false."""
        if kwargs:
            raise ValueError(f"FTLLayer.update_layer: unknown keyword arguments {sorted(kwargs)}")
        weight = self.get_base_layer().weight
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=weight.device)
        self.ftl_delta[adapter_name] = nn.Parameter(delta)
        self.ftl_norm_constraint[adapter_name] = config.norm_constraint
        self.reset_ftl_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_ftl_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Zero the delta of ``adapter_name`` (``init_weights=False``: small random values, for tests)."""
        if adapter_name not in self.ftl_delta:
            return
        if init_weights:
            self.ftl_delta[adapter_name].zero_()
        else:
            nn.init.normal_(self.ftl_delta[adapter_name], mean=0.0, std=1e-3)

    @torch.no_grad()
    def apply_constraint(self, adapter_name: str) -> None:
        """Clamp the delta of ``adapter_name`` to ``[-c, c]`` if its config set ``norm_constraint=c``
        (run after every optimiser step, by the per-edit loop and the Trainer path alike)."""
        bound = self.ftl_norm_constraint.get(adapter_name)
        if bound is not None and adapter_name in self.ftl_delta:
            self.ftl_delta[adapter_name].clamp_(-bound, bound)


class Linear(nn.Module, FTLLayer):
    """FT-L on an ``nn.Linear``: ``y = base(x) + x ΔWᵀ`` summed over the active adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: FTLConfig, **kwargs: Any) -> None:
        super().__init__()
        FTLLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The delta of ``adapter_name`` in the base weight's dtype."""
        return self.ftl_delta[adapter_name].to(self.get_base_layer().weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' deltas into the base weight.

        Args:
            safe_merge: check the merged weight for NaN/inf before writing it.
            adapter_names: adapters to merge; ``None`` = the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.ftl_delta:
                continue
            merged = base.weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"FT-L adapter {name!r}: merging would put NaN/inf into {type(base).__name__}.weight"
                )
            if self._ftl_unmerged_weight is None:
                self._ftl_unmerged_weight = base.weight.data.clone()
            base.weight.data.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if not self.merged:
            logger.warning("FT-L unmerge: nothing is merged")
            return
        base = self.get_base_layer()
        if self._ftl_unmerged_weight is not None:
            base.weight.data.copy_(self._ftl_unmerged_weight)
        self._ftl_unmerged_weight = None
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.ftl_delta:
                continue
            delta = self.ftl_delta[name]
            # A second small matmul instead of F.linear(x, W + ΔW): no full-size weight copy per call, and
            # the delta may be fp32 while the base runs in bf16.
            result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "ftl." + super().__repr__()

"""MEND adapter layer: the accumulated low-rank updates of MEND edits on one ``nn.Linear``.

State per adapter name (persistent buffers, saved by peft's ``save_pretrained`` since their names hold
``mend_``; grown by every edit, resized on load):

- ``mend_a[name]``: ``(R, in_features)`` float32, the pseudo-activations ``ũ`` of every edit token, stacked;
- ``mend_b[name]``: ``(out_features, R)`` float32, the matching ``-η_l δ̃`` columns.

The layer computes ``base(x) + (x Aᵀ) Bᵀ``: ``ΔW = B·A = -Σ_edits η_l Σ_tokens δ̃ ũᵀ``, exactly MEND's
update, kept factorised (rank = the number of edit tokens, far below ``min(in, out)`` of a real model's
FFN), so the base weight is never written. Two transient hooks serve the editor and the meta-trainer
(never saved): :meth:`Linear.capture` records the layer input ``u`` and adds a zero probe whose gradient
is the output gradient ``δ``; :meth:`Linear.pending` adds an extra, differentiable ``(A, B)`` pair, through
which the meta-training loss reaches the hypernetwork.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from odedit_hf.editing.tuner import ResizeOnLoad

from .config import MENDConfig

logger = logging.getLogger(__name__)

__all__ = ["FACTOR_BUFFERS", "Capture", "Linear", "MENDLayer"]

#: The buffer dicts that make up one adapter's state on a layer.
FACTOR_BUFFERS: tuple[str, ...] = ("mend_a", "mend_b")


class Capture:
    """What one forward recorded on one layer: the input ``u`` and the zero probe added to the output
    (the gradient of the loss w.r.t. the probe is the output gradient ``δ``)."""

    def __init__(self) -> None:
        self.inputs: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None


class MENDLayer(BaseTunerLayer):
    """The MEND factors of one layer, per adapter name (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = FACTOR_BUFFERS

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"MENDLayer: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        self.mend_a = BufferDict({}, persistent=True)
        self.mend_b = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._mend_unmerged_weight: torch.Tensor | None = None
        self._mend_capture: Capture | None = None
        self._mend_pending: tuple[torch.Tensor, torch.Tensor] | None = None
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"MEND can only edit torch.nn.Linear modules, got {type(base).__name__}; "
                "choose FFN projections (see the backbone registry's ffn_projections)."
            )
        self.in_features = base.in_features
        self.out_features = base.out_features

    # ------------------------------------------------------------------ creation, state
    def update_layer(self, adapter_name: str, config: MENDConfig, **kwargs: Any) -> None:
        """Create (or reset) ``adapter_name`` with no factor: the adapter is the identity."""
        if kwargs:
            raise ValueError(f"MENDLayer.update_layer: unknown keyword arguments {sorted(kwargs)}")
        self.resize_factors(adapter_name, 0)
        self.set_adapter(self.active_adapters)

    def _device(self) -> torch.device:
        return self.get_base_layer().weight.device

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Move the factors to the base layer's device, keeping them float32."""
        device = self._device() if device is None else torch.device(device)
        if device.type == "meta":
            return
        for store in (self.mend_a, self.mend_b):
            if adapter_name in store:
                store[adapter_name] = store[adapter_name].to(device)

    def rank(self, adapter_name: str) -> int:
        """The number of factor rows (edit tokens) ``adapter_name`` holds on this layer."""
        return int(self.mend_a[adapter_name].shape[0]) if adapter_name in self.mend_a else 0

    @torch.no_grad()
    def resize_factors(self, adapter_name: str, rank: int) -> None:
        """Give ``adapter_name`` zero factors of ``rank`` rows (e.g. to load a checkpoint into)."""
        if adapter_name in self.mend_a and self.rank(adapter_name) == rank:
            return
        device = self._device()
        self.mend_a[adapter_name] = torch.zeros(rank, self.in_features, dtype=torch.float32, device=device)
        self.mend_b[adapter_name] = torch.zeros(self.out_features, rank, dtype=torch.float32, device=device)

    @torch.no_grad()
    def append_factors(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add one edit's update ``B·A`` (``a``: ``(r, in)``, ``b``: ``(out, r)``) to ``adapter_name``.

        Raises:
            ValueError: wrong shapes, or a factor that is not finite (nothing is added then).
        """
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise ValueError(
                f"MEND: factors must be (r, {self.in_features}) and ({self.out_features}, r), got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"MEND: factor ranks differ ({a.shape[0]} rows of A, {b.shape[1]} columns of B)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(
                "MEND: the edit's update is not finite (NaN/inf); the adapter is left as it was. Check the "
                "hypernetwork artefact (its normalisation statistics) and the edit prompt"
            )
        device = self._device()
        self.mend_a[adapter_name] = torch.cat(
            [self.mend_a[adapter_name], a.detach().to(device, torch.float32)], dim=0
        )
        self.mend_b[adapter_name] = torch.cat(
            [self.mend_b[adapter_name], b.detach().to(device, torch.float32)], dim=1
        )

    def factor_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """A copy of ``adapter_name``'s factors (for :meth:`load_factor_state`)."""
        return {"mend_a": self.mend_a[adapter_name].clone(), "mend_b": self.mend_b[adapter_name].clone()}

    @torch.no_grad()
    def load_factor_state(self, adapter_name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Put ``adapter_name``'s factors back to ``state`` exactly."""
        self.mend_a[adapter_name] = state["mend_a"].clone()
        self.mend_b[adapter_name] = state["mend_b"].clone()

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update ``B·A`` of ``adapter_name`` (``(out, in)``, float32)."""
        return self.mend_b[adapter_name] @ self.mend_a[adapter_name]

    def resize_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Resize every adapter whose factors ``state_dict`` (keys under ``prefix``) holds at another rank."""
        for name in list(self.mend_a):
            a = state_dict.get(f"{prefix}mend_a.{name}")
            if a is not None and a.dim() == 2:
                self.resize_factors(name, int(a.shape[0]))

    # ------------------------------------------------------------------ transient hooks
    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        """Within the block, each forward records its input and adds a zero probe to its output."""
        record = Capture()
        self._mend_capture = record
        try:
            yield record
        finally:
            self._mend_capture = None

    @contextlib.contextmanager
    def pending(self, a: torch.Tensor, b: torch.Tensor) -> Iterator[None]:
        """Within the block, the forward also adds ``(x aᵀ) bᵀ`` (differentiable; never stored)."""
        self._mend_pending = (a, b)
        try:
            yield
        finally:
            self._mend_pending = None


class Linear(ResizeOnLoad, MENDLayer):
    """MEND on an ``nn.Linear``: ``y = base(x) + Σ_active (x Aᵀ) Bᵀ``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MENDConfig, **kwargs: Any) -> None:
        super().__init__()
        MENDLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' updates ``B·A`` into the base weight (unmerge is exact).

        Args:
            safe_merge: check the merged weight for NaN/inf before writing it.
            adapter_names: adapters to merge; ``None`` = the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.mend_a:
                continue
            merged = base.weight.data + self.delta_weight(name).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"MEND adapter {name!r}: merging would put NaN/inf into the base weight")
            if self._mend_unmerged_weight is None:
                self._mend_unmerged_weight = base.weight.data.clone()
            base.weight.data.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if not self.merged:
            logger.warning("MEND unmerge: nothing is merged")
            return
        if self._mend_unmerged_weight is not None:
            self.get_base_layer().weight.data.copy_(self._mend_unmerged_weight)
        self._mend_unmerged_weight = None
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
            if not self.merged:
                for name in self.active_adapters:
                    if name not in self.mend_a or self.rank(name) == 0:
                        continue
                    a, b = self.mend_a[name], self.mend_b[name]
                    result = result + ((x.to(a.dtype) @ a.T) @ b.T).to(result.dtype)
            if self._mend_pending is not None:
                a, b = self._mend_pending
                result = result + ((x.to(a.dtype) @ a.T) @ b.T).to(result.dtype)
        if self._mend_capture is not None:
            probe = torch.zeros_like(result, requires_grad=True)
            self._mend_capture.inputs = x.detach()
            self._mend_capture.probe = probe
            result = result + probe
        return result

    def __repr__(self) -> str:
        return "mend." + super().__repr__()

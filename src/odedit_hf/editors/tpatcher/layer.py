"""T-Patcher adapter layers: the patch neurons' rows and columns, kept beside the FFN's frozen projections.

One FFN carries three cooperating layers (two for a plain FFN), one per :data:`~.config.ROLES` entry:

- ``key`` (``fc1`` / ``gate_proj``): appends the neurons' pre-activations ``K x + b`` to the projection's
  output, so the FFN's activation (and, for SwiGLU, the product with ``up``) applies to them as to its
  own hidden units;
- ``up`` (``up_proj``, SwiGLU only): appends ``K_u x``;
- ``value`` (``fc2`` / ``down_proj``): receives the widened hidden activation, runs the base projection on
  the FFN's own units and adds ``V diag(a) h`` for the neurons' part ``h``.

Every tensor is split in a *frozen* block (the neurons of earlier edits, persistent buffers) and the
*current* block (the neurons of the latest edit, parameters), so an edit trains only its own neurons.
Neuron counts grow edit by edit; loading resizes the entries to
the saved shapes (:meth:`TPatcherLayer.resize_from_state_dict`), so
``PeftModel.from_pretrained(fresh_model, folder)`` reproduces a grown patch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from odedit_hf.editing.tuner import ResizeOnLoad

from .config import ROLES, TPatcherConfig

logger = logging.getLogger(__name__)

__all__ = ["Linear", "TPatcherLayer"]

#: The attributes each role uses (trainable current block, frozen block); ``tpatcher_memory`` (the FFN
#: inputs of past edits, the memory T-Patcher keeps the new neurons silent on) lives on the key layer.
_ROLE_PARTS: dict[str, tuple[str, ...]] = {
    "key": ("tpatcher_weight", "tpatcher_bias"),
    "up": ("tpatcher_weight",),
    "value": ("tpatcher_weight", "tpatcher_scale"),
}
_FROZEN = "_frozen"


class TPatcherLayer(BaseTunerLayer):
    """Adapter state of T-Patcher on one FFN projection (see the module docstring for the roles).

    Per adapter name: ``tpatcher_weight`` (key/up: ``(n, in_features)`` rows; value: ``(out_features, n)``
    columns), ``tpatcher_bias`` (key: ``(n,)``), ``tpatcher_scale`` (value: ``(n,)``, the neurons' ``a``)
    for the current edit's neurons, the same names with ``_frozen`` for earlier neurons, and
    ``tpatcher_memory`` (key: ``(m, in_features)``, FFN inputs of past edits).
    """

    adapter_layer_names: tuple[str, ...] = ("tpatcher_weight", "tpatcher_bias", "tpatcher_scale")
    other_param_names: tuple[str, ...] = (
        "tpatcher_weight_frozen",
        "tpatcher_bias_frozen",
        "tpatcher_scale_frozen",
        "tpatcher_memory",
    )

    def __init__(self, base_layer: nn.Module, role: str, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"TPatcherLayer: unknown keyword arguments {sorted(kwargs)}")
        if role not in ROLES:
            raise ValueError(f"TPatcherLayer: role must be one of {ROLES}, got {role!r}")
        self.base_layer = base_layer
        self.role = role
        self.tpatcher_weight = nn.ParameterDict({})
        self.tpatcher_bias = nn.ParameterDict({})
        self.tpatcher_scale = nn.ParameterDict({})
        self.tpatcher_weight_frozen = BufferDict({}, persistent=True)
        self.tpatcher_bias_frozen = BufferDict({}, persistent=True)
        self.tpatcher_scale_frozen = BufferDict({}, persistent=True)
        self.tpatcher_memory = BufferDict({}, persistent=True)
        self.tpatcher_scale_init: dict[str, float] = {}
        self.tpatcher_init_weights: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"T-Patcher can only patch torch.nn.Linear FFN projections, got {type(base).__name__}; "
                "see the backbone registry's ffn_projections."
            )
        self.in_features = base.in_features
        self.out_features = base.out_features

    # ------------------------------------------------------------------ state
    @property
    def neuron_dim(self) -> int:
        """The axis of ``tpatcher_weight`` that indexes neurons (0 for key/up rows, 1 for value columns)."""
        return 1 if self.role == "value" else 0

    def _empty(self, part: str) -> torch.Tensor:
        device = self.get_base_layer().weight.device
        if part == "tpatcher_weight":
            shape = (self.out_features, 0) if self.role == "value" else (0, self.in_features)
        elif part == "tpatcher_memory":
            shape = (0, self.in_features)
        else:
            shape = (0,)
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def update_layer(self, adapter_name: str, config: TPatcherConfig, **kwargs: Any) -> None:
        """Create (or reset) the adapter ``adapter_name`` with no neuron (the identity)."""
        if kwargs:
            raise ValueError(f"TPatcherLayer.update_layer: unknown keyword arguments {sorted(kwargs)}")
        for part in _ROLE_PARTS[self.role]:
            getattr(self, part)[adapter_name] = nn.Parameter(self._empty(part))
            getattr(self, part + _FROZEN)[adapter_name] = self._empty(part)
        if self.role == "key":
            self.tpatcher_memory[adapter_name] = self._empty("tpatcher_memory")
        self.tpatcher_scale_init[adapter_name] = config.scale_init
        self.tpatcher_init_weights[adapter_name] = config.init_weights
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def num_neurons(self, adapter_name: str) -> int:
        """All neurons of ``adapter_name`` (frozen + current); 0 for an adapter this layer does not hold."""
        if adapter_name not in self.tpatcher_weight:
            return 0
        dim = self.neuron_dim
        return int(
            self.tpatcher_weight_frozen[adapter_name].shape[dim]
            + self.tpatcher_weight[adapter_name].shape[dim]
        )

    def num_current(self, adapter_name: str) -> int:
        """Neurons of the current (trainable) block: those of the latest edit."""
        if adapter_name not in self.tpatcher_weight:
            return 0
        return int(self.tpatcher_weight[adapter_name].shape[self.neuron_dim])

    def full(self, part: str, adapter_name: str) -> torch.Tensor:
        """Frozen and current blocks of ``part`` joined along the neuron axis (differentiable in the current)."""
        frozen = getattr(self, part + _FROZEN)[adapter_name]
        current = getattr(self, part)[adapter_name]
        dim = self.neuron_dim if part == "tpatcher_weight" else 0
        if frozen.shape[dim] == 0:
            return current
        return torch.cat([frozen, current], dim=dim)

    def current_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The current block's parameters of ``adapter_name`` (what an edit trains)."""
        return [getattr(self, part)[adapter_name] for part in _ROLE_PARTS[self.role]]

    @torch.no_grad()
    def grow(
        self,
        adapter_name: str,
        weight: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        trainable: bool = True,
    ) -> None:
        """Freeze the current neurons and start a new current block from the given initial values.

        Args:
            adapter_name: the adapter to grow.
            weight: key/up: ``(n_new, in_features)`` rows; value: ``(out_features, n_new)`` columns.
            bias: key only: ``(n_new,)``.
            scale: value only: ``(n_new,)``.
            trainable: ``False`` puts the new neurons straight into the frozen block (the current block
                is then empty): they are part of the patch but no edit trains them.
        """
        if adapter_name not in self.tpatcher_weight:
            raise ValueError(f"T-Patcher layer ({self.role}) has no adapter {adapter_name!r}")
        given = {"tpatcher_weight": weight, "tpatcher_bias": bias, "tpatcher_scale": scale}
        for part, value in given.items():
            if (value is not None) != (part in _ROLE_PARTS[self.role]):
                raise ValueError(
                    f"T-Patcher {self.role} layer: {part} must be {'given' if value is None else 'None'}"
                )
        n_new = int(weight.shape[self.neuron_dim])
        expected = (self.out_features, n_new) if self.role == "value" else (n_new, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"T-Patcher {self.role} layer: new weight has shape {tuple(weight.shape)}, expected {expected}"
            )
        for part in _ROLE_PARTS[self.role]:
            value = given[part]
            if part != "tpatcher_weight" and tuple(value.shape) != (n_new,):
                raise ValueError(
                    f"T-Patcher {self.role} layer: {part} has shape {tuple(value.shape)}, expected ({n_new},)"
                )
        for part in _ROLE_PARTS[self.role]:  # every shape checked first: a refused grow changes nothing
            value = given[part]
            current = getattr(self, part)[adapter_name]
            value = value.detach().to(device=current.device, dtype=torch.float32)
            frozen = self.full(part, adapter_name).detach()
            if not trainable:
                dim = self.neuron_dim if part == "tpatcher_weight" else 0
                frozen, value = torch.cat([frozen, value], dim=dim), value.narrow(dim, 0, 0)
            getattr(self, part + _FROZEN)[adapter_name] = frozen.clone()
            getattr(self, part)[adapter_name] = nn.Parameter(
                value.clone(), requires_grad=current.requires_grad
            )

    @torch.no_grad()
    def append_memory(self, adapter_name: str, states: torch.Tensor) -> None:
        """Add FFN inputs ``(m, in_features)`` of an edit to the key layer's memory of past edits."""
        if self.role != "key":
            raise ValueError("T-Patcher: only the key layer keeps the memory of past edits")
        old = self.tpatcher_memory[adapter_name]
        self.tpatcher_memory[adapter_name] = torch.cat(
            [old, states.detach().to(old.device, old.dtype)], dim=0
        )

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[torch.Tensor, bool]]:
        """Copies of every tensor of ``adapter_name`` (with its ``requires_grad``), for :meth:`load_adapter_state`."""
        out: dict[str, tuple[torch.Tensor, bool]] = {}
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                tensor = container[adapter_name]
                out[attr] = (tensor.detach().clone(), bool(tensor.requires_grad))
        return out

    @torch.no_grad()
    def load_adapter_state(self, adapter_name: str, state: dict[str, tuple[torch.Tensor, bool]]) -> None:
        """Put back tensors saved by :meth:`adapter_state` (sizes included)."""
        for attr, (tensor, requires_grad) in state.items():
            container = getattr(self, attr)
            if attr in self.adapter_layer_names:
                container[adapter_name] = nn.Parameter(tensor.clone(), requires_grad=requires_grad)
            else:
                container[adapter_name] = tensor.clone()

    @torch.no_grad()
    def resize_from_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Resize every entry to its shape in ``state_dict`` (keys ``prefix + attr + "." + adapter``).

        The neuron count grows with the edits; a fresh layer has none, so loading a saved patch resizes
        the entries first (called from ``_load_from_state_dict``, before the containers, child modules
        loaded after it, copy the values in).
        """
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            for name in list(container.keys()):
                saved = state_dict.get(f"{prefix}{attr}.{name}")
                if saved is None or tuple(saved.shape) == tuple(container[name].shape):
                    continue
                old = container[name]
                if old.dim() != saved.dim():
                    continue  # let torch report the mismatch
                fresh = torch.zeros(saved.shape, dtype=old.dtype, device=old.device)
                if attr in self.adapter_layer_names:
                    container[name] = nn.Parameter(fresh, requires_grad=old.requires_grad)
                else:
                    container[name] = fresh

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible: see :meth:`~.model.TPatcherModel._check_merge_allowed`."""
        raise ValueError(
            "T-Patcher adapters cannot be merged: the patch neurons add hidden units to the FFN (a wider "
            "intermediate activation), which no weight of the fixed-size projections can hold. Keep the "
            "adapter unmerged, or save it with save_pretrained and load it with PeftModel.from_pretrained."
        )

    def unmerge(self) -> None:
        """Nothing to undo (a T-Patcher adapter is never merged)."""
        logger.warning("T-Patcher unmerge: nothing is merged")


class Linear(ResizeOnLoad, TPatcherLayer):
    """T-Patcher on one FFN ``nn.Linear`` (its role from the config: key, up or value)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: TPatcherConfig, role: str, **kwargs: Any
    ) -> None:
        super().__init__()
        TPatcherLayer.__init__(self, base_layer, role, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _patched(self) -> list[str]:
        return [name for name in self.active_adapters if self.num_neurons(name) > 0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if self.role == "value":
            width = x.shape[-1]
            if width == self.in_features:
                return base(x, *args, **kwargs)
            result = base(x[..., : self.in_features].contiguous(), *args, **kwargs)
            if self.disable_adapters:
                return result
            extra = x[..., self.in_features :]
            offset = 0
            for name in self._patched():
                n = self.num_neurons(name)
                weight = self.full("tpatcher_weight", name)
                scale = self.full("tpatcher_scale", name)
                h = extra[..., offset : offset + n].to(weight.dtype)
                result = result + F.linear(h * scale, weight).to(result.dtype)
                offset += n
            if offset != extra.shape[-1]:
                raise ValueError(
                    f"T-Patcher value layer: the FFN's hidden activation carries {extra.shape[-1]} patch units "
                    f"but the active adapters hold {offset} neurons; enable or disable all T-Patcher layers together"
                )
            return result
        result = base(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        names = self._patched()
        if not names:
            return result
        parts = [result]
        for name in names:
            weight = self.full("tpatcher_weight", name)
            bias = self.full("tpatcher_bias", name) if self.role == "key" else None
            parts.append(F.linear(x.to(weight.dtype), weight, bias).to(result.dtype))
        return torch.cat(parts, dim=-1)

    def __repr__(self) -> str:
        return f"tpatcher[{self.role}]." + super().__repr__()

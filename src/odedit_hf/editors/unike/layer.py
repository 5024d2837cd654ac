"""UniKE adapter layers: T-Patcher's patch neurons (intrinsic knowledge) and the latent key-value memory
at a self-attention output (extrinsic knowledge).

- :class:`PatchLinear` *is* T-Patcher's layer (:class:`odedit_hf.editors.tpatcher.Linear`: the same
  roles, growth, forward, resizing on load), with its tensors stored under ``unike_`` names so that the
  UniKE adapter's state dict holds them under UniKE's prefix. The ``tpatcher_*`` attribute names the
  inherited code uses are read-only aliases of the ``unike_*`` containers.
- :class:`MemoryLinear` wraps the self-attention output projection (``o_proj``). Its input ``x`` at a
  position (the heads' attention output) is mixed with the in-context knowledge retrieved for it::

      x̂ = (1 − α) x + α · softmax(x Kₑᵀ / √d) Vₑ,   α = α_max · clamp((s − θ) / (1 − θ), 0, 1)

  where ``e`` is the memory entry (one per edit) holding the anchor most similar to ``x`` in the semantic
  space (``s`` that cosine similarity, ``θ`` the gate; an entry's anchors are its own latent keys), and ``Kₑ``, ``Vₑ`` are the entry's latent
  key-value pairs: the model's own attention outputs at the edit sample's answer positions (and those of
  the train-split demonstrations retrieved for it). This is the decomposition of attention over
  prepended context tokens, ``Attn(q, [C; X]) = (1 − λ) Attn(q, X) + λ Attn(q, C)``, with the context
  replaced by its latent states (UniKE's "latent in-context knowledge") and ``λ`` by the gate. Where
  ``α = 0`` (no entry similar enough) the output equals the base layer's exactly.

The layer also holds the two projection heads of the disentangled spaces (``unike_sem_weight``: semantic,
over the memory layer's inputs; ``unike_tru_weight``: truthfulness, over the patched FFN's inputs), so
that they are saved, rolled back and reloaded with the adapter.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from odedit_hf.editing.tuner import ResizeOnLoad
from odedit_hf.editors.tpatcher.layer import Linear as TPatcherLinear
from odedit_hf.editors.tpatcher.layer import TPatcherLayer

from .config import UniKEConfig

logger = logging.getLogger(__name__)

__all__ = ["MemoryLinear", "PatchLinear", "UniKEMemoryLayer"]

#: T-Patcher's container names -> UniKE's (the state-dict names under UniKE's prefix).
_RENAME: dict[str, str] = {
    "tpatcher_weight": "unike_weight",
    "tpatcher_bias": "unike_bias",
    "tpatcher_scale": "unike_scale",
    "tpatcher_weight_frozen": "unike_weight_frozen",
    "tpatcher_bias_frozen": "unike_bias_frozen",
    "tpatcher_scale_frozen": "unike_scale_frozen",
    "tpatcher_memory": "unike_memory",
}


def _alias(new: str) -> property:
    return property(lambda self: self._modules[new], doc=f"Alias of ``{new}`` (T-Patcher's code reads it).")


class PatchLinear(TPatcherLinear):
    """T-Patcher's patch-neuron layer on one FFN projection, its state under ``unike_`` names."""

    adapter_layer_names: tuple[str, ...] = ("unike_weight", "unike_bias", "unike_scale")
    other_param_names: tuple[str, ...] = (
        "unike_weight_frozen",
        "unike_bias_frozen",
        "unike_scale_frozen",
        "unike_memory",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: UniKEConfig, role: str) -> None:
        nn.Module.__init__(self)
        TPatcherLayer.__init__(self, base_layer, role)
        for old, new in _RENAME.items():  # nn.Module registered the containers under T-Patcher's names
            self._modules[new] = self._modules.pop(old)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def __repr__(self) -> str:
        return f"unike.patch[{self.role}]." + nn.Module.__repr__(self)


for _old, _new in _RENAME.items():
    setattr(PatchLinear, _old, _alias(_new))

#: Growing tensors of the memory layer (resized on load): name -> shape builder from (d, sem, tru, ffn).
_GROWING = (
    "unike_kv_value",
    "unike_kv_key",
    "unike_kv_value_frozen",
    "unike_kv_entry",
    "unike_kv_anchor",
    "unike_kv_anchor_entry",
)


class UniKEMemoryLayer(BaseTunerLayer):
    """Adapter state of UniKE's latent key-value memory on one self-attention output projection.

    Per adapter name: ``unike_kv_key`` ``(N, d)`` (latent keys of every entry's tokens),
    ``unike_kv_value_frozen`` ``(N₀, d)`` + ``unike_kv_value`` ``(N − N₀, d)`` (their values: earlier and
    the latest edit's trainable ones; the latest edit's tokens are always the last rows),
    ``unike_kv_entry`` ``(N,)`` (the entry each token belongs to), ``unike_kv_anchor`` ``(M, d)`` and
    ``unike_kv_anchor_entry`` ``(M,)`` (the retrieval anchors: an edit's own latent keys, and their entry),
    ``unike_kv_gain`` ``(1,)`` (the scale the current values are stored in), ``unike_sem_weight`` ``(sem_dim, d)``, ``unike_tru_weight``
    ``(tru_dim, ffn_dim)`` and ``unike_encoder_ready`` ``(1,)`` (1 once the heads are trained).
    """

    adapter_layer_names: tuple[str, ...] = ("unike_kv_value",)
    other_param_names: tuple[str, ...] = (
        "unike_kv_key",
        "unike_kv_value_frozen",
        "unike_kv_entry",
        "unike_kv_anchor",
        "unike_kv_anchor_entry",
        "unike_kv_gain",
        "unike_sem_weight",
        "unike_tru_weight",
        "unike_encoder_ready",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"UniKEMemoryLayer: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        self.unike_kv_value = nn.ParameterDict({})
        for name in self.other_param_names:
            setattr(self, name, BufferDict({}, persistent=True))
        self.unike_sim_threshold: dict[str, float] = {}
        self.unike_alpha_max: dict[str, float] = {}
        self.unike_semantic: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"UniKE's memory wraps the self-attention output projection (torch.nn.Linear), got "
                f"{type(base).__name__}"
            )
        self.in_features = base.in_features
        self.out_features = base.out_features

    def update_layer(self, adapter_name: str, config: UniKEConfig, **kwargs: Any) -> None:
        """Create (or reset) ``adapter_name`` with an empty memory and untrained heads."""
        if kwargs:
            raise ValueError(f"UniKEMemoryLayer.update_layer: unknown keyword arguments {sorted(kwargs)}")
        device = self.get_base_layer().weight.device
        d = self.in_features

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        self.unike_kv_value[adapter_name] = nn.Parameter(zeros(0, d))
        self.unike_kv_key[adapter_name] = zeros(0, d)
        self.unike_kv_value_frozen[adapter_name] = zeros(0, d)
        self.unike_kv_entry[adapter_name] = zeros(0)
        self.unike_kv_anchor[adapter_name] = zeros(0, d)
        self.unike_kv_anchor_entry[adapter_name] = zeros(0)
        self.unike_kv_gain[adapter_name] = torch.ones(1, device=device)
        self.unike_sem_weight[adapter_name] = zeros(config.sem_dim, d)
        self.unike_tru_weight[adapter_name] = zeros(config.tru_dim, max(config.ffn_dim, 1))
        self.unike_encoder_ready[adapter_name] = zeros(1)
        self.unike_sim_threshold[adapter_name] = config.sim_threshold
        self.unike_alpha_max[adapter_name] = config.alpha_max
        self.unike_semantic[adapter_name] = config.semantic_retrieval
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ state
    def num_entries(self, adapter_name: str) -> int:
        """Memory entries (edits) of ``adapter_name``; 0 for an adapter this layer does not hold."""
        if adapter_name not in self.unike_kv_anchor_entry:
            return 0
        entries = self.unike_kv_anchor_entry[adapter_name]
        return 0 if entries.numel() == 0 else int(entries.max().item()) + 1

    def num_tokens(self, adapter_name: str) -> int:
        """Latent key-value pairs of ``adapter_name`` (all entries)."""
        if adapter_name not in self.unike_kv_key:
            return 0
        return int(self.unike_kv_key[adapter_name].shape[0])

    def values(self, adapter_name: str) -> torch.Tensor:
        """Frozen and current values joined (differentiable in the current ones). The current values are
        stored divided by ``unike_kv_gain`` (see :meth:`add_entry`), so that an optimiser step changes them
        relative to the size of the model's states, whatever that size."""
        frozen = self.unike_kv_value_frozen[adapter_name]
        current = self.unike_kv_value[adapter_name] * self.unike_kv_gain[adapter_name]
        return current if frozen.shape[0] == 0 else torch.cat([frozen, current], dim=0)

    def encoder_ready(self, adapter_name: str) -> bool:
        return bool(self.unike_encoder_ready[adapter_name].item() > 0)

    @torch.no_grad()
    def set_encoders(self, adapter_name: str, sem: torch.Tensor, tru: torch.Tensor) -> None:
        """Store the trained heads (``(sem_dim, d)``, ``(tru_dim, ffn_dim)``)."""
        for name, value in (("unike_sem_weight", sem), ("unike_tru_weight", tru)):
            old = getattr(self, name)[adapter_name]
            if tuple(value.shape) != tuple(old.shape):
                raise ValueError(
                    f"UniKE: {name} must have shape {tuple(old.shape)}, got {tuple(value.shape)}"
                )
            getattr(self, name)[adapter_name] = value.detach().to(old.device, torch.float32).clone()
        self.unike_encoder_ready[adapter_name] = torch.ones_like(self.unike_encoder_ready[adapter_name])

    def add_entry(
        self,
        adapter_name: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        fixed_keys: torch.Tensor | None = None,
        trainable: bool = True,
        value_step: float = 1.0,
    ) -> None:
        """:meth:`add_entries` with one entry."""
        self.add_entries(
            adapter_name, [(keys, values, fixed_keys)], trainable=trainable, value_step=value_step
        )

    @torch.no_grad()
    def add_entries(
        self,
        adapter_name: str,
        entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
        *,
        trainable: bool = True,
        value_step: float = 1.0,
    ) -> None:
        """Freeze the current values and add the entries of one edit (one per request).

        Each entry is ``(keys, values, fixed_keys)``: its own latent pairs ``(n, d)`` (the keys are also the
        entry's retrieval anchors; the values are trainable unless ``trainable=False``) and ``fixed_keys``
        ``(m, d)`` or ``None`` (pairs whose value is the key, e.g. retrieved demonstrations; never trained,
        never anchors). The fixed pairs of all entries are appended first and their own pairs last, so
        that this edit's trainable values are the last rows. They are stored in units of
        ``value_step · mean‖k‖ / √d`` (``unike_kv_gain``): an optimiser step of size ``lr`` per coordinate
        then moves a value by about ``value_step · lr`` of its own typical coordinate.
        """
        if adapter_name not in self.unike_kv_key:
            raise ValueError(f"UniKE memory layer has no adapter {adapter_name!r}")
        if not entries:
            raise ValueError("UniKE memory: add_entries needs at least one entry")
        d = self.in_features
        dev = self.unike_kv_key[adapter_name].device
        first = self.num_entries(adapter_name)
        fixed_keys, fixed_ids, own_keys, own_values, own_ids = [], [], [], [], []
        for offset, (keys, values, fixed) in enumerate(entries):
            fixed = keys.new_zeros(0, d) if fixed is None else fixed
            for name, t in (("keys", keys), ("values", values), ("fixed", fixed)):
                if t.dim() != 2 or t.shape[1] != d:
                    raise ValueError(f"UniKE memory: {name} must have width {d}, got shape {tuple(t.shape)}")
            if keys.shape != values.shape or keys.shape[0] == 0:
                raise ValueError("UniKE memory: an entry needs as many keys as values, at least one")
            entry = float(first + offset)
            fixed_keys.append(fixed.detach().to(dev, torch.float32))
            fixed_ids.append(torch.full((fixed.shape[0],), entry, device=dev))
            own_keys.append(keys.detach().to(dev, torch.float32))
            own_values.append(values.detach().to(dev, torch.float32))
            own_ids.append(torch.full((keys.shape[0],), entry, device=dev))
        fixed_all, own_all, own_vals = torch.cat(fixed_keys), torch.cat(own_keys), torch.cat(own_values)
        current = self.unike_kv_value[adapter_name]
        old = (current * self.unike_kv_gain[adapter_name]).detach()
        frozen = [self.unike_kv_value_frozen[adapter_name], old, fixed_all]
        gain = own_all.norm(dim=-1).mean().clamp_min(1e-6) * value_step / math.sqrt(d)
        gain = gain.reshape(1)
        if not trainable:
            frozen.append(own_vals)
            own_vals = own_vals[:0]
        self.unike_kv_value_frozen[adapter_name] = torch.cat(frozen, dim=0).clone()
        self.unike_kv_gain[adapter_name] = gain
        self.unike_kv_value[adapter_name] = nn.Parameter(
            (own_vals / gain).clone(), requires_grad=current.requires_grad
        )
        self.unike_kv_key[adapter_name] = torch.cat([self.unike_kv_key[adapter_name], fixed_all, own_all])
        self.unike_kv_entry[adapter_name] = torch.cat(
            [self.unike_kv_entry[adapter_name], *fixed_ids, *own_ids]
        )
        self.unike_kv_anchor[adapter_name] = torch.cat([self.unike_kv_anchor[adapter_name], own_all])
        self.unike_kv_anchor_entry[adapter_name] = torch.cat(
            [self.unike_kv_anchor_entry[adapter_name], *own_ids]
        )

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[torch.Tensor, bool]]:
        """Copies of every tensor of ``adapter_name`` (with its ``requires_grad``)."""
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
        """Resize the growing entries to their saved shapes before loading (a fresh layer holds none)."""
        for attr in _GROWING:
            container = getattr(self, attr)
            for name in list(container.keys()):
                saved = state_dict.get(f"{prefix}{attr}.{name}")
                if saved is None or tuple(saved.shape) == tuple(container[name].shape):
                    continue
                old = container[name]
                fresh = torch.zeros(saved.shape, dtype=old.dtype, device=old.device)
                if attr in self.adapter_layer_names:
                    container[name] = nn.Parameter(fresh, requires_grad=old.requires_grad)
                else:
                    container[name] = fresh

    # ------------------------------------------------------------------ retrieval
    def gate(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, entry)`` at every position of ``x`` ``(..., d)``: the mixing weight and the retrieved entry."""
        anchors = self.unike_kv_anchor[adapter_name]
        xf = x.float()
        if self.unike_semantic[adapter_name]:
            weight = self.unike_sem_weight[adapter_name]
            query, keys = F.linear(xf, weight), F.linear(anchors, weight)
        else:
            query, keys = xf, anchors
        sim = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
        best, index = sim.max(dim=-1)
        entry = self.unike_kv_anchor_entry[adapter_name].long()[index]
        threshold = self.unike_sim_threshold[adapter_name]
        alpha = ((best - threshold) / (1.0 - threshold)).clamp(0.0, 1.0) * self.unike_alpha_max[adapter_name]
        return alpha, entry

    def mix(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the retrieved in-context knowledge mixed in (see the module docstring)."""
        alpha, entry = self.gate(adapter_name, x)
        xf = x.float()
        keys = self.unike_kv_key[adapter_name]
        values = self.values(adapter_name)
        owner = self.unike_kv_entry[adapter_name].long()
        scores = (xf @ keys.T) / math.sqrt(keys.shape[-1])
        scores = scores.masked_fill(owner != entry.unsqueeze(-1), float("-inf"))
        retrieved = torch.softmax(scores, dim=-1) @ values
        return (xf + alpha.unsqueeze(-1) * (retrieved - xf)).to(x.dtype)

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible: the memory is a retrieval, not a weight change."""
        raise ValueError(
            "UniKE adapters cannot be merged: the patch neurons widen the FFN and the key-value memory is "
            "retrieved per position. Keep the adapter unmerged (save_pretrained / PeftModel.from_pretrained keep it)."
        )

    def unmerge(self) -> None:
        """Nothing to undo (a UniKE adapter is never merged)."""
        logger.warning("UniKE unmerge: nothing is merged")


class MemoryLinear(ResizeOnLoad, UniKEMemoryLayer):
    """UniKE's latent key-value memory on one self-attention output ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: UniKEConfig, **kwargs: Any) -> None:
        super().__init__()
        UniKEMemoryLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.disable_adapters:
            for name in self.active_adapters:
                if name in self.unike_kv_anchor_entry and self.unike_kv_anchor_entry[name].numel() > 0:
                    x = self.mix(name, x)
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "unike.memory." + super().__repr__()

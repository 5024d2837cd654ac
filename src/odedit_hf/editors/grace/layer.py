"""GRACE adapter layer: a growing codebook of (key, value, radius, label) entries on one ``nn.Linear``.

The base layer runs as usual; then, at every position, the layer input (the query) is compared with the
codebook's keys, and where it lies within the radius of its nearest key the output is replaced by that
key's value (over the key's span, see :class:`~.config.GRACEConfig`). Everything else is left exactly as
the base layer computed it.

State per adapter name (saved by peft's ``save_pretrained``, since every tensor's name holds ``grace_``):

- ``grace_keys[name]``: ``(N, in_features)`` float32 buffer, the detached queries of the edits;
- ``grace_radii[name]``: ``(N,)`` float32 buffer;
- ``grace_labels[name]``: ``(N, L)`` int64 buffer, each entry's target token ids, right-padded with ``-1``
  (decides split vs expand);
- ``grace_values[name]``: a ``ParameterList`` of ``N`` float32 values, entry ``i`` of shape ``(n_i,
  out_features)``: one row per position its hit replaces (``n_i = 1`` with ``replacement="last"``, the
  label's length with ``"span"``). Only the values of the current edit are trainable
  (:meth:`GRACELayer.set_trainable`); the others stay frozen, also through peft's ``set_adapter`` /
  ``disable_adapter``.

A hit at position ``p`` on entry ``i`` replaces the outputs at ``p, …, p + n_i - 1`` by the rows of its
value, in order; where spans overlap, the most recent hit wins.

A checkpoint with another codebook size loads into a fresh layer: :meth:`GRACELayer.resize_codebook` is
called from the tuner's load remap (peft's ``from_pretrained`` / ``load_adapter``) and from the layer's
``_load_from_state_dict`` (a plain ``load_state_dict``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from odedit_hf.editing.tuner import ResizeOnLoad

from .config import GRACEConfig

logger = logging.getLogger(__name__)

__all__ = ["GRACELayer", "Linear", "checkpoint_value_rows", "codebook_distances"]

_NOT_MERGEABLE = (
    "GRACE adapters cannot be merged into the base weights: the codebook replaces the layer's output only "
    "where a query falls within a key's radius, which no weight change reproduces. Keep the adapter "
    "unmerged (disable_adapter() gives the base model, unload() removes the adapter)."
)


def codebook_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(M, N)`` between ``queries (M, d)`` and ``keys (N, d)``, in float32, computed
    directly (not through the matmul expansion, whose rounding would put a query at a tiny non-zero
    distance from its own key)."""
    return torch.cdist(
        queries.to(torch.float32), keys.to(torch.float32), compute_mode="donot_use_mm_for_euclid_dist"
    )


def _nearest(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest key per row of ``dist (M, N)``; exact ties go to the newest
    entry (the highest index), so an edit whose key coincides with an older one takes precedence."""
    nearest_dist, flipped = dist.flip(1).min(dim=1)
    return nearest_dist, dist.shape[1] - 1 - flipped


def checkpoint_value_rows(
    state_dict: Mapping[str, Any], prefix: str, suffix: str = "", *, where: str
) -> tuple[list[int], int] | None:
    """``(rows of every value, label width)`` of one codebook in a state dict, or ``None`` if it has none.

    The codebook's tensors are ``{prefix}keys{suffix}``, ``{prefix}labels{suffix}`` and
    ``{prefix}values{suffix}.{i}`` (``prefix`` ends in ``grace_``; ``suffix`` is ``.<adapter>`` in a model's
    own state dict, empty in a saved adapter file).

    Raises:
        ValueError: the tensors do not describe one codebook (the file is damaged or incomplete).
    """
    keys = state_dict.get(f"{prefix}keys{suffix}")
    labels = state_dict.get(f"{prefix}labels{suffix}")
    if keys is None or labels is None:
        return None
    if keys.dim() != 2 or labels.dim() != 2 or keys.shape[0] != labels.shape[0]:
        raise ValueError(
            f"GRACE codebook of {where!r}: keys {tuple(keys.shape)} and labels {tuple(labels.shape)} do not "
            "describe one codebook (expected (N, d) and (N, L)); the checkpoint is damaged"
        )
    rows = []
    for i in range(int(keys.shape[0])):
        value = state_dict.get(f"{prefix}values{suffix}.{i}")
        if value is None or value.dim() != 2:
            raise ValueError(
                f"GRACE codebook of {where!r}: {keys.shape[0]} keys but no (rows, d) value for entry {i}; "
                "the checkpoint is incomplete, save it again with save_pretrained"
            )
        rows.append(int(value.shape[0]))
    return rows, int(labels.shape[1])


class GRACELayer(BaseTunerLayer):
    """Codebook state of GRACE on one layer, per adapter name (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = ("grace_values",)
    other_param_names: tuple[str, ...] = (
        "grace_keys",
        "grace_radii",
        "grace_labels",
        "grace_eps_init",
        "grace_replacement",
        "grace_value_init",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"GRACELayer: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        self.grace_values = nn.ModuleDict({})
        self.grace_keys = BufferDict({}, persistent=True)
        self.grace_radii = BufferDict({}, persistent=True)
        self.grace_labels = BufferDict({}, persistent=True)
        self.grace_eps_init: dict[str, float] = {}
        self.grace_replacement: dict[str, str] = {}
        self.grace_value_init: dict[str, str] = {}
        # indices of the values the current edit trains (not saved: a loaded adapter trains nothing)
        self._grace_trainable: dict[str, set[int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"GRACE can only wrap torch.nn.Linear modules, got {type(base).__name__}; "
                "choose an FFN projection (see the backbone registry's ffn_projections)."
            )
        self.in_features = base.in_features
        self.out_features = base.out_features

    # ------------------------------------------------------------------ creation, devices, trainability
    def update_layer(self, adapter_name: str, config: GRACEConfig, **kwargs: Any) -> None:
        """Create (or reset) the codebook of ``adapter_name``: empty, so the adapter is the identity."""
        if kwargs:
            raise ValueError(f"GRACELayer.update_layer: unknown keyword arguments {sorted(kwargs)}")
        self.grace_eps_init[adapter_name] = config.eps_init
        self.grace_replacement[adapter_name] = config.replacement
        self.grace_value_init[adapter_name] = config.value_init
        self.resize_codebook(adapter_name, [], 0)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _device(self) -> torch.device:
        return self.get_base_layer().weight.device

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Move the codebook to the base layer's device, keeping its dtypes (float32 keys and values: distances
        and the radius test must not run in the base model's bf16)."""
        device = self._device() if device is None else torch.device(device)
        if device.type == "meta":
            return
        if adapter_name in self.grace_values:
            self.grace_values[adapter_name].to(device)
        for store in (self.grace_keys, self.grace_radii, self.grace_labels):
            if adapter_name in store:
                store[adapter_name] = store[adapter_name].to(device)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """peft's ``set_adapter``, then the values that are not the current edit's are frozen again."""
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        for name, values in self.grace_values.items():
            keep = self._grace_trainable.get(name, set())
            for i, value in enumerate(values):
                if value.requires_grad and i not in keep:
                    value.requires_grad_(False)

    def set_trainable(self, adapter_name: str, indices: Iterable[int]) -> list[nn.Parameter]:
        """Make the values at ``indices`` the only trainable ones of ``adapter_name``; returns them."""
        indices = sorted(set(indices))
        values = self.grace_values[adapter_name]
        for i in indices:
            if not 0 <= i < len(values):
                raise ValueError(f"GRACE: no codebook entry {i} (the codebook has {len(values)})")
        self._grace_trainable[adapter_name] = set(indices)
        for i, value in enumerate(values):
            value.requires_grad_(i in self._grace_trainable[adapter_name])
        return [values[i] for i in indices]

    def trainable_indices(self, adapter_name: str) -> list[int]:
        """The entries whose values the current edit trains."""
        return sorted(self._grace_trainable.get(adapter_name, set()))

    # ------------------------------------------------------------------ the codebook
    def codebook_size(self, adapter_name: str) -> int:
        """The number of entries of ``adapter_name``'s codebook (0 when it has none)."""
        if adapter_name not in self.grace_keys:
            return 0
        return int(self.grace_keys[adapter_name].shape[0])

    def value_rows(self, adapter_name: str) -> list[int]:
        """The number of rows (replaced positions) of every entry's value."""
        return [int(v.shape[0]) for v in self.grace_values[adapter_name]]

    def label(self, adapter_name: str, index: int) -> list[int]:
        """The target token ids of entry ``index``."""
        row = self.grace_labels[adapter_name][index]
        return [int(t) for t in row[row >= 0].tolist()]

    def value_matrix(self, adapter_name: str) -> torch.Tensor:
        """``(sum n_i, out_features)``: every entry's value rows, concatenated in entry order
        (differentiable w.r.t. the trainable ones)."""
        values = list(self.grace_values[adapter_name])
        if not values:
            return torch.zeros(0, self.out_features, dtype=torch.float32, device=self._device())
        return torch.cat(values)

    @torch.no_grad()
    def nearest(self, adapter_name: str, query: torch.Tensor) -> tuple[float, int]:
        """Distance to, and index of, the nearest key of one query ``(in_features,)``; ``(inf, -1)`` when empty."""
        keys = self.grace_keys[adapter_name]
        if keys.shape[0] == 0:
            return float("inf"), -1
        dist = codebook_distances(query.reshape(1, -1).to(keys.device), keys)
        nearest_dist, index = _nearest(dist)
        return float(nearest_dist[0]), int(index[0])

    @torch.no_grad()
    def add_entry(
        self,
        adapter_name: str,
        key: torch.Tensor,
        label: Iterable[int],
        radius: float,
        value: torch.Tensor,
    ) -> int:
        """Append one entry (key, label, radius, value ``(rows, out_features)``; the value frozen until
        :meth:`set_trainable`); returns its index."""
        label = [int(t) for t in label]
        if not label or any(t < 0 for t in label):
            raise ValueError(f"GRACE: a label must be a non-empty list of token ids >= 0, got {label!r}")
        value = value.reshape(-1, value.shape[-1]) if value.dim() else value
        if key.numel() != self.in_features or value.dim() != 2 or value.shape[1] != self.out_features:
            raise ValueError(
                f"GRACE: a key must have {self.in_features} elements and a value shape (rows, {self.out_features}), "
                f"got {key.numel()} and {tuple(value.shape)}"
            )
        device = self._device()
        keys = self.grace_keys[adapter_name]
        labels = self.grace_labels[adapter_name]
        width = max(labels.shape[1], len(label))
        if width > labels.shape[1]:
            pad = torch.full((labels.shape[0], width - labels.shape[1]), -1, dtype=torch.int64, device=device)
            labels = torch.cat([labels, pad], dim=1)
        row = torch.full((1, width), -1, dtype=torch.int64, device=device)
        row[0, : len(label)] = torch.tensor(label, dtype=torch.int64, device=device)
        self.grace_keys[adapter_name] = torch.cat(
            [keys, key.detach().reshape(1, -1).to(device, torch.float32)]
        )
        self.grace_radii[adapter_name] = torch.cat(
            [
                self.grace_radii[adapter_name],
                torch.tensor([float(radius)], dtype=torch.float32, device=device),
            ]
        )
        self.grace_labels[adapter_name] = torch.cat([labels, row])
        parameter = nn.Parameter(value.detach().to(device, torch.float32).clone(), requires_grad=False)
        self.grace_values[adapter_name].append(parameter)
        return self.codebook_size(adapter_name) - 1

    @torch.no_grad()
    def set_radius(self, adapter_name: str, index: int, radius: float) -> None:
        """Set the radius of entry ``index``."""
        self.grace_radii[adapter_name][index] = float(radius)

    @torch.no_grad()
    def resize_codebook(self, adapter_name: str, rows: Sequence[int], label_width: int) -> None:
        """Give ``adapter_name`` a codebook of ``len(rows)`` zero entries (entry ``i`` with a ``rows[i]``-row
        value, labels ``label_width`` wide), e.g. to load a checkpoint into. Existing entries are dropped
        unless they already have exactly these shapes."""
        rows = [int(r) for r in rows]
        if (
            adapter_name in self.grace_keys
            and self.value_rows(adapter_name) == rows
            and self.grace_labels[adapter_name].shape[1] == label_width
        ):
            return
        if any(r < 1 for r in rows):
            raise ValueError(f"GRACE: every value needs at least one row, got {rows}")
        device = self._device()
        size = len(rows)
        self.grace_keys[adapter_name] = torch.zeros(
            size, self.in_features, dtype=torch.float32, device=device
        )
        self.grace_radii[adapter_name] = torch.zeros(size, dtype=torch.float32, device=device)
        self.grace_labels[adapter_name] = torch.full(
            (size, label_width), -1, dtype=torch.int64, device=device
        )
        self.grace_values[adapter_name] = nn.ParameterList(
            [
                nn.Parameter(
                    torch.zeros(r, self.out_features, dtype=torch.float32, device=device), requires_grad=False
                )
                for r in rows
            ]
        )
        self._grace_trainable[adapter_name] = set()

    # ------------------------------------------------------------------ snapshots
    @torch.no_grad()
    def codebook_state(self, adapter_name: str) -> dict[str, Any]:
        """A copy of ``adapter_name``'s codebook (for :meth:`load_codebook_state`)."""
        return {
            "keys": self.grace_keys[adapter_name].clone(),
            "radii": self.grace_radii[adapter_name].clone(),
            "labels": self.grace_labels[adapter_name].clone(),
            "values": [v.detach().clone() for v in self.grace_values[adapter_name]],
            "trainable": set(self._grace_trainable.get(adapter_name, set())),
        }

    @torch.no_grad()
    def load_codebook_state(self, adapter_name: str, state: Mapping[str, Any]) -> None:
        """Put ``adapter_name``'s codebook back to ``state`` exactly: size, keys, radii, labels, values and which
        values are trainable. Values that exist in both keep their ``Parameter`` objects (copied in place)."""
        self.grace_keys[adapter_name] = state["keys"].clone()
        self.grace_radii[adapter_name] = state["radii"].clone()
        self.grace_labels[adapter_name] = state["labels"].clone()
        old = list(self.grace_values[adapter_name])
        params = []
        for i, saved in enumerate(state["values"]):
            if i < len(old) and old[i].shape == saved.shape:
                old[i].copy_(saved)
                params.append(old[i])
            else:
                params.append(nn.Parameter(saved.clone(), requires_grad=False))
        self.grace_values[adapter_name] = nn.ParameterList(params)
        self.set_trainable(adapter_name, state["trainable"])

    def resize_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Resize every codebook that ``state_dict`` (a model state dict, keys under ``prefix``) holds at
        another size, so that ``load_state_dict`` can copy it in."""
        for name in list(self.grace_keys):
            found = checkpoint_value_rows(state_dict, f"{prefix}grace_", f".{name}", where=prefix.rstrip("."))
            if found is not None:
                self.resize_codebook(name, *found)


class Linear(ResizeOnLoad, GRACELayer):
    """GRACE on an ``nn.Linear``: the base output, with codebook hits replaced by their values."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GRACEConfig, **kwargs: Any) -> None:
        super().__init__()
        GRACELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible for GRACE (raises ``ValueError``)."""
        raise ValueError(_NOT_MERGEABLE)

    def unmerge(self) -> None:
        """Nothing is ever merged."""
        logger.warning("GRACE unmerge: nothing is merged (GRACE adapters cannot be merged)")

    def hits(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which positions of ``x (..., T, in_features)`` the codebook of ``adapter_name`` replaces, and by
        which value row: ``(mask, row)``, both shaped ``(sequences, T)``; ``row`` indexes
        :meth:`value_matrix`.

        A position is a *hit* when its query lies within the radius of its nearest key. A hit at ``p`` on
        entry ``i`` replaces ``p, …, p + n_i - 1`` (``n_i`` the rows of its value: 1 with
        ``replacement="last"``, so exactly the hits) by row ``0, …, n_i - 1``; the most recent hit wins.
        """
        keys = self.grace_keys[adapter_name]
        length = x.shape[-2] if x.dim() >= 2 else 1
        nearest_dist, entry = _nearest(codebook_distances(x.detach().reshape(-1, x.shape[-1]), keys))
        hit = (nearest_dist <= self.grace_radii[adapter_name][entry]).view(-1, length)
        entry = entry.view(-1, length)
        rows = torch.tensor(self.value_rows(adapter_name), dtype=torch.int64, device=entry.device)
        first_row = rows.cumsum(0) - rows
        positions = torch.arange(length, device=entry.device).expand_as(hit)
        last_hit = torch.where(hit, positions, torch.full_like(positions, -1)).cummax(dim=1).values
        entry = entry.gather(1, last_hit.clamp(min=0))
        offset = positions - last_hit
        mask = (last_hit >= 0) & (offset < rows[entry])
        return mask, torch.where(mask, first_row[entry] + offset, torch.zeros_like(offset))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if self.codebook_size(name) == 0:
                continue
            mask, row = self.hits(name, x)
            if not bool(mask.any()):
                continue
            shape = result.shape
            flat = result.reshape(mask.shape[0], mask.shape[1], shape[-1])
            values = self.value_matrix(name)[row].to(flat.dtype)
            result = torch.where(mask.unsqueeze(-1), values, flat).reshape(shape)
        return result

    def __repr__(self) -> str:
        return "grace." + super().__repr__()

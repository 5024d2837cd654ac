"""WISE adapter layer: the main memory (the frozen base ``nn.Linear``), a side memory, stored shards, a
merged memory, and the router that picks one of them per sequence.

Every memory is kept as a *delta* on the base weight ``W`` (memory ``k`` computes ``W x + D_k x``), so that
the main memory's output is the base layer's own, bit for bit, and a memory that was never trained is
exactly the identity.

State per adapter name (saved by peft's ``save_pretrained``: every tensor's name holds ``wise_``):

- ``wise_side[name]``: ``(out, in)`` float32 parameter ``Δ`` of the side memory ``W' = W + Δ ⊙ M``;
- ``wise_mask[name]``: ``(out, in)`` bool buffer ``M``, the current shard's random gradient mask;
- ``wise_memories[name]``: ``(S, out, in)`` float32 buffer, the stored shards (``retrieve=True``: every
  shard and every merge result; ``retrieve=False``: the shards not merged yet);
- ``wise_memory_min_act[name]``: ``(S,)`` float32, each shard's smallest recorded edit distance;
- ``wise_merged[name]``: ``(out, in)`` float32, the merged memory's delta (``retrieve=False``);
- ``wise_min_act[name]``: ``()`` float32, the smallest edit distance recorded for the side memory
  (``retrieve=True``: of the current shard; ``False``: of every edit); ``inf`` before the first edit;
- ``wise_counts[name]``: ``(4,)`` int64: edits, shards stored, merges, the shard the mask was drawn for.

A checkpoint with another number of stored shards loads into a fresh layer:
:meth:`WISELayer.resize_memories` is called from the tuner's load remap and from ``_load_from_state_dict``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from odedit_hf.editing.editor import ConstrainedLayer
from odedit_hf.editing.tuner import ResizeOnLoad

from .config import IDENTITY_ACT, WISEConfig

logger = logging.getLogger(__name__)

__all__ = [
    "EDITS",
    "MASK_SHARD",
    "MERGES",
    "SHARDS",
    "AttentionMaskHolder",
    "Linear",
    "WISELayer",
    "ties_merge",
]

#: Indices into ``wise_counts``.
EDITS, SHARDS, MERGES, MASK_SHARD = 0, 1, 2, 3

NOT_MERGEABLE = (
    "WISE adapters cannot be merged into the base weights: the router chooses the main memory or one side "
    "memory per sequence, which no single weight reproduces. Keep the adapter unmerged (disable_adapter() "
    "gives the base model, unload() removes the adapter)."
)


class AttentionMaskHolder:
    """The 2-D attention mask of the forward pass in progress (set by the tuner's pre-hook on the decoder
    stack, cleared by its post-hook); ``None`` outside a forward or when the model got none."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES merge of task vectors ``deltas`` with ``weights``, normalised as in EasyEdit's WISE (its
    ``GTA('magnitude', 'sum', normalize=True)``): per tensor keep the ``density`` largest magnitudes, elect
    each entry's sign from the sum of the weighted tensors, and average the sign-agreeing weighted entries
    by their weights.

    The sparsify / elect / disjoint-merge steps are peft's :func:`peft.utils.merge_utils.ties` (given the
    weighted tensors and unit weights, so the sign election is on the weighted sum as in EasyEdit); peft
    divides by the number of agreeing entries, which this function turns into the weight sum of those
    entries. With equal weights the result is peft's ``ties`` with unit weights.
    """
    from peft.utils.merge_utils import calculate_majority_sign_mask, prune, ties

    if not deltas or len(deltas) != len(weights):
        raise ValueError(f"ties_merge: need one weight per task vector, got {len(deltas)} and {len(weights)}")
    weighted = [d.float() * float(w) for d, w in zip(deltas, weights)]
    ones = torch.ones(len(weighted), device=weighted[0].device)
    merged = ties(weighted, ones, density)
    pruned = torch.stack([prune(t, density, method="magnitude") for t in weighted])
    agree = calculate_majority_sign_mask(pruned, method="total")
    count = agree.sum(dim=0).clamp(min=1).to(merged.dtype)
    w = torch.tensor([float(x) for x in weights], device=merged.device).view(-1, *([1] * merged.dim()))
    norm = (agree * w).sum(dim=0)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return merged * count / norm


class WISELayer(BaseTunerLayer, ConstrainedLayer):
    """WISE state on one layer, per adapter name (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = ("wise_side",)
    other_param_names: tuple[str, ...] = (
        "wise_mask",
        "wise_memories",
        "wise_memory_min_act",
        "wise_merged",
        "wise_min_act",
        "wise_counts",
        "wise_config",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"WISELayer: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        self.wise_side = nn.ParameterDict({})
        self.wise_mask = BufferDict({}, persistent=True)
        self.wise_memories = BufferDict({}, persistent=True)
        self.wise_memory_min_act = BufferDict({}, persistent=True)
        self.wise_merged = BufferDict({}, persistent=True)
        self.wise_min_act = BufferDict({}, persistent=True)
        self.wise_counts = BufferDict({}, persistent=True)
        self.wise_config: dict[str, WISEConfig] = {}
        # not saved: whether an edit is in progress (the side memory answers every row, unrouted), the
        # attention-mask holder of the tuner, and the last routing decision: per sequence the chosen
        # candidate (-1: the main memory) and every candidate's distance (see candidates())
        self._wise_editing: dict[str, bool] = {}
        self._wise_attention: AttentionMaskHolder | None = None
        self.last_choice: dict[str, torch.Tensor] = {}
        self.last_distances: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"WISE can only wrap torch.nn.Linear modules, got {type(base).__name__}; "
                "choose an FFN projection (see the backbone registry's ffn_projections)."
            )
        self.in_features = base.in_features
        self.out_features = base.out_features

    # ------------------------------------------------------------------ creation, devices
    def update_layer(self, adapter_name: str, config: WISEConfig, **kwargs: Any) -> None:
        """Create (or reset) ``adapter_name``: a zero side memory, no mask, no shard, no merge (the identity)."""
        if kwargs:
            raise ValueError(f"WISELayer.update_layer: unknown keyword arguments {sorted(kwargs)}")
        device = self._device()
        shape = (self.out_features, self.in_features)
        self.wise_config[adapter_name] = config
        self.wise_side[adapter_name] = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        self.wise_mask[adapter_name] = torch.zeros(shape, dtype=torch.bool, device=device)
        self.wise_merged[adapter_name] = torch.zeros(shape, dtype=torch.float32, device=device)
        self.wise_min_act[adapter_name] = torch.tensor(math.inf, dtype=torch.float32, device=device)
        self.wise_counts[adapter_name] = torch.tensor([0, 0, 0, -1], dtype=torch.int64, device=device)
        self.resize_memories(adapter_name, 0)
        self._wise_editing[adapter_name] = False
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _device(self) -> torch.device:
        return self.get_base_layer().weight.device

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Move the state to the base layer's device, keeping its dtypes (float32 memories, bool mask)."""
        device = self._device() if device is None else torch.device(device)
        if device.type == "meta":
            return
        if adapter_name in self.wise_side:
            self.wise_side[adapter_name].data = self.wise_side[adapter_name].data.to(device)
        for store in (
            self.wise_mask,
            self.wise_memories,
            self.wise_memory_min_act,
            self.wise_merged,
            self.wise_min_act,
            self.wise_counts,
        ):
            if adapter_name in store:
                store[adapter_name] = store[adapter_name].to(device)

    @torch.no_grad()
    def resize_memories(self, adapter_name: str, size: int) -> None:
        """Give ``adapter_name`` ``size`` zero stored shards (e.g. to load a checkpoint into); existing
        shards are kept when the size already matches."""
        if adapter_name in self.wise_memories and self.memory_count(adapter_name) == size:
            return
        device = self._device()
        self.wise_memories[adapter_name] = torch.zeros(
            size, self.out_features, self.in_features, dtype=torch.float32, device=device
        )
        self.wise_memory_min_act[adapter_name] = torch.full((size,), math.inf, device=device)

    # ------------------------------------------------------------------ the memories
    def memory_count(self, adapter_name: str) -> int:
        """The number of stored shards of ``adapter_name``."""
        return int(self.wise_memories[adapter_name].shape[0])

    def count(self, adapter_name: str, index: int) -> int:
        """One of ``wise_counts`` (:data:`EDITS`, :data:`SHARDS`, :data:`MERGES`, :data:`MASK_SHARD`)."""
        return int(self.wise_counts[adapter_name][index])

    def side_delta(self, adapter_name: str) -> torch.Tensor:
        """``Δ ⊙ M``: the side memory's delta on the base weight (differentiable in ``Δ``; the mask makes
        the gradient zero outside the shard's entries, whatever the optimiser)."""
        return self.wise_side[adapter_name] * self.wise_mask[adapter_name]

    def has_state(self, adapter_name: str) -> bool:
        """Whether any memory of ``adapter_name`` differs from the main memory."""
        return bool(
            self.memory_count(adapter_name) > 0
            or self.count(adapter_name, MERGES) > 0
            or bool(self.side_delta(adapter_name).detach().ne(0).any())
        )

    @torch.no_grad()
    def draw_mask(self, adapter_name: str) -> bool:
        """Draw the gradient mask of the current shard if it has none yet (``mask_ratio`` of the entries,
        Bernoulli, seeded by ``mask_seed`` + shard index); returns whether one was drawn."""
        counts = self.wise_counts[adapter_name]
        shard = int(counts[SHARDS])
        if int(counts[MASK_SHARD]) == shard:
            return False
        config = self.wise_config[adapter_name]
        generator = torch.Generator().manual_seed(config.mask_seed + shard)
        mask = torch.rand(self.out_features, self.in_features, generator=generator) < config.mask_ratio
        self.wise_mask[adapter_name] = mask.to(self._device())
        counts[MASK_SHARD] = shard
        return True

    def set_editing(self, adapter_name: str, editing: bool) -> None:
        """While editing, the side memory answers every sequence (no routing), as in WISE's training."""
        self._wise_editing[adapter_name] = bool(editing)

    def is_editing(self, adapter_name: str) -> bool:
        return bool(self._wise_editing.get(adapter_name, False))

    @torch.no_grad()
    def apply_constraint(self, adapter_name: str) -> None:
        """After every optimiser step: ``Δ`` clamped to ``[-c, c]`` (``W' ∈ W ± c``) and zero off the mask."""
        if adapter_name not in self.wise_side:
            return
        side = self.wise_side[adapter_name]
        c = self.wise_config[adapter_name].norm_constraint
        if c is not None:
            side.clamp_(-c, c)
        side.mul_(self.wise_mask[adapter_name])

    @torch.no_grad()
    def record_edit(self, adapter_name: str, distances: torch.Tensor, num_requests: int) -> None:
        """Record an edit: its distances ``Δ_edit`` (one per edited sequence) lower the side memory's
        ``min_act``; the edit count grows by ``num_requests``."""
        if distances.numel():
            low = distances.detach().float().min().to(self.wise_min_act[adapter_name].device)
            self.wise_min_act[adapter_name] = torch.minimum(self.wise_min_act[adapter_name], low)
        self.wise_counts[adapter_name][EDITS] += int(num_requests)

    @torch.no_grad()
    def push_shard(self, adapter_name: str) -> None:
        """Store the side memory as a shard and start a fresh one (zero ``Δ``; the next edit draws a new
        mask). With ``retrieve`` the shard keeps its ``min_act`` and the side memory's is reset."""
        config = self.wise_config[adapter_name]
        shard = self.side_delta(adapter_name).detach().float().unsqueeze(0)
        self.wise_memories[adapter_name] = torch.cat([self.wise_memories[adapter_name], shard])
        self.wise_memory_min_act[adapter_name] = torch.cat(
            [self.wise_memory_min_act[adapter_name], self.wise_min_act[adapter_name].reshape(1)]
        )
        self.wise_side[adapter_name].zero_()
        if config.retrieve:
            self.wise_min_act[adapter_name] = torch.full_like(self.wise_min_act[adapter_name], math.inf)
        self.wise_counts[adapter_name][SHARDS] += 1

    @torch.no_grad()
    def merge_memories(self, adapter_name: str) -> None:
        """TIES-merge the stored shards (:func:`ties_merge`).

        ``retrieve=False``: every stored shard (weight ``weights`` each) goes into the merged memory; once a
        merged memory exists it takes part with weight 0.6 and the new shards share 0.4, as in EasyEdit.
        The shards are then dropped. ``retrieve=True``: the last ``merge_freq // save_freq`` shards become
        one shard whose ``min_act`` is the smallest of theirs.
        """
        config = self.wise_config[adapter_name]
        memories = self.wise_memories[adapter_name]
        n = memories.shape[0]
        if config.retrieve:
            k = config.merge_freq // config.save_freq
            if n < k:
                raise ValueError(f"WISE merge: {n} stored shard(s), a retrieve merge needs {k}")
            merged = ties_merge(list(memories[n - k :]), [config.weights] * k, config.densities)
            low = self.wise_memory_min_act[adapter_name][n - k :].min().reshape(1)
            self.wise_memories[adapter_name] = torch.cat([memories[: n - k], merged.unsqueeze(0)])
            self.wise_memory_min_act[adapter_name] = torch.cat(
                [self.wise_memory_min_act[adapter_name][: n - k], low]
            )
        else:
            if n == 0:
                raise ValueError("WISE merge: no stored shard to merge")
            if self.count(adapter_name, MERGES) == 0:
                deltas, weights = list(memories), [config.weights / n] * n
            else:
                deltas = [*memories, self.wise_merged[adapter_name]]
                weights = [0.4 / n] * n + [0.6]
            self.wise_merged[adapter_name] = ties_merge(deltas, weights, config.densities)
            self.resize_memories(adapter_name, 0)
        self.wise_counts[adapter_name][MERGES] += 1

    # ------------------------------------------------------------------ snapshots
    @torch.no_grad()
    def adapter_state(self, adapter_name: str) -> dict[str, Any]:
        """A copy of ``adapter_name``'s state (for :meth:`load_adapter_state`)."""
        return {
            "side": self.wise_side[adapter_name].detach().clone(),
            "mask": self.wise_mask[adapter_name].clone(),
            "memories": self.wise_memories[adapter_name].clone(),
            "memory_min_act": self.wise_memory_min_act[adapter_name].clone(),
            "merged": self.wise_merged[adapter_name].clone(),
            "min_act": self.wise_min_act[adapter_name].clone(),
            "counts": self.wise_counts[adapter_name].clone(),
            "editing": self.is_editing(adapter_name),
        }

    @torch.no_grad()
    def load_adapter_state(self, adapter_name: str, state: Mapping[str, Any]) -> None:
        """Put ``adapter_name`` back to ``state`` exactly (the side memory's ``Parameter`` object is kept)."""
        self.wise_side[adapter_name].copy_(state["side"])
        self.wise_mask[adapter_name] = state["mask"].clone()
        self.wise_memories[adapter_name] = state["memories"].clone()
        self.wise_memory_min_act[adapter_name] = state["memory_min_act"].clone()
        self.wise_merged[adapter_name] = state["merged"].clone()
        self.wise_min_act[adapter_name] = state["min_act"].clone()
        self.wise_counts[adapter_name] = state["counts"].clone()
        self.set_editing(adapter_name, state["editing"])

    def resize_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Resize the stored shards of every adapter that ``state_dict`` (keys under ``prefix``) holds at
        another count, so that ``load_state_dict`` can copy them in."""
        for name in list(self.wise_memories):
            saved = state_dict.get(f"{prefix}wise_memories.{name}")
            if saved is not None:
                self.resize_memories(name, int(saved.shape[0]))

    # ------------------------------------------------------------------ routing
    def _activation(self, adapter_name: str) -> Any:
        name = self.wise_config[adapter_name].act_fn
        if name == IDENTITY_ACT:
            return lambda t: t
        from transformers.activations import ACT2FN

        return ACT2FN[name]

    def distances(
        self,
        adapter_name: str,
        base_out: torch.Tensor,
        delta_out: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        infer: bool,
    ) -> torch.Tensor:
        """WISE's activation distance per sequence: ``‖act(base + delta) − act(base)‖₂`` per token, averaged
        over the attended tokens (``mask (B, T)``; ``None``: all); at inference a sequence longer than
        ``long_sequence`` tokens takes its largest token distance instead. ``base_out``, ``delta_out``:
        ``(B, T, out)``. Returns ``(B,)`` float32 (differentiable in ``delta_out``)."""
        act = self._activation(adapter_name)
        base = base_out.float()
        per_token = (act(base + delta_out.float()) - act(base)).norm(dim=-1)
        if mask is None:
            mask = torch.ones_like(per_token)
        mask = mask.to(per_token.dtype)
        if infer and per_token.shape[1] > self.wise_config[adapter_name].long_sequence:
            return per_token.masked_fill(mask == 0, -math.inf).amax(dim=1)
        return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def candidates(self, adapter_name: str) -> tuple[list[torch.Tensor], list[float]]:
        """The memories the router may choose (deltas) and their thresholds ``τ``: the side memory first,
        then the stored shards, then (``retrieve=False``, after a merge) the merged memory."""
        config = self.wise_config[adapter_name]

        def tau(min_act: float) -> float:
            return math.inf if not math.isfinite(min_act) else config.act_ratio * min_act

        side_tau = tau(float(self.wise_min_act[adapter_name]))
        deltas = [self.side_delta(adapter_name)]
        memories = self.wise_memories[adapter_name]
        deltas += list(memories)
        if config.retrieve:
            taus = [side_tau] + [tau(float(a)) for a in self.wise_memory_min_act[adapter_name]]
        else:
            if self.count(adapter_name, MERGES) > 0:
                deltas.append(self.wise_merged[adapter_name])
            taus = [side_tau] * len(deltas)
        return deltas, taus

    def choose(self, adapter_name: str, dist: torch.Tensor, taus: Sequence[float]) -> torch.Tensor:
        """The routing rule: ``(B,)`` index of the chosen candidate per sequence, ``-1`` for the main memory.

        ``retrieve=False``: the candidate with the largest distance (ties go to the side memory), unless
        every distance is below τ. ``retrieve=True``: the side memory if its distance reaches its τ; then
        each stored shard in order replaces the choice when its distance is larger than the side memory's
        and every shard's taken so far and above its own τ.
        """
        none = torch.full((dist.shape[0],), -1, dtype=torch.long, device=dist.device)
        if not self.wise_config[adapter_name].retrieve:
            best, index = dist.max(dim=1)
            return torch.where(best >= taus[0], index, none)
        choice = torch.where(dist[:, 0] >= taus[0], torch.zeros_like(none), none)
        best = dist[:, 0]
        for i in range(1, dist.shape[1]):
            take = (dist[:, i] > best) & (dist[:, i] > taus[i])
            choice = torch.where(take, torch.full_like(choice, i), choice)
            best = torch.where(take, dist[:, i], best)
        return choice

    def _attention_mask(self, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        holder = self._wise_attention
        mask = None if holder is None else holder.mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
            return None
        return mask[:, mask.shape[1] - length :].to(device)


class Linear(ResizeOnLoad, WISELayer):
    """WISE on an ``nn.Linear``: the base output, or (per sequence) a memory's, as the router decides."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: WISEConfig, **kwargs: Any) -> None:
        super().__init__()
        WISELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible for WISE (raises ``ValueError``)."""
        raise ValueError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        """Nothing is ever merged."""
        logger.warning("WISE unmerge: nothing is merged (WISE adapters cannot be merged)")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.wise_side:
                continue
            if self.is_editing(name):
                delta = self.side_delta(name)
                result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
                continue
            result = self._route(name, x, result)
        return result

    def _route(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        deltas, taus = self.candidates(name)
        length = x.shape[-2] if x.dim() >= 2 else 1
        x3 = x.reshape(-1, length, x.shape[-1])
        if all(not math.isfinite(t) for t in taus):  # no recorded edit: nothing can reach a threshold
            self.last_choice[name] = torch.full((x3.shape[0],), -1, dtype=torch.long)
            self.last_distances[name] = torch.zeros(x3.shape[0], 0)
            return result
        base3 = result.reshape(x3.shape[0], length, result.shape[-1])
        mask = self._attention_mask(x3.shape[0], length, x.device)
        with torch.no_grad():
            outs = torch.stack([F.linear(x3.float(), d.detach()) for d in deltas])  # (K, B, T, out)
            dist = torch.stack(
                [self.distances(name, base3, out, mask, infer=True) for out in outs], dim=1
            )  # (B, K)
            choice = self.choose(name, dist, taus)
        self.last_choice[name] = choice.detach().cpu()
        self.last_distances[name] = dist.detach().cpu()
        if not bool((choice >= 0).any()):
            return result
        rows = torch.arange(x3.shape[0], device=choice.device)
        picked = outs[choice.clamp(min=0), rows].to(base3.dtype)
        routed = torch.where((choice >= 0).view(-1, 1, 1), base3 + picked, base3)
        return routed.reshape(result.shape)

    def __repr__(self) -> str:
        return "wise." + super().__repr__()

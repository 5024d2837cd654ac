"""SERAC adapter layers: the cache and the scope classifier on the input embedding, the counterfactual
model's low-rank deltas on linear layers.

Neither layer changes its base layer's output by itself: the embedding layer's forward is the
embedding's, and a linear layer adds its delta only while :class:`~.model.SERACModel` runs the
counterfactual forward (``counterfactual_on`` is set for the duration of that forward). The routing
between the base model and the counterfactual model happens around the whole model's forward
(:mod:`.model`), which reads the cache and the classifier from :class:`Embedding`.

State per adapter name (every tensor's name holds ``serac_``, so peft's ``save_pretrained`` writes it):

- cache (persistent buffers, grown by edits, resized on load):
  ``serac_cache_ids[name]`` ``(N, L)`` int64, each edit's context tokens right-padded with ``-1``;
  ``serac_cache_feat[name]`` ``(N, H)`` float32, the base model's pooled image+text features of each
  edit's input (prompt + image); ``serac_markers[name]`` ``(M, L')`` int64, the token sequences that end
  a wrapped prompt (pooling stops after the last one), set at the first edit;
- classifier (parameters, trained by :mod:`.trainer`): ``serac_proj_w`` ``(D, H)``, ``serac_proj_b``
  ``(D,)``, ``serac_log_scale`` ``()``;
- the counterfactual model's copy head (parameters, on :class:`Embedding`; absent when ``copy_dim`` is
  0): ``serac_copy_q`` / ``serac_copy_k`` ``(C, H)`` (attention of each query position over the cached
  context's positions), ``serac_gate_w`` ``(H,)``, ``serac_gate_b`` ``()`` (the copy gate);
- counterfactual deltas (parameters): ``serac_A`` ``(r, in)``, ``serac_B`` ``(out, r)`` (``B`` starts at
  zero), scaled by ``alpha / r``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from odedit_hf.editors.ike.layer import pad_rows

from .config import SERACConfig

logger = logging.getLogger(__name__)

__all__ = ["CACHE_BUFFERS", "Embedding", "Linear", "SERACLayer"]

#: The buffer dicts that make up one adapter's cache.
CACHE_BUFFERS: tuple[str, ...] = ("serac_cache_ids", "serac_cache_feat", "serac_markers")
#: The classifier's parameter dicts (on :class:`Embedding`).
CLASSIFIER_PARAMS: tuple[str, ...] = ("serac_proj_w", "serac_proj_b", "serac_log_scale")
#: The copy head's parameter dicts (on :class:`Embedding`).
COPY_PARAMS: tuple[str, ...] = ("serac_copy_q", "serac_copy_k", "serac_gate_w", "serac_gate_b")

NOT_MERGEABLE = (
    "SERAC adapters cannot be merged into the base weights: a SERAC edit is a cache entry routed to a "
    "counterfactual model, not a weight change. Keep the adapter unmerged (disable_adapter() gives the base "
    "model, unload() removes the adapter)."
)


def _concat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` then ``b`` (both right-padded with ``-1``), padded to the wider."""
    width = max(a.shape[1], b.shape[1])
    a = nn.functional.pad(a.to(b.device), (0, width - a.shape[1]), value=-1)
    return torch.cat([a, nn.functional.pad(b, (0, width - b.shape[1]), value=-1)], dim=0)


class SERACLayer(BaseTunerLayer):
    """Shared peft plumbing of the two SERAC layers (no merge; ``disable_adapters`` honoured by the tuner)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible for SERAC (raises ``ValueError``)."""
        raise ValueError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        """Nothing to undo: SERAC never merges."""

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        # no requires_grad changes: SERAC trains nothing at edit time (the trainer sets requires_grad itself)
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        self._active_adapter = adapter_names

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Nothing: the trainer chooses what trains."""

    def _device(self) -> torch.device:
        return self.get_base_layer().weight.device


class Embedding(nn.Module, SERACLayer):
    """The cache and the scope classifier on an ``nn.Embedding``; its forward is the embedding's."""

    other_param_names = (
        *CACHE_BUFFERS,
        *CLASSIFIER_PARAMS,
        *COPY_PARAMS,
        "serac_cls_layer",
        "serac_similarity",
        "serac_threshold",
        "serac_pooling",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SERACConfig, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"SERAC Embedding: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        if not isinstance(self.get_base_layer(), nn.Embedding):
            raise ValueError(
                f"SERAC holds its cache on the model's input embedding (torch.nn.Embedding), got "
                f"{type(self.get_base_layer()).__name__}; target model.get_input_embeddings()"
            )
        for name in CACHE_BUFFERS:
            setattr(self, name, BufferDict({}, persistent=True))
        self.serac_proj_w = nn.ParameterDict({})
        self.serac_proj_b = nn.ParameterDict({})
        self.serac_log_scale = nn.ParameterDict({})
        for name in COPY_PARAMS:
            setattr(self, name, nn.ParameterDict({}))
        self.serac_cls_layer: dict[str, int] = {}
        self.serac_similarity: dict[str, str] = {}
        self.serac_threshold: dict[str, float] = {}
        self.serac_pooling: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SERACConfig, **kwargs: Any) -> None:
        """Create (or reset) ``adapter_name``: an empty cache and an untrained classifier."""
        if kwargs:
            raise ValueError(f"SERAC Embedding.update_layer: unknown keyword arguments {sorted(kwargs)}")
        device = self._device()
        self.serac_cls_layer[adapter_name] = config.cls_layer
        self.serac_similarity[adapter_name] = config.similarity
        self.serac_threshold[adapter_name] = config.threshold
        self.serac_pooling[adapter_name] = config.pooling
        weight = torch.empty(config.proj_dim, config.hidden_size, device=device)
        nn.init.orthogonal_(weight)
        self.serac_proj_w[adapter_name] = nn.Parameter(weight, requires_grad=False)
        self.serac_proj_b[adapter_name] = nn.Parameter(
            torch.zeros(config.proj_dim, device=device), requires_grad=False
        )
        self.serac_log_scale[adapter_name] = nn.Parameter(torch.zeros((), device=device), requires_grad=False)
        for name in COPY_PARAMS:
            if adapter_name in getattr(self, name):
                del getattr(self, name)[adapter_name]
        if config.copy_dim > 0:
            std = config.hidden_size**-0.5
            for name in ("serac_copy_q", "serac_copy_k"):
                value = torch.randn(config.copy_dim, config.hidden_size, device=device) * std
                getattr(self, name)[adapter_name] = nn.Parameter(value, requires_grad=False)
            self.serac_gate_w[adapter_name] = nn.Parameter(
                torch.zeros(config.hidden_size, device=device), requires_grad=False
            )
            self.serac_gate_b[adapter_name] = nn.Parameter(
                torch.zeros((), device=device), requires_grad=False
            )
        self.load_cache(adapter_name, self.empty_cache())
        self.set_adapter(self.active_adapters)

    # ------------------------------------------------------------------ cache
    @staticmethod
    def empty_cache() -> dict[str, torch.Tensor]:
        """The state of an adapter that caches nothing."""
        return {
            "serac_cache_ids": torch.zeros(0, 0, dtype=torch.long),
            "serac_cache_feat": torch.zeros(0, 0, dtype=torch.float32),
            "serac_markers": torch.zeros(0, 0, dtype=torch.long),
        }

    def cache_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter's cache (for snapshots)."""
        return {name: getattr(self, name)[adapter_name].detach().clone() for name in CACHE_BUFFERS}

    def load_cache(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Replace the adapter's cache by ``state`` (from :meth:`cache_state` or :meth:`empty_cache`)."""
        for name in CACHE_BUFFERS:
            getattr(self, name)[adapter_name] = state[name].detach().clone().to(self._device())

    def num_edits(self, adapter_name: str) -> int:
        return int(self.serac_cache_ids[adapter_name].shape[0])

    def add_edits(self, adapter_name: str, ids: Sequence[Sequence[int]], features: torch.Tensor) -> None:
        """Append edits: their context token ids and pooled features ``(n, H)``."""
        if len(ids) != features.shape[0]:
            raise ValueError(f"SERAC: {len(ids)} context rows but {features.shape[0]} feature rows")
        old_ids, old_feat = self.serac_cache_ids[adapter_name], self.serac_cache_feat[adapter_name]
        feat = features.detach().to(self._device(), torch.float32)
        if old_feat.shape[0] and old_feat.shape[1] != feat.shape[1]:
            raise ValueError(
                f"SERAC: features of width {feat.shape[1]} do not match the cache's {old_feat.shape[1]}"
            )
        self.serac_cache_ids[adapter_name] = _concat_padded(old_ids, pad_rows(ids).to(self._device()))
        self.serac_cache_feat[adapter_name] = torch.cat([old_feat.reshape(-1, feat.shape[1]), feat])

    def set_markers(self, adapter_name: str, markers: Sequence[Sequence[int]]) -> None:
        """The token sequences that end a wrapped prompt (the features pool up to the last one)."""
        self.serac_markers[adapter_name] = pad_rows(markers).to(self._device())

    # ------------------------------------------------------------------ classifier
    def classifier_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [getattr(self, name)[adapter_name] for name in CLASSIFIER_PARAMS]

    def copy_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The copy head's parameters (none when the adapter has no copy head)."""
        return [
            getattr(self, name)[adapter_name] for name in COPY_PARAMS if adapter_name in getattr(self, name)
        ]

    def copy_logprobs(
        self,
        adapter_name: str,
        lm_logits: torch.Tensor,
        queries: torch.Tensor,
        keys: torch.Tensor,
        key_ids: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The counterfactual model's output ``log((1 - g) softmax(lm_logits) + g copy)`` (a pointer-generator
        over the cached context): ``copy`` is the attention of every query position's hidden state
        ``(B, T, H)`` over the context positions' ``keys`` ``(B, L, H)`` (``key_mask`` ``(B, L)``), scattered
        onto the context's token ids ``key_ids`` ``(B, L)``; ``g = sigmoid(gate_w . h + gate_b)``. Without a
        copy head: ``log_softmax(lm_logits)``."""
        logp = lm_logits.float().log_softmax(-1)
        if adapter_name not in self.serac_copy_q:
            return logp
        q = queries.float() @ self.serac_copy_q[adapter_name].T
        k = keys.float() @ self.serac_copy_k[adapter_name].T
        att = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
        att = att.masked_fill(~key_mask[:, None, :], float("-inf")).softmax(-1)
        att = torch.nan_to_num(att, nan=0.0)  # a row without context copies nothing
        copy = torch.zeros_like(logp).scatter_add_(
            -1, key_ids.clamp_min(0)[:, None, :].expand(-1, att.shape[1], -1), att
        )
        gate = torch.sigmoid(
            queries.float() @ self.serac_gate_w[adapter_name] + self.serac_gate_b[adapter_name]
        )
        gate = gate.clamp(1e-6, 1 - 1e-6)[..., None]
        return torch.logaddexp(torch.log1p(-gate) + logp, gate.log() + copy.clamp_min(1e-30).log())

    def project(self, adapter_name: str, features: torch.Tensor) -> torch.Tensor:
        """The classifier's embedding ``(n, D)`` of pooled features ``(n, H)``."""
        w, b = self.serac_proj_w[adapter_name], self.serac_proj_b[adapter_name]
        return features.to(w.dtype) @ w.T + b

    def similarity(self, adapter_name: str, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` similarities in (0, 1] of query features ``(B, H)`` to cached features ``(N, H)``:
        ``exp(-scale * squared L2)`` of the projections (``"l2"``, EasyEdit's) or
        ``sigmoid(scale * 10 * (cos - 0.5))`` (``"cos"``)."""
        q, k = self.project(adapter_name, queries), self.project(adapter_name, keys)
        scale = self.serac_log_scale[adapter_name].exp()
        if self.serac_similarity[adapter_name] == "cos":
            cos = nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(k, dim=-1).T
            return torch.sigmoid(scale * 10.0 * (cos - 0.5))
        dist = (q.unsqueeze(1) - k.unsqueeze(0)).pow(2).sum(-1)
        return torch.exp(-scale * dist)

    # ------------------------------------------------------------------ plumbing
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a grown cache loads into a fresh (empty) one: resize before the buffer dicts load
        for name in CACHE_BUFFERS:
            for adapter in list(getattr(self, name).keys()):
                tensor = state_dict.get(f"{prefix}{name}.{adapter}")
                if tensor is not None and tuple(tensor.shape) != tuple(getattr(self, name)[adapter].shape):
                    dtype = getattr(self, name)[adapter].dtype
                    getattr(self, name)[adapter] = torch.zeros(
                        tensor.shape, dtype=dtype, device=self._device()
                    )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __repr__(self) -> str:
        return "serac." + super().__repr__()


class Linear(nn.Module, SERACLayer):
    """A linear layer of the counterfactual model: ``base(x) + (alpha / r) * B A x`` while the
    counterfactual forward runs (``counterfactual_on``), ``base(x)`` otherwise."""

    other_param_names = ("serac_A", "serac_B", "serac_scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SERACConfig, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"SERAC Linear: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        if not isinstance(self.get_base_layer(), nn.Linear):
            raise ValueError(
                f"SERAC's counterfactual deltas wrap torch.nn.Linear, got {type(self.get_base_layer()).__name__}"
            )
        self.serac_A = nn.ParameterDict({})
        self.serac_B = nn.ParameterDict({})
        self.serac_scaling: dict[str, float] = {}
        self.counterfactual_on = False
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SERACConfig, **kwargs: Any) -> None:
        """Create (or reset) ``adapter_name``'s delta: ``A`` Kaiming-uniform, ``B`` zero (no change)."""
        if kwargs:
            raise ValueError(f"SERAC Linear.update_layer: unknown keyword arguments {sorted(kwargs)}")
        base = self.get_base_layer()
        a = torch.empty(config.rank, base.in_features, device=base.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.serac_A[adapter_name] = nn.Parameter(a, requires_grad=False)
        self.serac_B[adapter_name] = nn.Parameter(
            torch.zeros(base.out_features, config.rank, device=base.weight.device), requires_grad=False
        )
        self.serac_scaling[adapter_name] = config.alpha / config.rank
        self.set_adapter(self.active_adapters)

    def delta_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.serac_A[adapter_name], self.serac_B[adapter_name]]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.counterfactual_on or self.disable_adapters:
            return out
        for name in self.active_adapters:
            if name not in self.serac_A:
                continue
            a, b = self.serac_A[name], self.serac_B[name]
            out = out + (x.to(a.dtype) @ a.T @ b.T * self.serac_scaling[name]).to(out.dtype)
        return out

    def __repr__(self) -> str:
        return "serac." + super().__repr__()

"""IKE adapter layer: the memory of edited facts and demonstrations, held on the model's input embedding.

The layer's forward is the base embedding's, unchanged: the prefixing happens around the whole model's
forward (:mod:`.model`), which reads the memory from this layer. Keeping the memory in a tuner layer
gives it what every other adapter has: per-adapter state saved by peft's ``save_pretrained`` (every
tensor's name holds ``ike_``), ``disable_adapter`` (the layer's ``disable_adapters`` flag turns the
prefixing off) and ``set_adapter``.

State per adapter name (persistent buffers, grown by edits, resized on load):

- ``ike_fact_ids[name]``: ``(F, L)`` int64, each edited fact's context tokens, right-padded with ``-1``;
- ``ike_fact_emb[name]``: ``(F, E)`` float32, each fact's sentence embedding (unit norm);
- ``ike_demo_ids[name]``: ``(D, L')`` int64, each demonstration's tokens, right-padded with ``-1``;
- ``ike_demo_emb[name]``: ``(D, E')`` float32, each demonstration's sentence embedding;
- ``ike_demo_image[name]``: ``(D,)`` int64, the row of ``ike_demo_pixels`` holding the image of each
  demonstration, ``-1`` for a text-only one (``(0,)`` when no demonstration carries an image);
- ``ike_demo_pixels[name]``: ``(N, ...)``, the preprocessed ``pixel_values`` of the demonstrations'
  images (one row per distinct image, in the vision tower's dtype; ``(0,)`` when there are none). A
  demonstration with an image starts with that image's placeholder span in ``ike_demo_ids``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from odedit_hf.editing.tuner import ResizeOnLoad

from .config import IKEConfig

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_BUFFERS", "MEMORY_BUFFERS", "Embedding", "IKELayer", "pad_rows", "unpad_row"]

#: The buffers of the demonstrations' images (absent from adapters saved before they existed).
IMAGE_BUFFERS: tuple[str, ...] = ("ike_demo_image", "ike_demo_pixels")
#: The buffer dicts that make up one adapter's memory.
MEMORY_BUFFERS: tuple[str, ...] = (
    "ike_fact_ids",
    "ike_fact_emb",
    "ike_demo_ids",
    "ike_demo_emb",
    *IMAGE_BUFFERS,
)

_NOT_MERGEABLE = (
    "IKE adapters cannot be merged into the base weights: an IKE edit is context prepended to the input, "
    "not a weight change. Keep the adapter unmerged (disable_adapter() gives the base model, unload() "
    "removes the adapter)."
)


def pad_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(N, max len)`` int64 of token-id rows, right-padded with ``-1`` (``(0, 0)`` for no rows)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def unpad_row(row: torch.Tensor) -> list[int]:
    """The token ids of one padded row (the ``-1`` padding dropped)."""
    return [int(t) for t in row.tolist() if t >= 0]


def _concat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    width = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
    return torch.cat([pad(a.to(b.device)), pad(b)], dim=0)


class IKELayer(BaseTunerLayer):
    """The memory of IKE on the input embedding, per adapter name (see the module docstring)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = (
        *MEMORY_BUFFERS,
        "ike_k",
        "ike_facts_per_input",
        "ike_encoder",
        "ike_max_length",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"IKELayer: unknown keyword arguments {sorted(kwargs)}")
        self.base_layer = base_layer
        for name in MEMORY_BUFFERS:
            setattr(self, name, BufferDict({}, persistent=True))
        self.ike_k: dict[str, int] = {}
        self.ike_facts_per_input: dict[str, int] = {}
        self.ike_encoder: dict[str, str] = {}
        self.ike_max_length: dict[str, int | None] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        if not isinstance(self.get_base_layer(), nn.Embedding):
            raise ValueError(
                f"IKE holds its memory on the model's input embedding (torch.nn.Embedding), got "
                f"{type(self.get_base_layer()).__name__}; target model.get_input_embeddings()"
            )

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, config: IKEConfig, **kwargs: Any) -> None:
        """Create (or reset) the memory of ``adapter_name``: empty, so the adapter is the identity."""
        if kwargs:
            raise ValueError(f"IKELayer.update_layer: unknown keyword arguments {sorted(kwargs)}")
        self.ike_k[adapter_name] = config.k
        self.ike_facts_per_input[adapter_name] = config.facts_per_input
        self.ike_encoder[adapter_name] = config.encoder
        self.ike_max_length[adapter_name] = config.max_length
        self.load_memory(adapter_name, self.empty_memory())
        self.set_adapter(self.active_adapters)

    @staticmethod
    def empty_memory() -> dict[str, torch.Tensor]:
        """The state of an adapter that holds nothing."""
        ids = torch.zeros(0, 0, dtype=torch.long)
        emb = torch.zeros(0, 0, dtype=torch.float32)
        return {
            "ike_fact_ids": ids,
            "ike_fact_emb": emb,
            "ike_demo_ids": ids.clone(),
            "ike_demo_emb": emb.clone(),
            "ike_demo_image": torch.zeros(0, dtype=torch.long),
            "ike_demo_pixels": torch.zeros(0, dtype=torch.float32),
        }

    # ------------------------------------------------------------------ memory
    def memory_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter's memory (for snapshots)."""
        return {name: getattr(self, name)[adapter_name].detach().clone() for name in MEMORY_BUFFERS}

    def load_memory(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Replace the adapter's memory by ``state`` (from :meth:`memory_state` or :meth:`empty_memory`;
        a state without the image buffers, as saved before they existed, gets empty ones)."""
        device = self._device()
        empty = self.empty_memory()
        for name in MEMORY_BUFFERS:
            tensor = state.get(name, empty[name] if name in IMAGE_BUFFERS else None)
            if tensor is None:
                raise ValueError(f"IKELayer.load_memory: the state has no {name!r}")
            getattr(self, name)[adapter_name] = tensor.detach().clone().to(device)

    def num_facts(self, adapter_name: str) -> int:
        return int(self.ike_fact_ids[adapter_name].shape[0])

    def num_demos(self, adapter_name: str) -> int:
        return int(self.ike_demo_ids[adapter_name].shape[0])

    def add_facts(self, adapter_name: str, ids: Sequence[Sequence[int]], embeddings: torch.Tensor) -> None:
        """Append edited facts (their context token ids and sentence embeddings)."""
        self._append(adapter_name, "ike_fact_ids", "ike_fact_emb", ids, embeddings)

    def set_demos(
        self,
        adapter_name: str,
        ids: Sequence[Sequence[int]],
        embeddings: torch.Tensor,
        images: Sequence[int] | None = None,
        pixels: torch.Tensor | None = None,
    ) -> None:
        """Replace the demonstrations (token ids and sentence embeddings; with ``images``, the row of
        ``pixels`` holding each demonstration's image, ``-1`` for none, its span already in ``ids``)."""
        device = self._device()
        if (images is None) != (pixels is None):
            raise ValueError("IKELayer.set_demos: give images and pixels together, or neither")
        if images is not None and pixels is not None:
            if len(images) != len(ids) or any(not -1 <= i < pixels.shape[0] for i in images):
                raise ValueError(
                    f"IKELayer.set_demos: {len(images)} image indices for {len(ids)} demonstrations and "
                    f"{pixels.shape[0]} images; each index must be -1 or a row of pixels"
                )
            self.ike_demo_image[adapter_name] = torch.as_tensor(list(images), dtype=torch.long).to(device)
            self.ike_demo_pixels[adapter_name] = pixels.detach().to(device).clone()
        else:
            empty = self.empty_memory()
            self.ike_demo_image[adapter_name] = empty["ike_demo_image"].to(device)
            self.ike_demo_pixels[adapter_name] = empty["ike_demo_pixels"].to(device)
        self.ike_demo_ids[adapter_name] = pad_rows(ids).to(device)
        self.ike_demo_emb[adapter_name] = embeddings.detach().to(device, torch.float32).clone()

    def demo_image(self, adapter_name: str, index: int) -> int:
        """The row of ``ike_demo_pixels`` of demonstration ``index``'s image, ``-1`` for none."""
        images = self.ike_demo_image[adapter_name]
        return int(images[index]) if images.numel() else -1

    def _append(
        self, adapter_name: str, ids_name: str, emb_name: str, ids: Sequence[Sequence[int]], emb: torch.Tensor
    ) -> None:
        if len(ids) != emb.shape[0]:
            raise ValueError(f"IKELayer: {len(ids)} token rows but {emb.shape[0]} embeddings")
        old_ids, old_emb = getattr(self, ids_name)[adapter_name], getattr(self, emb_name)[adapter_name]
        emb = emb.detach().to(self._device(), torch.float32)
        if old_emb.shape[0] and old_emb.shape[1] != emb.shape[1]:
            raise ValueError(
                f"IKELayer: embeddings of width {emb.shape[1]} do not match the memory's {old_emb.shape[1]}; "
                "the adapter was filled with another sentence encoder"
            )
        getattr(self, ids_name)[adapter_name] = _concat_padded(old_ids, pad_rows(ids).to(self._device()))
        getattr(self, emb_name)[adapter_name] = torch.cat([old_emb.reshape(-1, emb.shape[1]), emb])

    def _device(self) -> torch.device:
        return self.get_base_layer().weight.device

    def resize_from_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Give every memory buffer of every adapter found in ``state_dict`` the checkpoint's shape."""
        for name in MEMORY_BUFFERS:
            for adapter in list(getattr(self, name).keys()):
                tensor = state_dict.get(f"{prefix}{name}.{adapter}")
                if tensor is not None and tuple(tensor.shape) != tuple(getattr(self, name)[adapter].shape):
                    dtype = tensor.dtype if name == "ike_demo_pixels" else getattr(self, name)[adapter].dtype
                    getattr(self, name)[adapter] = torch.zeros(
                        tensor.shape, dtype=dtype, device=self._device()
                    )

    # ------------------------------------------------------------------ peft interface
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible for IKE (raises ``ValueError``)."""
        raise ValueError(_NOT_MERGEABLE)

    def unmerge(self) -> None:
        """Nothing to undo: IKE never merges."""

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """IKE has no trainable tensor: nothing to do."""

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        self._active_adapter = adapter_names


class Embedding(ResizeOnLoad, IKELayer):
    """:class:`IKELayer` on an ``nn.Embedding``; its forward is the embedding's."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IKEConfig, **kwargs: Any) -> None:
        super().__init__()
        IKELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "ike." + super().__repr__()

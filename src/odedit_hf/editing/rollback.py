"""Rollback checks: hash the base weights, snapshot and restore the adapter.

An edit lives in an adapter, so rolling it back means putting the adapter back to its initial
state; the base weights must never change. :class:`BaseWeights` proves it: it records the model's
own parameters and buffers *before* the PEFT wrap (PEFT keeps those very tensors inside its
``base_layer`` modules) and hashes their bytes on demand.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["AdapterSnapshot", "BaseWeights", "RollbackError", "hash_tensors"]


class RollbackError(RuntimeError):
    """The base weights changed during an edit that should have left them alone."""


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements per fingerprint chunk: bounds the int64 temporaries to 128 MiB


def _device_fingerprint(t: torch.Tensor) -> bytes:
    """Two integer checksums of a tensor's raw bits, computed where the tensor lives.

    ``Σ xᵢ`` and ``Σ xᵢ·wᵢ`` over the elements reinterpreted as integers, with fixed odd weights
    ``wᵢ`` from a multiplicative hash of the index; int64 arithmetic wraps, and integer addition is
    associative, so the result is the same whatever the reduction order. Any single changed element
    changes the first sum; an accidental compensating change of several elements would have to fool
    both. Used on accelerators instead of copying every base weight to the host (7B bf16 weights are
    14 GB per check; this reads them once on the device).
    """
    flat = t.detach().contiguous().reshape(-1)
    ints = flat.view(_INT_VIEW[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    weighted = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, ints.numel(), _CHUNK):
        x = ints[start : start + _CHUNK].to(torch.int64)
        idx = torch.arange(start, start + x.numel(), dtype=torch.int64, device=t.device)
        w = (idx * 2654435761) % 4294967291 * 2 + 1
        total += x.sum()
        weighted += (x * w).sum()
    return f"{int(total)}:{int(weighted)}".encode()


def hash_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """Digest of names, dtypes, shapes and contents of the tensors, in the order given.

    CPU tensors: BLAKE2b of the raw bytes (bit-exact: ``-0.0`` and ``0.0``, or two NaN payloads, hash
    differently). Tensors on an accelerator: BLAKE2b of an on-device integer fingerprint of the raw
    bits (:func:`_device_fingerprint`), so no weight is copied to the host.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type}|".encode())
        if not t.numel():
            continue
        if t.device.type == "cpu":
            # the contiguous array's own buffer: no copy of the bytes (``tobytes`` copied every tensor)
            digest.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        else:
            digest.update(_device_fingerprint(t))
    return digest.hexdigest()


class BaseWeights:
    """The base model's parameters and buffers, recorded before wrapping, hashable at any time.

    Args:
        model: the plain transformers model (call before ``get_peft_model``).
    """

    def __init__(self, model: nn.Module) -> None:
        if hasattr(model, "peft_config") or any(
            hasattr(m, "base_layer") and hasattr(m, "active_adapters") for m in model.modules()
        ):
            raise ValueError(
                "BaseWeights must record the model before it is wrapped by PEFT, so that adapter "
                "parameters are not mistaken for base weights; call it before get_peft_model"
            )
        # named_parameters / named_buffers yield a tensor shared by several modules (tied weights) once
        self._named: list[tuple[str, torch.Tensor]] = [*model.named_parameters(), *model.named_buffers()]
        self._reference: tuple[str, list[str]] | None = None
        self._requires_grad = {
            name: t.requires_grad for name, t in self._named if isinstance(t, torch.nn.Parameter)
        }

    def __len__(self) -> int:
        return len(self._named)

    def tensor_digests(self) -> list[str]:
        """One hash per recorded tensor, in recording order."""
        return [hash_tensors([(name, t)]) for name, t in self._named]

    def digest(self) -> str:
        """The current hash of all recorded tensors together (a hash of :meth:`tensor_digests`)."""
        per_tensor = self.tensor_digests()
        value = hashlib.blake2b("".join(per_tensor).encode(), digest_size=16).hexdigest()
        self._reference = (value, per_tensor)  # lets check() name the tensors that changed
        return value

    def check(self, expected: str, *, context: str) -> str:
        """Hash again and raise :class:`RollbackError` if the hash differs from ``expected``.

        Args:
            expected: a :meth:`digest` taken earlier.
            context: what just happened, for the message (e.g. ``"after rolling back edit 7"``).

        Returns:
            The current digest (equal to ``expected``).
        """
        per_tensor = self.tensor_digests()
        current = hashlib.blake2b("".join(per_tensor).encode(), digest_size=16).hexdigest()
        if current != expected:
            changed = ""
            if self._reference is not None and self._reference[0] == expected:
                names = [n for (n, _), a, b in zip(self._named, per_tensor, self._reference[1]) if a != b]
                changed = f" (changed: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            raise RollbackError(
                f"base weights changed {context}{changed}: hash {current} != {expected}. An editor wrote into the base "
                "model instead of its adapter (or an adapter was merged and not unmerged); the results of this "
                "run are not valid"
            )
        return current

    def restore_requires_grad(self) -> None:
        """Give the base parameters back the ``requires_grad`` flags they had when recorded (PEFT clears them)."""
        for name, tensor in self._named:
            if name in self._requires_grad:
                tensor.requires_grad_(self._requires_grad[name])


class AdapterSnapshot:
    """A copy of an adapter's parameters, to re-initialise (or roll back) the adapter between edits.

    Args:
        model: the PEFT-wrapped model.
        adapter_name: the adapter to snapshot; its parameters are those whose name has the
            component ``adapter_name`` and that are not base weights.
        base: the model's :class:`BaseWeights`: its tensors are never part of the adapter, even when a
            name has the component ``adapter_name``.
    """

    def __init__(
        self, model: nn.Module, adapter_name: str = "default", *, base: BaseWeights | None = None
    ) -> None:
        base_ids = {id(t) for _, t in base._named} if base is not None else set()
        self._params: list[tuple[str, torch.nn.Parameter]] = [
            (name, p)
            for name, p in model.named_parameters()
            if adapter_name in name.split(".") and id(p) not in base_ids
        ]
        if not self._params:
            raise ValueError(
                f"AdapterSnapshot: the model has no parameter of adapter {adapter_name!r}; "
                "wrap it with get_peft_model first"
            )
        self._saved = [p.detach().clone() for _, p in self._params]

    @property
    def names(self) -> list[str]:
        """The snapshotted parameter names."""
        return [name for name, _ in self._params]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back into the adapter's parameters (in place: optimisers and hooks stay valid)."""
        for (_, p), saved in zip(self._params, self._saved):
            p.copy_(saved)

    def digest(self) -> str:
        """Hash of the adapter's current values."""
        return hash_tensors(self._params)

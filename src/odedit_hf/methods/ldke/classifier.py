"""The Disentanglement Classifier: per-position features, the adapter state holding one logistic probe
per edit, its training, and its snapshot.

Features (our design): at the input of the lowest candidate decoder layer, position ``t`` is described
by ``[LN(h_t) ; LN(mean_{s<=t} h_s)]`` -- the token's own hidden state and the causal mean of the
sequence so far (on LLaVA-style models the image tokens' states are the projected vision features, so
the mean fuses image and text). Nothing an edit changes is upstream of that layer, so the features of an
input are the same before and after any number of edits. ``LN`` is a parameter-free layer norm.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ClassifierState", "GateSnapshot", "gate_features", "gate_logits", "train_logistic"]


def gate_features(hidden: torch.Tensor) -> torch.Tensor:
    """``(B, T, H)`` hidden states -> ``(B, T, 2H)`` float32 features ``[LN(h_t) ; LN(prefix mean)]``.

    The prefix mean is causal, so right padding never changes the features of the real tokens.
    """
    if hidden.dim() != 3:
        raise ValueError(
            f"gate_features: expected (batch, tokens, hidden) states, got shape {tuple(hidden.shape)}"
        )
    h = hidden.detach().float()
    counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
    mean = h.cumsum(dim=1) / counts
    size = (h.shape[-1],)
    return torch.cat([F.layer_norm(h, size), F.layer_norm(mean, size)], dim=-1)


class ClassifierState(nn.Module):
    """The classifier's adapter state (persistent buffers, saved by peft into adapter_model.safetensors).

    Attributes:
        weight: ``(capacity, dim)`` one logistic weight vector per edited request (rows ``< count``).
        bias: ``(capacity,)`` their biases.
        count: how many slots hold a classifier.
        used_layers: ``(num_layers,)`` 1 for the decoder layers some edit has trained; the adapter
            layers of the other candidate layers contribute nothing.
    """

    def __init__(self, capacity: int, dim: int, num_layers: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(capacity, dim), persistent=True)
        self.register_buffer("bias", torch.zeros(capacity), persistent=True)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("used_layers", torch.zeros(num_layers, dtype=torch.long), persistent=True)

    @property
    def capacity(self) -> int:
        return int(self.weight.shape[0])

    @torch.no_grad()
    def add(self, weight: torch.Tensor, bias: torch.Tensor) -> int:
        """Store one trained probe in the next free slot; returns its index."""
        n = int(self.count)
        if n >= self.capacity:
            raise ValueError(
                f"LDKE: all {self.capacity} classifier slots are used; raise --ldke.classifier_capacity "
                "(a sequential run keeps one slot per edited request)"
            )
        self.weight[n].copy_(weight.to(self.weight))
        self.bias[n].copy_(bias.to(self.bias).reshape(()))
        self.count.fill_(n + 1)
        return n


def gate_logits(state: ClassifierState, features: torch.Tensor) -> torch.Tensor | None:
    """The classifier's logit per position: the max over the stored probes (an input is in scope of the
    edited adapter when it is in scope of any of its edits); ``None`` when no probe is stored yet."""
    n = int(state.count)
    if n == 0:
        return None
    weight = state.weight[:n].to(features.device)
    bias = state.bias[:n].to(features.device)
    return (features @ weight.T + bias).amax(dim=-1)


def train_logistic(
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A logistic probe separating ``positives`` (P, D) from ``negatives`` (N, D).

    Class-balanced BCE (each class weighs one half), L2 on the weight, Adam from zero; ``anchor`` rows
    (the edit prompt's own positions) count a second time among the positives, so the probe fires on
    the edit itself first. Deterministic (no sampling).
    """
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError("train_logistic: need at least one positive and one negative feature row")
    pos = positives if anchor is None else torch.cat([positives, anchor])
    x = torch.cat([pos, negatives]).float()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(negatives))]).to(x.device)
    w_row = torch.cat(
        [torch.full((len(pos),), 0.5 / len(pos)), torch.full((len(negatives),), 0.5 / len(negatives))]
    )
    w_row = w_row.to(x.device)
    weight = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros((), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            logits = x @ weight + bias
            loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w_row).sum()
            loss = loss + weight_decay * weight.pow(2).sum()
            loss.backward()
            opt.step()
    return weight.detach(), bias.detach()


class GateSnapshot:
    """Copies of a :class:`ClassifierState`'s buffers; ``restore()`` puts them back in place."""

    def __init__(self, state: ClassifierState) -> None:
        self.state = state
        self._saved = {name: b.detach().clone() for name, b in state.named_buffers()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, buffer in self.state.named_buffers():
            buffer.copy_(self._saved[name])

"""UniKE's disentangled spaces: the model's own states at the memory and patch layers, and the two
contrastively trained projection heads over them.

- The *semantic* head ``S`` (``sem_dim × d``) reads the memory layer's input (the self-attention output
  before ``o_proj``) at the positions that predict a target token. It is trained with a supervised
  contrastive (InfoNCE) loss: the states of one record's edit prompt, text rephrase and image rephrase
  are positives of each other; every other record's states and the locality prompts' states are
  negatives. Retrieval of the extrinsic memory compares states in this space.
- The *truthfulness* head ``T`` (``tru_dim × ffn_dim``) reads the patched FFN's input at the answer
  tokens of ``prompt -> alt`` (the edited, "truthful" statement) and ``prompt -> pred`` (the model's old
  answer), trained with the same loss on those two labels. The truthfulness direction of an edit,
  ``ζ = mean T(h⁺) − mean T(h⁻)`` lifted back through ``Tᵀ``, steers the keys of the edit's patch
  neurons (``k = q/‖q‖² + β ζ̂/‖q‖``).

States come from the model itself (``collect_states``); the heads are trained once per model (and per
source) and stored in the adapter.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone, PromptSample

logger = logging.getLogger(__name__)

__all__ = ["RecordStates", "collect_states", "contrastive_loss", "train_head"]


@dataclass
class RecordStates:
    """States of one sample: at the memory layer's prediction positions (``mem``, ``(p, d)``) and, per
    patched FFN, at its answer positions (``ffn[i]``, ``(a, ffn_dim)``)."""

    mem: torch.Tensor
    ffn: list[torch.Tensor]


@torch.no_grad()
def collect_states(
    backbone: Backbone,
    model: torch.nn.Module,
    mem_module: torch.nn.Module,
    ffn_modules: Sequence[torch.nn.Module],
    samples: Sequence[PromptSample | Callable[[], PromptSample]],
    *,
    batch_size: int = 16,
) -> list[RecordStates]:
    """Run ``samples`` through ``model`` (as it is) and return each one's :class:`RecordStates`.

    ``mem_module`` and ``ffn_modules`` are the modules whose first input is captured (the memory layer and
    the patched FFNs' key projections; capture on the adapter layers themselves sees the inputs before the
    memory mixes anything in). Positions: *prediction* positions are those whose next token is a target
    token; *answer* positions hold a target token.
    """
    from odedit_hf.backbones import IGNORE_INDEX, PromptSample
    from odedit_hf.editing import model_device, model_inputs
    from odedit_hf.editors.tpatcher.memory import capture_inputs

    device = model_device(model)
    out: list[RecordStates] = []
    for start in range(0, len(samples), batch_size):
        chunk = [s if isinstance(s, PromptSample) else s() for s in samples[start : start + batch_size]]
        batch = backbone.build_batch(chunk, device=device)
        labels = batch["labels"]
        with contextlib.ExitStack() as stack:
            mem_seen = stack.enter_context(capture_inputs(mem_module))
            ffn_seen = [stack.enter_context(capture_inputs(m)) for m in ffn_modules]
            model(**model_inputs(batch))
        if len(mem_seen) != 1 or any(len(seen) != 1 for seen in ffn_seen):
            raise ValueError("UniKE: a memory or patched layer did not run exactly once in one forward")
        b, t = labels.shape
        mem = mem_seen[0].reshape(b, t, -1).float()
        ffn = [seen[0].reshape(b, t, -1).float() for seen in ffn_seen]
        answer = labels != IGNORE_INDEX
        predict = torch.zeros_like(answer)
        predict[:, :-1] = answer[:, 1:]
        for i in range(b):
            out.append(RecordStates(mem[i][predict[i]].cpu(), [f[i][answer[i]].cpu() for f in ffn]))
    return out


def contrastive_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive (InfoNCE) loss of the unit rows ``z`` ``(n, r)`` with ``labels`` ``(n,)``:
    ``−mean_i log Σ_{j∈P(i)} e^{z_i·z_j/τ} / Σ_{k≠i} e^{z_i·z_k/τ}`` over the rows ``i`` with a positive."""
    sim = (z @ z.T) / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    positive = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~eye
    has = positive.any(dim=1)
    if not has.any():
        return z.new_zeros(())
    log_all = torch.logsumexp(sim, dim=1)
    log_pos = torch.logsumexp(sim.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_pos)[has].mean()


def train_head(
    states: torch.Tensor,
    labels: torch.Tensor,
    dim: int,
    *,
    steps: int,
    lr: float,
    temperature: float,
    batch: int,
    seed: int,
) -> tuple[torch.Tensor, float, float]:
    """Train a linear head ``(dim, d)`` on ``states`` ``(n, d)`` with :func:`contrastive_loss`.

    Returns the head and the loss before and after (on the whole set when it fits in one batch, else on
    a fixed seeded subset). Deterministic for a given seed.
    """
    generator = torch.Generator().manual_seed(seed)
    d = states.shape[1]
    weight = torch.empty(dim, d)
    torch.nn.init.orthogonal_(weight, generator=generator)
    weight = torch.nn.Parameter(weight)
    x = states.float()
    scale = x.norm(dim=-1).mean().clamp_min(1e-6)
    x = x / scale  # the loss is scale-free; this only conditions the optimisation
    optimizer = torch.optim.Adam([weight], lr=lr)
    n = x.shape[0]
    probe = torch.randperm(n, generator=generator)[:batch]

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(F.normalize(x[idx] @ weight.T, dim=-1), labels[idx], temperature)

    with torch.no_grad():
        before = float(loss_on(probe))
    positive = labels.unsqueeze(0) == labels.unsqueeze(1)
    if int(positive.sum()) == n:  # no row has a positive: nothing to learn, keep the initial head
        logger.warning("UniKE: no two states share a label; the head keeps its random initialisation")
        return weight.detach().clone(), before, before
    with torch.enable_grad():
        for _ in range(steps):
            idx = probe if n <= batch else torch.randperm(n, generator=generator)[:batch]
            loss = loss_on(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = float(loss_on(probe))
    return weight.detach().clone(), before, after


def semantic_set(groups: Sequence[tuple[Sequence[RecordStates], Sequence[RecordStates]]]) -> tuple[Any, Any]:
    """``(states, labels)`` for the semantic head: per group ``(positives, negatives)`` the positives share
    the group's label; every negative sample gets a label of its own."""
    rows, labels = [], []
    next_label = len(groups)
    for g, (positives, negatives) in enumerate(groups):
        for rec in positives:
            rows.append(rec.mem)
            labels.append(torch.full((rec.mem.shape[0],), g))
        for rec in negatives:
            rows.append(rec.mem)
            labels.append(torch.full((rec.mem.shape[0],), next_label))
            next_label += 1
    return torch.cat(rows), torch.cat(labels)


def truth_set(pairs: Sequence[tuple[RecordStates, RecordStates | None]]) -> tuple[Any, Any] | None:
    """``(states, labels)`` for the truthfulness head: answer-token states (at the last patched FFN) of
    ``-> alt`` (label 1) and of ``-> pred`` (label 0); ``None`` when no pair has a ``pred`` sample."""
    rows, labels = [], []
    for pos, neg in pairs:
        if neg is None:
            continue
        rows += [pos.ffn[-1], neg.ffn[-1]]
        labels += [torch.ones(pos.ffn[-1].shape[0]), torch.zeros(neg.ffn[-1].shape[0])]
    if not rows:
        return None
    return torch.cat(rows), torch.cat(labels)

"""ASAM's two mechanisms as plain functions: LAR's latent perturbations and RCSL's singular-value penalty.

- :func:`perturbed_input` / :func:`captured_output`: forward hooks on one decoder layer (a pre-hook that
  records and perturbs the hidden states entering it, a hook that records its output).
- :func:`prompt_mask`, :func:`random_in_ball`, :func:`project_to_ball`, :func:`lar_perturbations`:
  Latent Adversarial Robustification. A variant is a perturbation ``δ`` of the hidden states entering
  the edit layer at the *prompt* positions (image and text tokens; the teacher-forced target tokens and
  the padding are left alone), inside the per-token ball ``‖δ_t‖₂ ≤ ε‖h_t‖₂``, found by a few steps of
  projected, per-token normalised gradient ascent on the target NLL from a random start in the ball.
- :func:`unit_matrix`, :func:`rcsl_penalty`: Rank-Constrained Subspace Learning. The unit's
  representations (one row per member, L2-normalised) are stacked with the clean edit prompt's first;
  the penalty is the mass of the singular values beyond the leading ``rank``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from odedit_hf.editing.environments import IGNORE_INDEX
from odedit_hf.editing.loss import model_inputs, nll_from_logits

logger = logging.getLogger(__name__)

__all__ = [
    "captured_output",
    "lar_perturbations",
    "lar_radius",
    "last_prompt_positions",
    "perturbed_input",
    "project_to_ball",
    "prompt_mask",
    "random_in_ball",
    "rcsl_penalty",
    "unit_matrix",
]

_EPS = 1e-12


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(
            "ASAM: the decoder layer was called without hidden states (neither as its first argument nor as "
            "hidden_states=); LAR cannot perturb it"
        )
    return hidden, False


@contextlib.contextmanager
def perturbed_input(
    layer: nn.Module, delta: torch.Tensor | None, record: list[torch.Tensor] | None = None
) -> Iterator[None]:
    """Within the block, ``layer`` sees ``h + delta`` instead of its input hidden states ``h``.

    Args:
        layer: a decoder layer (its first argument, or ``hidden_states=``, is ``(B, T, H)``).
        delta: ``(B, T, H)``, added in ``h``'s dtype; ``None`` only records.
        record: if given, every call appends the clean input ``h`` (detached) to it.
    """

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        hidden, positional = _hidden_of(args, kwargs)
        if record is not None:
            record.append(hidden.detach())
        if delta is None:
            return None
        if tuple(delta.shape) != tuple(hidden.shape):
            raise ValueError(
                f"ASAM: the LAR perturbation has shape {tuple(delta.shape)} but the hidden states entering the "
                f"edit layer have {tuple(hidden.shape)}; perturb the batch the perturbation was made for"
            )
        moved = hidden + delta.to(hidden.dtype)
        if positional:
            return (moved, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": moved}

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def captured_output(layer: nn.Module, out: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, every call of ``layer`` appends its output hidden states ``(B, T, H)`` to ``out``
    (attached to the graph)."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"ASAM: the representation layer returned {type(output).__name__}, not a tensor")
        out.append(hidden)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def prompt_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T)`` bool: the real (non-padding) positions that are not target tokens (image + prompt)."""
    return batch["attention_mask"].bool() & (batch["labels"] == IGNORE_INDEX)


def last_prompt_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B,)``: per row, the position of the last prompt token (the one predicting the first target token).

    Raises:
        ValueError: a row without target tokens, or whose first token is a target.
    """
    is_target = labels != IGNORE_INDEX
    if not bool(is_target.any(dim=1).all()):
        raise ValueError("ASAM: a prompt has no labelled target token; build it with Backbone.build_batch")
    first = is_target.int().argmax(dim=1)
    if bool((first == 0).any()):
        raise ValueError("ASAM: a row starts with a target token; it has no prompt to represent")
    return first - 1


def project_to_ball(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Each token's vector of ``delta`` (``(..., H)``) scaled onto the ball of its ``radius`` (``(..., 1)``)
    when outside it; inside, unchanged."""
    norm = delta.norm(dim=-1, keepdim=True)
    scale = torch.where(norm > radius, radius / norm.clamp_min(_EPS), torch.ones_like(norm))
    return delta * scale


def random_in_ball(
    radius: torch.Tensor, hidden_size: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per token a uniformly random direction scaled by ``radius · u``, ``u ~ U(0, 1)`` (LAR's random start,
    which makes the variants of one step differ). Zero where the radius is zero."""
    shape = (*radius.shape[:-1], hidden_size)
    direction = torch.randn(shape, generator=generator, device=radius.device, dtype=radius.dtype)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    u = torch.rand((*radius.shape[:-1], 1), generator=generator, device=radius.device, dtype=radius.dtype)
    return direction * radius * u


def lar_radius(
    forward: Callable[..., Any], layer: nn.Module, batch: Mapping[str, torch.Tensor], epsilon: float
) -> torch.Tensor:
    """``(B, T, 1)``: the per-token LAR radius ``epsilon · ‖h_t‖₂`` at the prompt positions of ``batch``
    (:func:`prompt_mask`), zero elsewhere; ``h`` the hidden states entering ``layer`` (one no-grad pass)."""
    record: list[torch.Tensor] = []
    with torch.no_grad(), perturbed_input(layer, None, record):
        forward(model_inputs(batch))
    if len(record) != 1:
        raise ValueError(f"ASAM: the edit layer ran {len(record)} times in one forward pass; expected once")
    hidden = record[0].float()
    mask = prompt_mask(batch).to(hidden.device)
    return epsilon * hidden.norm(dim=-1, keepdim=True) * mask.unsqueeze(-1).to(hidden.dtype)


def lar_perturbations(
    forward: Callable[..., Any],
    layer: nn.Module,
    batch: Mapping[str, torch.Tensor],
    radius: torch.Tensor,
    hidden_size: int,
    *,
    steps: int,
    step_size: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LAR: the perturbations of the hidden states entering ``layer`` that raise the target NLL of ``batch``.

    ``steps`` times: ``δ ← Π(δ + step_size · r_t · g_t / ‖g_t‖)`` with ``g = ∂NLL/∂δ`` (the current model,
    adapter on), ``r_t`` the token's radius and ``Π`` the projection onto the ball (:func:`project_to_ball`),
    from a random start in the ball (:func:`random_in_ball`). Only ``δ`` receives gradients (the edit
    parameters' ``.grad`` are not touched).

    Args:
        forward: ``forward(inputs) -> outputs`` with ``.logits`` (e.g. ``Backbone.forward``).
        layer: the decoder layer whose input is perturbed.
        batch: from ``Backbone.build_batch`` (its ``labels`` mark the targets).
        radius: ``(B, T, 1)`` per-token radius, zero where nothing may move (``ε‖h_t‖`` at prompt positions).
        hidden_size: ``H``, the width of the hidden states entering ``layer``.
        steps: PGD steps (0: the random start).
        step_size: a step's length as a fraction of the token's radius.

    Returns:
        ``δ`` ``(B, T, H)``, detached, with ``‖δ_t‖ ≤ radius_t`` at every position (zero where it is zero).
    """
    inputs = model_inputs(batch)
    labels = batch["labels"]
    delta = random_in_ball(radius, hidden_size, generator=generator)
    for _ in range(steps):
        with torch.enable_grad():
            delta = delta.detach().requires_grad_(True)
            with perturbed_input(layer, delta):
                loss = nll_from_logits(forward(inputs).logits, labels)
            (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            grad = grad * (radius > 0)
            step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(_EPS)
            delta = project_to_ball(delta.detach() + step_size * radius * step, radius)
    return delta.detach()


def unit_matrix(anchor: torch.Tensor, others: torch.Tensor, *, symmetric: bool) -> torch.Tensor:
    """The RCSL matrix of one knowledge unit: ``[anchor; others]``, every row L2-normalised, float32.

    Args:
        anchor: ``(H,)`` the clean edit prompt's representation.
        others: ``(n, H)`` its LAR variants' and rephrases' representations.
        symmetric: ``False`` (asymmetric flow): the anchor enters as a constant (detached), so the penalty
            moves the other rows towards it; ``True``: gradient flows through the anchor too.
    """
    head = anchor if symmetric else anchor.detach()
    rows = torch.cat([head.reshape(1, -1), others.reshape(-1, head.shape[-1])]).float()
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def rcsl_penalty(matrix: torch.Tensor, rank: int = 1, norm: str = "ratio") -> torch.Tensor:
    """The RCSL penalty of a unit matrix ``(n, H)``: the singular values beyond the leading ``rank``.

    ``norm="ratio"``: ``Σ_{i>rank} σ_i / Σ_i σ_i`` (0 when the rows span at most ``rank`` directions);
    ``"sum"``: ``Σ_{i>rank} σ_i``. Differentiable (``torch.linalg.svdvals``).
    """
    if matrix.dim() != 2:
        raise ValueError(
            f"rcsl_penalty: expected a (members, hidden) matrix, got shape {tuple(matrix.shape)}"
        )
    if norm not in ("ratio", "sum"):
        raise ValueError(f"rcsl_penalty: norm must be 'ratio' or 'sum', got {norm!r}")
    sigma = torch.linalg.svdvals(matrix.float())
    tail = sigma[rank:].sum()
    if norm == "sum":
        return tail
    return tail / sigma.sum().clamp_min(_EPS)

"""IRM-TV: the total-variation (ℓ1) invariance penalty over environments.

A dummy classifier scale ω (= 1) multiplies the logits of every environment; ``g_e = dR_e/dω`` at
ω = 1 measures how much environment ``e`` would like the logits rescaled. An invariant predictor
has every ``g_e`` = 0. The TV-ℓ1 penalty is ``P = (Σ_e |g_e|)²``.

``g_e`` has a closed form per row (NLL: ``E_p[z] − z_y``; KL(p₀‖softmax(z)): ``E_p[z] − E_p₀[z]``),
returned by :func:`odedit_kernels.nll_with_omega` / :func:`odedit_kernels.kl_with_omega` as a tensor
differentiable w.r.t. the logits — so ``P`` backpropagates with one ordinary backward, no double
backward through ``autograd.grad(create_graph=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["irm_tv_penalty"]


def irm_tv_penalty(omega_grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``P = (Σ_e |g_e|)²`` over the environments' ω-derivatives.

    Args:
        omega_grads: environment name -> 0-dim tensor ``dR_e/dω`` at ω = 1 (differentiable).

    Returns:
        A 0-dim tensor, differentiable w.r.t. every ``g_e``.

    Raises:
        ValueError: no environment, or a ``g_e`` that is not a scalar.
    """
    if not omega_grads:
        raise ValueError("irm_tv_penalty: no environment given; the penalty needs at least one dR_e/domega")
    total = None
    for name, g in omega_grads.items():
        if not isinstance(g, torch.Tensor) or g.numel() != 1:
            raise ValueError(
                f"irm_tv_penalty: dR/domega of environment {name!r} must be a scalar tensor, got {g!r}"
            )
        term = g.reshape(()).abs()
        total = term if total is None else total + term
    return total * total

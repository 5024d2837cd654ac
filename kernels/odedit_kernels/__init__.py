"""Fused Triton kernels of odedit-hf, each with a pure-torch reference (importable on its own).

Public ops (``backend="auto"``: Triton for CUDA tensors, the pure-torch reference otherwise):

- :func:`rbf_mmd` — multi-scale Gaussian RBF MMD² between two point sets (scalar).
- :func:`logits_kl` — mean over rows of KL(softmax(pre) ‖ softmax(post)) (scalar).
- :func:`kl_with_omega` — per row KL and its IRM ω-derivative, both differentiable w.r.t. post.
- :func:`nll_with_omega` — per row NLL and its IRM ω-derivative, both differentiable w.r.t. logits.

Importing this package does not import Triton; it works with the torch backend when Triton is absent.
"""

from odedit_kernels._backend import BACKENDS, POISON_ENV, interpreter_enabled, triton_available
from odedit_kernels.kl import (
    kl_with_omega,
    kl_with_omega_reference,
    logits_kl,
    logits_kl_reference,
    nll_with_omega,
    nll_with_omega_reference,
)
from odedit_kernels.mmd import rbf_mmd, rbf_mmd_reference

__all__ = [
    "BACKENDS",
    "POISON_ENV",
    "interpreter_enabled",
    "kl_with_omega",
    "kl_with_omega_reference",
    "logits_kl",
    "logits_kl_reference",
    "nll_with_omega",
    "nll_with_omega_reference",
    "rbf_mmd",
    "rbf_mmd_reference",
    "triton_available",
]

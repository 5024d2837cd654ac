"""Logits → per-row KL / NLL and their IRM ω-derivatives, in one streaming pass over the vocabulary.

With ``z`` the post(-edit) logits of a row, ``a`` the pre(-edit) logits, ``p = softmax(z)``,
``p₀ = softmax(a)`` and ω a scale on the post logits only (the IRM dummy classifier, ω = 1):

    KL   = Σ_j p₀_j (log p₀_j − log p_j)          ∂KL/∂ω|₁  = E_p[z] − E_p₀[z]
    NLL  = logsumexp(z) − z_y                      ∂NLL/∂ω|₁ = E_p[z] − z_y

Gradients (checked against autograd of the reference in the tests):

    ∂KL/∂z_j          = p_j − p₀_j
    ∂(∂KL/∂ω)/∂z_j    = p_j (1 + z_j − E_p[z]) − p₀_j
    ∂NLL/∂z_j         = p_j − δ_jy
    ∂(∂NLL/∂ω)/∂z_j   = p_j (1 + z_j − E_p[z]) − δ_jy
    ∂KL/∂a_j          = p₀_j ((a_j − z_j) − E_p₀[a − z])
    ∂(∂KL/∂ω)/∂a_j    = −p₀_j (z_j − E_p₀[z])

so ODEdit's TV penalty (Σ_e |∂R_e/∂ω|)² needs no double backward: the ω-derivative is an ordinary
differentiable output. The Triton forward reads each row once (online softmax, no rows×V
probabilities) and keeps a few fp32 statistics per row; the backward reads the row once more and
writes the gradient, combining the grad_out of both outputs (loss and ω-derivative) in that one pass.
Why not write the gradient during the forward, as Liger's cross-entropy does: p_j needs the row's
final log-sum-exp, so that forward must read the row twice anyway (2 reads + 1 write, the same bytes
as here), and with two outputs per row it would have to store two rows×V gradients to combine the
two grad_outs later. Here the forward alone (evaluation, no grad) costs one read.

Layout (STYLE point 5): kernels and launchers live in ``_triton_kl.py`` (Triton is optional and not
imported with this module); this file holds the pure-torch references, the
``torch.autograd.Function`` classes and the public functions, in that order.

Masked vocabulary entries (logit ``-inf``) are allowed: they get probability 0 and contribute 0.
"""

from __future__ import annotations

import logging

import torch
from torch.autograd.function import once_differentiable

from odedit_kernels._backend import resolve_backend

logger = logging.getLogger(__name__)

__all__ = [
    "kl_with_omega",
    "kl_with_omega_reference",
    "logits_kl",
    "logits_kl_reference",
    "nll_with_omega",
    "nll_with_omega_reference",
]


def _check_logits(t: torch.Tensor, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1:
        raise ValueError(f"{op}: {name} must have a vocabulary dimension (..., V), got a 0-dim tensor")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be floating point logits, got {t.dtype}")
    if t.shape[-1] < 1:
        raise ValueError(f"{op}: {name} has an empty vocabulary dimension, shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} has no rows, shape {tuple(t.shape)}; pass at least one row")


def _check_pair(pre: torch.Tensor, post: torch.Tensor, op: str) -> None:
    _check_logits(pre, "pre", op)
    _check_logits(post, "post", op)
    if pre.shape != post.shape:
        raise ValueError(
            f"{op}: pre and post must have the same shape (..., V), got {tuple(pre.shape)} and {tuple(post.shape)}"
        )
    if pre.dtype != post.dtype:
        raise ValueError(
            f"{op}: pre and post must share a dtype, got {pre.dtype} and {post.dtype}; cast one of them"
        )
    if pre.device != post.device:
        raise ValueError(f"{op}: pre and post must be on one device, got {pre.device} and {post.device}")


def _check_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, op: str) -> None:
    _check_logits(logits, "logits", op)
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{op}: target must be a torch.Tensor of token ids, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: target must hold integer token ids (int64 or int32), got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{op}: target must have the leading shape of logits {tuple(logits.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(
            f"{op}: target and logits must be on one device, got {target.device} and {logits.device}"
        )
    if not isinstance(ignore_index, int):
        raise ValueError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    vocab = logits.shape[-1]
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = target[bad].flatten()[0].item()
        raise ValueError(
            f"{op}: target ids must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first} "
            f"({int(bad.sum())} bad entries)"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Pure-torch references (the CPU path and the ground truth of tests and benchmarks)
# ----------------------------------------------------------------------------------------------------


def _expect(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """E_p[z] per row, with 0·(−inf) read as 0 (masked vocabulary) and no NaN in the backward."""
    return (p * z.masked_fill(p == 0, 0.0)).sum(-1)


def kl_with_omega_reference(pre: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`kl_with_omega`: per row KL(softmax(pre) ‖ softmax(post)) and its ω-derivative."""
    _check_pair(pre, post, "kl_with_omega_reference")
    cdtype = _compute_dtype(post.dtype)
    a, z = pre.to(cdtype), post.to(cdtype)
    logp0 = torch.log_softmax(a, dim=-1)
    logp = torch.log_softmax(z, dim=-1)
    p0, p = logp0.exp(), logp.exp()
    kl = (p0 * (logp0 - logp).masked_fill(p0 == 0, 0.0)).sum(-1)
    domega = _expect(p, z) - _expect(p0, z)
    return kl, domega


def logits_kl_reference(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """Pure-torch :func:`logits_kl`: mean over rows of KL(softmax(pre) ‖ softmax(post))."""
    return kl_with_omega_reference(pre, post)[0].mean()


def nll_with_omega_reference(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`nll_with_omega`: per row NLL of ``target`` and its ω-derivative."""
    _check_target(logits, target, ignore_index, "nll_with_omega_reference")
    z = logits.to(_compute_dtype(logits.dtype))
    logp = torch.log_softmax(z, dim=-1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(-1)
    z_y = z.gather(-1, safe).squeeze(-1)
    nll = torch.where(valid, -logp.gather(-1, safe).squeeze(-1), 0.0)
    domega = torch.where(valid, _expect(logp.exp(), z) - z_y, 0.0)
    return nll, domega


# ----------------------------------------------------------------------------------------------------
# autograd.Functions over the Triton launchers
# ----------------------------------------------------------------------------------------------------


class KlWithOmegaFunction(torch.autograd.Function):
    """(pre, post) → (kl_rows, domega_rows) through the Triton kernels; inputs are (rows, V)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, post: torch.Tensor):
        from odedit_kernels import _triton_kl

        kl, domega, stats = _triton_kl.kl_forward(pre, post)
        ctx.save_for_backward(pre, post, stats)
        return kl, domega

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor, grad_omega: torch.Tensor):
        from odedit_kernels import _triton_kl

        pre, post, stats = ctx.saved_tensors
        d_pre, d_post = _triton_kl.kl_backward(
            pre,
            post,
            stats,
            grad_kl,
            grad_omega,
            need_pre=ctx.needs_input_grad[0],
            need_post=ctx.needs_input_grad[1],
        )
        return d_pre, d_post


class NllWithOmegaFunction(torch.autograd.Function):
    """(logits, target) → (nll_rows, domega_rows) through the Triton kernels; logits are (rows, V)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
        from odedit_kernels import _triton_kl

        nll, domega, stats = _triton_kl.nll_forward(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, stats)
        ctx.ignore_index = ignore_index
        return nll, domega

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: torch.Tensor, grad_omega: torch.Tensor):
        from odedit_kernels import _triton_kl

        logits, target, stats = ctx.saved_tensors
        d_logits = _triton_kl.nll_backward(logits, target, stats, grad_nll, grad_omega, ctx.ignore_index)
        return d_logits, None, None


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., V) → (R, V) or (B, T, V) with unit vocabulary stride, for the kernels' row addressing.

    Two leading dims with any strides (e.g. the shifted slice ``logits[:, :-1]``) are read in place;
    a copy is made only for a strided vocabulary axis or more than two leading dims that do not merge.
    """
    if t.dim() == 1:
        t = t.unsqueeze(0)
    elif t.dim() > 3:
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def kl_with_omega(
    pre: torch.Tensor, post: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row KL(softmax(pre) ‖ softmax(post)) and its IRM ω-derivative ``E_p[z] − E_p₀[z]`` at ω = 1.

    ω scales the post logits only. Both outputs are differentiable w.r.t. ``post`` (and ``pre``), so
    a penalty on the ω-derivative needs no double backward.

    Args:
        pre: ``(..., V)`` reference (pre-edit) logits, float32/float16/bfloat16 (float64 on torch).
        post: ``(..., V)`` post-edit logits, same shape, dtype and device as ``pre``.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``(kl, domega)``, each of shape ``(...)`` (the leading shape), float32 (float64 for float64
        inputs).

    Raises:
        ValueError: mismatched shapes/dtypes/devices, no rows, or an unusable backend.
    """
    _check_pair(pre, post, "kl_with_omega")
    if resolve_backend(backend, "kl_with_omega", pre, post) == "torch":
        return kl_with_omega_reference(pre, post)
    lead = tuple(post.shape[:-1])
    kl, domega = KlWithOmegaFunction.apply(_rows(pre), _rows(post))
    return kl.reshape(lead), domega.reshape(lead)


def logits_kl(pre: torch.Tensor, post: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Mean over rows of KL(softmax(pre) ‖ softmax(post)); a 0-dim float32 tensor (float64 for float64).

    Args and backends as :func:`kl_with_omega`: ``pre`` and ``post`` are ``(..., V)`` logits.
    """
    _check_pair(pre, post, "logits_kl")
    if resolve_backend(backend, "logits_kl", pre, post) == "torch":
        return logits_kl_reference(pre, post)
    return KlWithOmegaFunction.apply(_rows(pre), _rows(post))[0].mean()


def nll_with_omega(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row NLL of ``target`` under softmax(logits) and its IRM ω-derivative ``E_p[z] − z_y`` at ω = 1.

    Rows whose target equals ``ignore_index`` give 0 for both outputs and a zero gradient (the
    ``labels = -100`` convention of ``transformers``).

    Args:
        logits: ``(..., V)`` logits, float32/float16/bfloat16 (float64 on the torch backend).
        target: ``(...)`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value of rows to skip.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``(nll, domega)``, each of shape ``(...)``, float32 (float64 for float64 logits), both
        differentiable w.r.t. ``logits``.

    Raises:
        ValueError: bad shapes, dtypes, devices, target ids out of range, or an unusable backend.
    """
    _check_target(logits, target, ignore_index, "nll_with_omega")
    if resolve_backend(backend, "nll_with_omega", logits) == "torch":
        return nll_with_omega_reference(logits, target, ignore_index=ignore_index)
    lead = tuple(logits.shape[:-1])
    nll, domega = NllWithOmegaFunction.apply(_rows(logits), target.reshape(-1).contiguous(), ignore_index)
    return nll.reshape(lead), domega.reshape(lead)

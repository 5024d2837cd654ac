"""Multi-scale Gaussian RBF MMD² between two point sets, forward and backward.

    k(a, b) = Σ_q exp(−‖a − b‖² / (2 σ_q²))
    MMD²_b  = 1/n² Σ_ij k(x_i, x_j) + 1/m² Σ_ij k(y_i, y_j) − 2/(nm) Σ_ij k(x_i, y_j)      (biased, V-statistic)
    MMD²_u  = same with the diagonals i = j of XX and YY left out and 1/(n(n−1)), 1/(m(m−1))  (unbiased)

Layout of the op (STYLE point 5): the Triton kernels and their launchers live in ``_triton_mmd.py``
because Triton is an optional dependency that must not be imported with this module (``import
odedit_kernels`` works without it); this file holds the pure-torch reference, the
``torch.autograd.Function`` and the public function, in that order.

The bandwidths are constants: no gradient flows to ``sigmas`` (pick them, e.g. as multiples of the
median pairwise distance, under ``torch.no_grad()``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from odedit_kernels._backend import resolve_backend

logger = logging.getLogger(__name__)

__all__ = ["rbf_mmd", "rbf_mmd_reference"]

SigmasLike = float | Sequence[float] | torch.Tensor


def _check_sigmas(sigmas: SigmasLike, op: str) -> tuple[float, ...]:
    if isinstance(sigmas, torch.Tensor):
        values = tuple(float(v) for v in sigmas.detach().flatten().tolist())
    elif isinstance(sigmas, (int, float)):
        values = (float(sigmas),)
    else:
        try:
            values = tuple(float(v) for v in sigmas)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{op}: sigmas must be a float, a sequence of floats or a tensor, got {sigmas!r}"
            ) from err
    if not values:
        raise ValueError(f"{op}: sigmas is empty; pass at least one bandwidth")
    bad = [v for v in values if not (math.isfinite(v) and v > 0.0)]
    if bad:
        raise ValueError(f"{op}: every bandwidth must be finite and > 0, got {bad} in sigmas={values}")
    return values


def _check_inputs(
    x: torch.Tensor, y: torch.Tensor, sigmas: SigmasLike, unbiased: bool, op: str
) -> tuple[float, ...]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (points × features), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
    n, d = x.shape
    m, dy = y.shape
    if d != dy:
        raise ValueError(
            f"{op}: x and y must have the same feature size, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if d < 1 or n < 1 or m < 1:
        raise ValueError(
            f"{op}: need at least one point and one feature, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise ValueError(f"{op}: x and y must share a dtype, got {x.dtype} and {y.dtype}; cast one of them")
    if x.device != y.device:
        raise ValueError(f"{op}: x and y must be on one device, got {x.device} and {y.device}")
    if not isinstance(unbiased, bool):
        raise ValueError(f"{op}: unbiased must be a bool, got {unbiased!r}")
    if unbiased and (n < 2 or m < 2):
        raise ValueError(
            f"{op}: the unbiased estimate needs at least two points in each set, got n={n}, m={m}; "
            "use unbiased=False (the V-statistic) for single points"
        )
    return _check_sigmas(sigmas, op)


def _weights(n: int, m: int, unbiased: bool) -> tuple[float, float, float]:
    """Scalar weights of the XX, YY and XY kernel sums."""
    if unbiased:
        return 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1)), -2.0 / (n * m)
    return 1.0 / (n * n), 1.0 / (m * m), -2.0 / (n * m)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Pure-torch reference (the CPU path and the ground truth of tests and benchmarks)
# ----------------------------------------------------------------------------------------------------


def rbf_mmd_reference(
    x: torch.Tensor, y: torch.Tensor, sigmas: SigmasLike, *, unbiased: bool = False
) -> torch.Tensor:
    """Pure-torch multi-scale RBF MMD²; same arguments and result as :func:`rbf_mmd`.

    Materialises the n×n, m×m and n×m kernel matrices (times the number of bandwidths), so it is meant
    for the small sets of an edit, tests and benchmarks; the Triton path never holds them.
    """
    values = _check_inputs(x, y, sigmas, unbiased, "rbf_mmd_reference")
    n, m = x.shape[0], y.shape[0]
    cdtype = _compute_dtype(x.dtype)
    xf, yf = x.to(cdtype), y.to(cdtype)
    neg_inv = torch.tensor([-0.5 / (s * s) for s in values], dtype=cdtype, device=x.device)
    wxx, wyy, wxy = _weights(n, m, unbiased)

    def kernel_sum(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
        # ‖a−b‖² = ‖a‖² + ‖b‖² − 2 a·b, the same expansion as the kernel (one matmul, no n×m×d tensor).
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        d2 = d2.clamp_min(0.0)
        k = torch.exp(d2[:, :, None] * neg_inv).sum(-1)
        if same:
            eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
            # The diagonal is exactly k(a, a) = Q (d2 = 0), or left out for the unbiased estimate.
            k = k.masked_fill(eye, 0.0 if unbiased else float(len(values)))
        return k.sum()

    return wxx * kernel_sum(xf, xf, True) + wyy * kernel_sum(yf, yf, True) + wxy * kernel_sum(xf, yf, False)


# ----------------------------------------------------------------------------------------------------
# autograd.Function over the Triton launchers
# ----------------------------------------------------------------------------------------------------


class RbfMmdFunction(torch.autograd.Function):
    """MMD² through the Triton kernels; backward gives the gradients w.r.t. ``x`` and ``y``."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, y: torch.Tensor, sigmas: tuple[float, ...], unbiased: bool
    ) -> torch.Tensor:
        from odedit_kernels import _triton_mmd

        x = x.contiguous()
        y = y.contiguous()
        out = _triton_mmd.mmd_forward(x, y, sigmas, unbiased)
        ctx.save_for_backward(x, y)
        ctx.sigmas = sigmas
        ctx.unbiased = unbiased
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        from odedit_kernels import _triton_mmd

        x, y = ctx.saved_tensors
        gx, gy = _triton_mmd.mmd_backward(
            x,
            y,
            ctx.sigmas,
            ctx.unbiased,
            grad_out,
            need_x=ctx.needs_input_grad[0],
            need_y=ctx.needs_input_grad[1],
        )
        return gx, gy, None, None


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def rbf_mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas: SigmasLike,
    *,
    unbiased: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale Gaussian RBF MMD² between the rows of ``x`` and the rows of ``y``.

    ``k(a, b) = Σ_q exp(−‖a − b‖² / (2 σ_q²))``; the result is the sum over bandwidths of MMD²
    (biased V-statistic by default). The Triton path tiles XX, YY and XY with ``tl.dot`` in fp32,
    evaluates all bandwidths in one pass over each tile and never holds an n×m matrix: memory is
    O((n + m)·d).

    Args:
        x: ``(n, d)`` points, float32/float16/bfloat16 (float64 on the torch backend), n >= 1.
        y: ``(m, d)`` points, same dtype and device as ``x``, m >= 1.
        sigmas: bandwidths σ_q > 0 (a float, a sequence or a tensor); treated as constants.
        unbiased: leave out the i = j terms of XX and YY (needs n >= 2 and m >= 2).
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs), differentiable w.r.t. ``x`` and ``y``
        (gradients in the inputs' dtype).

    Raises:
        ValueError: bad shapes, dtypes, devices, bandwidths or backend.
    """
    values = _check_inputs(x, y, sigmas, unbiased, "rbf_mmd")
    if resolve_backend(backend, "rbf_mmd", x, y) == "torch":
        return rbf_mmd_reference(x, y, values, unbiased=unbiased)
    if max(x.shape[0], y.shape[0]) * x.shape[1] >= 2**31:
        raise ValueError(
            f"rbf_mmd: the Triton kernels index with int32 and need max(n, m)·d < 2^31, got x {tuple(x.shape)} "
            f"and y {tuple(y.shape)}; use backend='torch' or split the sets"
        )
    if len(values) > 64:
        raise ValueError(
            f"rbf_mmd: the Triton kernels unroll the bandwidth loop: at most 64 sigmas, got {len(values)}"
        )
    return RbfMmdFunction.apply(x, y, values, unbiased)

"""rbf_mmd: the pure-torch reference against an independent formulation and gradcheck, then the Triton
kernels (interpreter on CPU) against the reference, forward and both gradients, on awkward shapes with
NaN-poisoned outputs (fixture in conftest.py)."""

from __future__ import annotations

import pytest
import torch

from odedit_kernels import rbf_mmd, rbf_mmd_reference, triton_available

needs_triton_package = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# Tolerances per dtype, relative to the largest reference magnitude.
TOL = {
    # fp32: same math, different summation order (tiles, fp64 partial sum) -> a few ulps of the sum.
    torch.float32: 2e-5,
    # fp16/bf16 (GPU only): inputs are the same rounded values; the backward's G@B runs with G rounded
    # to the input dtype (8 or 11 bits), so gradients differ by ~2^-8 relative.
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def _independent_mmd(x: torch.Tensor, y: torch.Tensor, sigmas: list[float], unbiased: bool) -> torch.Tensor:
    """Explicit kernel matrices from torch.cdist (no Gram trick), float64."""
    x, y = x.double(), y.double()

    def kmat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        return sum(torch.exp(-d2 / (2 * s * s)) for s in sigmas)

    kxx, kyy, kxy = kmat(x, x), kmat(y, y), kmat(x, y)
    n, m = x.shape[0], y.shape[0]
    if unbiased:
        sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        return sxx + syy - 2 * kxy.mean()
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def _points(n: int, m: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 1.3 * torch.randn(m, d, generator=g, dtype=torch.float64) + 0.2  # a different distribution
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _sigmas(d: int) -> list[float]:
    # Multiples of the typical distance sqrt(2d) so that every bandwidth contributes.
    base = (2.0 * d) ** 0.5
    return [0.5 * base, base, 2.0 * base]


# ---------------------------------------------------------------- reference ----------------------


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize(("n", "m", "d"), [(2, 3, 5), (7, 4, 63), (3, 3, 1)])
def test_reference_matches_explicit_kernel_matrices(n, m, d, unbiased):
    x, y = _points(n, m, d, torch.float64, torch.device("cpu"), seed=n * 100 + m)
    sig = _sigmas(d)
    got = rbf_mmd_reference(x, y, sig, unbiased=unbiased)
    torch.testing.assert_close(got, _independent_mmd(x, y, sig, unbiased), rtol=1e-10, atol=1e-12)


def test_reference_biased_mmd_of_a_set_with_itself_is_zero():
    x, _ = _points(6, 1, 9, torch.float64, torch.device("cpu"), seed=1)
    assert abs(rbf_mmd_reference(x, x.clone(), [1.0, 3.0]).item()) < 1e-12


@pytest.mark.parametrize("unbiased", [False, True])
def test_reference_gradcheck_float64(unbiased):
    x, y = _points(3, 4, 5, torch.float64, torch.device("cpu"), seed=7)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: rbf_mmd_reference(a, b, [1.5, 4.0], unbiased=unbiased), (x, y)
    )


# ---------------------------------------------------------------- Triton kernels -----------------


def _check_against_reference(x, y, sig, unbiased, tol):
    xr = x.detach().clone().requires_grad_()
    yr = y.detach().clone().requires_grad_()
    xt = x.detach().clone().requires_grad_()
    yt = y.detach().clone().requires_grad_()
    ref = rbf_mmd_reference(xr, yr, sig, unbiased=unbiased)
    out = rbf_mmd(xt, yt, sig, unbiased=unbiased, backend="triton")
    assert out.shape == () and out.dtype == torch.float32
    scale = 1.7  # a grad_out other than 1 checks that the backward uses it
    (ref * scale).backward()
    (out * scale).backward()
    for name, got, want in (("mmd", out, ref), ("grad_x", xt.grad, xr.grad), ("grad_y", yt.grad, yr.grad)):
        assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten NaN-poisoned element?)"
        assert got.dtype == (torch.float32 if name == "mmd" else x.dtype), f"{name}: dtype {got.dtype}"
        err = (got.float() - want.float()).abs().max().item()
        bound = tol * want.float().abs().max().item() + 1e-7
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize(
    ("n", "m", "d", "unbiased"),
    [
        (1, 3, 63, False),  # the awkward shape of the issue: one point, d not a power of two
        (40, 70, 63, True),  # several tiles (interpreter blocks are 32): triangular walk, partial tiles
        (5, 33, 130, False),  # d spans three K chunks
        (2, 2, 1, True),  # d = 1, smallest unbiased case
    ],
)
def test_triton_matches_reference_fp32(device, n, m, d, unbiased):
    x, y = _points(n, m, d, torch.float32, device, seed=n + m + d)
    _check_against_reference(x, y, _sigmas(d), unbiased, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_half_precision_on_gpu(device, dtype):
    if device.type != "cuda":
        pytest.skip("fp16/bf16 kernels are checked on a GPU only (the interpreter runs fp32 tests)")
    x, y = _points(300, 200, 257, dtype, device, seed=3)
    _check_against_reference(x, y, _sigmas(257), False, TOL[dtype])


def test_triton_gradient_of_one_input_only(device):
    x, y = _points(4, 9, 20, torch.float32, device, seed=11)
    x.requires_grad_()
    rbf_mmd(x, y, [2.0, 5.0], backend="triton").backward()
    xr = x.detach().clone().requires_grad_()
    rbf_mmd_reference(xr, y, [2.0, 5.0]).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-7)


def test_triton_backward_with_column_splits(device):
    """Several programs per row block: the per-split accumulators are reduced outside the kernel."""
    from odedit_kernels import _triton_mmd

    x, y = _points(40, 70, 63, torch.float32, device, seed=5)
    sig = tuple(_sigmas(63))
    g = torch.tensor(0.8, device=device)
    gx2, gy2 = _triton_mmd.mmd_backward(x, y, sig, False, g, splits=2)
    xr = x.clone().requires_grad_()
    yr = y.clone().requires_grad_()
    (0.8 * rbf_mmd_reference(xr, yr, sig)).backward()
    torch.testing.assert_close(gx2, xr.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(gy2, yr.grad, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- input checks -------------------


@pytest.mark.parametrize(
    ("x", "y", "sigmas", "kwargs", "match"),
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), [1.0], {}, "same feature size"),
        (torch.zeros(3), torch.zeros(3, 5), [1.0], {}, "must be 2-D"),
        (torch.zeros(3, 4), torch.zeros(2, 4, dtype=torch.float64), [1.0], {}, "share a dtype"),
        (torch.zeros(1, 4), torch.zeros(2, 4), [1.0], {"unbiased": True}, "at least two points"),
        (torch.zeros(0, 4), torch.zeros(2, 4), [1.0], {}, "at least one point"),
        (torch.zeros(2, 4), torch.zeros(2, 4), [], {}, "sigmas is empty"),
        (torch.zeros(2, 4), torch.zeros(2, 4), [1.0, -2.0], {}, "finite and > 0"),
        (torch.zeros(2, 4), torch.zeros(2, 4), [1.0], {"backend": "cuda"}, "backend must be one of"),
        (
            torch.zeros(2, 4, dtype=torch.int64),
            torch.zeros(2, 4, dtype=torch.int64),
            [1.0],
            {},
            "floating point",
        ),
    ],
)
def test_bad_inputs_raise_value_error(x, y, sigmas, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rbf_mmd(x, y, sigmas, **kwargs)


def test_sigmas_as_float_and_tensor_agree():
    x, y = _points(3, 4, 6, torch.float32, torch.device("cpu"), seed=2)
    a = rbf_mmd(x, y, 2.0, backend="torch")
    b = rbf_mmd(x, y, torch.tensor([2.0]), backend="torch")
    assert a.item() == b.item()


@needs_triton_package
def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rbf_mmd(torch.zeros(2, 3), torch.ones(2, 3), [1.0], backend="triton")


@needs_triton_package
def test_float64_triton_raises_and_auto_uses_torch():
    x, y = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        rbf_mmd(x, y, [1.0], backend="triton")
    assert rbf_mmd(x, y, [1.0]).dtype == torch.float64

"""logits_kl / kl_with_omega / nll_with_omega: the references against independent formulations
(F.kl_div, F.cross_entropy, autograd through an explicit ω) and gradcheck, the closed-form gradients
of the module docstring against autograd, then the Triton kernels (interpreter on CPU) against the
references, forward and every gradient, with NaN-poisoned outputs (fixture in conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from odedit_kernels import (
    kl_with_omega,
    kl_with_omega_reference,
    logits_kl,
    logits_kl_reference,
    nll_with_omega,
    nll_with_omega_reference,
    triton_available,
)

needs_triton_package = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# Tolerances per dtype, relative to the largest reference magnitude.
TOL = {
    # fp32: online softmax vs two-pass log_softmax -> a few ulps of the log-sum-exp (|lse| ~ 10).
    torch.float32: 1e-5,
    # bf16/fp16 (GPU only): same rounded inputs, fp32 math in both; gradients are rounded to the
    # input dtype on store (8 / 11 bits).
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def _logits(shape: tuple[int, ...], seed: int, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pre = 2.0 * torch.randn(*shape, generator=g, dtype=torch.float64)
    post = pre + torch.randn(*shape, generator=g, dtype=torch.float64)  # an edit moves the logits
    return pre.to(device=device, dtype=dtype), post.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- references ---------------------


def test_kl_reference_matches_kl_div_and_explicit_omega():
    pre, post = _logits((4, 37), seed=0)
    kl, domega = kl_with_omega_reference(pre, post)
    want = F.kl_div(F.log_softmax(post, -1), F.log_softmax(pre, -1), log_target=True, reduction="none").sum(
        -1
    )
    torch.testing.assert_close(kl, want, rtol=1e-10, atol=1e-12)
    # ω scales the post logits only; differentiate KL(p_pre || softmax(ω z)) at ω = 1, one ω per row.
    omega = torch.ones(4, 1, dtype=torch.float64, requires_grad=True)
    kl_omega = F.kl_div(
        F.log_softmax(omega * post, -1), F.log_softmax(pre, -1), log_target=True, reduction="none"
    )
    (want_domega,) = torch.autograd.grad(kl_omega.sum(), omega)
    torch.testing.assert_close(domega, want_domega.squeeze(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits_kl_reference(pre, post), want.mean(), rtol=1e-10, atol=1e-12)


def test_nll_reference_matches_cross_entropy_and_explicit_omega():
    _, z = _logits((5, 23), seed=1)
    target = torch.tensor([3, -100, 0, 22, 7])
    nll, domega = nll_with_omega_reference(z, target)
    torch.testing.assert_close(nll, F.cross_entropy(z, target, reduction="none"), rtol=1e-10, atol=1e-12)
    omega = torch.ones(5, 1, dtype=torch.float64, requires_grad=True)
    ce = F.cross_entropy(omega * z, target, reduction="none")
    (want_domega,) = torch.autograd.grad(ce.sum(), omega)
    torch.testing.assert_close(domega, want_domega.squeeze(1), rtol=1e-10, atol=1e-12)


def test_references_gradcheck_float64():
    pre, post = _logits((2, 6), seed=2)
    pre.requires_grad_()
    post.requires_grad_()
    assert torch.autograd.gradcheck(kl_with_omega_reference, (pre, post))
    target = torch.tensor([1, 5])
    assert torch.autograd.gradcheck(lambda z: nll_with_omega_reference(z, target), (post,))


def test_closed_form_gradients_of_the_module_docstring():
    """The formulas the kernels implement, against autograd of the reference (float64)."""
    pre, post = _logits((3, 11), seed=3)
    post.requires_grad_()
    target = torch.tensor([0, 4, 10])
    p = torch.softmax(post.detach(), -1)
    p0 = torch.softmax(pre, -1)
    ez = (p * post.detach()).sum(-1, keepdim=True)
    onehot = F.one_hot(target, 11).double()
    kl, om = kl_with_omega_reference(pre, post)
    nll, om_nll = nll_with_omega_reference(post, target)
    cases = [
        (kl, p - p0),
        (om, p * (1 + post.detach() - ez) - p0),  # the −p0 term: E_p0[z] depends on z too
        (nll, p - onehot),
        (om_nll, p * (1 + post.detach() - ez) - onehot),
    ]
    for out, formula in cases:
        (grad,) = torch.autograd.grad(out.sum(), post, retain_graph=True)
        torch.testing.assert_close(grad, formula, rtol=1e-10, atol=1e-12)
    # and w.r.t. the pre logits a (the kernels' d_pre)
    a = pre.clone().requires_grad_()
    kl, om = kl_with_omega_reference(a, post.detach())
    z = post.detach()
    e0 = lambda v: (p0 * v).sum(-1, keepdim=True)  # noqa: E731
    (grad_kl,) = torch.autograd.grad(kl.sum(), a, retain_graph=True)
    torch.testing.assert_close(grad_kl, p0 * ((pre - z) - e0(pre - z)), rtol=1e-10, atol=1e-12)
    (grad_om,) = torch.autograd.grad(om.sum(), a)
    torch.testing.assert_close(grad_om, -p0 * (z - e0(z)), rtol=1e-10, atol=1e-12)


def test_references_accept_masked_vocabulary():
    pre, post = _logits((2, 9), seed=4)
    pre[:, 5:] = float("-inf")  # p_pre = 0 there: contributes nothing, no NaN
    post.requires_grad_()
    kl, om = kl_with_omega_reference(pre, post)
    (kl.sum() + om.sum()).backward()
    assert torch.isfinite(kl).all() and torch.isfinite(om).all() and torch.isfinite(post.grad).all()
    # the same as the KL sum over the unmasked entries only, with post's full log-normaliser
    logp = F.log_softmax(post.detach(), -1)[:, :5]
    p0 = torch.softmax(pre[:, :5], -1)
    torch.testing.assert_close(kl.detach(), (p0 * (p0.log() - logp)).sum(-1), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- Triton kernels -----------------


def _max_err_check(name, got, want, tol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten NaN-poisoned element?)"
    err = (got.double() - want.double()).abs().max().item()
    bound = tol * max(want.double().abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _run_kl(fn, pre, post, g_kl, g_om, **kw):
    pre = pre.detach().clone().requires_grad_()
    post = post.detach().clone().requires_grad_()
    kl, om = fn(pre, post, **kw)
    ((kl * g_kl).sum() + (om * g_om).sum()).backward()
    return kl, om, pre.grad, post.grad


@pytest.mark.parametrize(
    "shape",
    [
        (5, 1023),  # the awkward shape of the issue: V one below a power of two, one block
        (3, 2500),  # three vocabulary blocks in the interpreter (BLOCK_V = 1024): online rescaling
        (2, 3, 7),  # leading batch × time dimensions
        (1, 1),  # a single logit
    ],
)
def test_kl_with_omega_triton_matches_reference_fp32(device, shape):
    pre, post = _logits(shape, seed=sum(shape), dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(9)
    g_kl = torch.randn(shape[:-1], generator=g).to(device)
    g_om = torch.randn(shape[:-1], generator=g).to(device)  # both grad_outs in the one backward pass
    got = _run_kl(kl_with_omega, pre, post, g_kl, g_om, backend="triton")
    want = _run_kl(kl_with_omega_reference, pre, post, g_kl, g_om)
    for name, a, b in zip(("kl", "domega", "grad_pre", "grad_post"), got, want):
        assert a.shape == b.shape, name
        _max_err_check(name, a, b, TOL[torch.float32])


def test_logits_kl_triton_matches_reference_fp32(device):
    pre, post = _logits((6, 1023), seed=12, dtype=torch.float32, device=device)
    post_t = post.clone().requires_grad_()
    post_r = post.clone().requires_grad_()
    out = logits_kl(pre, post_t, backend="triton")
    ref = logits_kl_reference(pre, post_r)
    assert out.shape == () and out.dtype == torch.float32
    out.backward()
    ref.backward()
    _max_err_check("logits_kl", out, ref, TOL[torch.float32])
    _max_err_check("grad_post", post_t.grad, post_r.grad, TOL[torch.float32])


def test_kl_triton_masked_pre_vocabulary(device):
    pre, post = _logits((3, 300), seed=13, dtype=torch.float32, device=device)
    pre[:, 100:] = float("-inf")
    g1 = torch.ones(3, device=device)
    got = _run_kl(kl_with_omega, pre, post, g1, g1, backend="triton")
    want = _run_kl(kl_with_omega_reference, pre, post, g1, g1)
    for name, a, b in zip(("kl", "domega", "grad_pre", "grad_post"), got, want):
        _max_err_check(name, a, b, TOL[torch.float32])


def _run_nll(fn, z, target, g_nll, g_om, **kw):
    z = z.detach().clone().requires_grad_()
    nll, om = fn(z, target, **kw)
    ((nll * g_nll).sum() + (om * g_om).sum()).backward()
    return nll, om, z.grad


@pytest.mark.parametrize(
    ("shape", "target_dtype"),
    [((5, 1023), torch.int64), ((3, 2500), torch.int32), ((2, 3, 7), torch.int64), ((1, 1), torch.int64)],
)
def test_nll_with_omega_triton_matches_reference_fp32(device, shape, target_dtype):
    _, z = _logits(shape, seed=sum(shape) + 1, dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(10)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if target.numel() > 1:
        target.view(-1)[1] = -100  # an ignored row: zero outputs, zero gradient, no vocabulary pass
    target = target.to(device=device, dtype=target_dtype)
    g_nll = torch.randn(shape[:-1], generator=g).to(device)
    g_om = torch.randn(shape[:-1], generator=g).to(device)
    got = _run_nll(nll_with_omega, z, target, g_nll, g_om, backend="triton")
    want = _run_nll(nll_with_omega_reference, z, target, g_nll, g_om)
    for name, a, b in zip(("nll", "domega", "grad_logits"), got, want):
        assert a.shape == b.shape, name
        _max_err_check(name, a, b, TOL[torch.float32])
    if target.numel() > 1:
        assert got[0].view(-1)[1].item() == 0.0 and got[1].view(-1)[1].item() == 0.0
        assert got[2].reshape(-1, shape[-1])[1].abs().max().item() == 0.0


def test_nll_triton_masked_logits(device):
    _, z = _logits((4, 300), seed=14, dtype=torch.float32, device=device)
    z[:, 200:] = float("-inf")
    target = torch.tensor([0, 50, 150, 199], device=device)
    ones = torch.ones(4, device=device)
    got = _run_nll(nll_with_omega, z, target, ones, ones, backend="triton")
    want = _run_nll(nll_with_omega_reference, z, target, ones, ones)
    for name, a, b in zip(("nll", "domega", "grad_logits"), got, want):
        _max_err_check(name, a, b, TOL[torch.float32])


def test_triton_reads_sliced_logits_in_place(device):
    """(B, T, V) slices such as logits[:, :-1] (non-uniform row strides) and a 4-D batch."""
    pre_full, post_full = _logits((2, 4, 300), seed=16, dtype=torch.float32, device=device)
    pre, post = pre_full[:, 1:], post_full[:, :-1]  # different strides for pre and post
    g = torch.Generator().manual_seed(17)
    g_kl, g_om = torch.randn(2, 3, generator=g).to(device), torch.randn(2, 3, generator=g).to(device)
    got = _run_kl(kl_with_omega, pre, post, g_kl, g_om, backend="triton")
    want = _run_kl(kl_with_omega_reference, pre, post, g_kl, g_om)
    for name, a, b in zip(("kl", "domega", "grad_pre", "grad_post"), got, want):
        assert a.shape == b.shape, name
        _max_err_check(name, a, b, TOL[torch.float32])
    target = torch.randint(0, 300, (2, 3), generator=g).to(device)
    got = _run_nll(nll_with_omega, post, target, g_kl, g_om, backend="triton")
    want = _run_nll(nll_with_omega_reference, post, target, g_kl, g_om)
    for name, a, b in zip(("nll", "domega", "grad_logits"), got, want):
        _max_err_check(name, a, b, TOL[torch.float32])
    z4 = post_full.reshape(2, 2, 2, 300)
    t4 = torch.randint(0, 300, (2, 2, 2), generator=g).to(device)
    ones = torch.ones(2, 2, 2, device=device)
    got = _run_nll(nll_with_omega, z4, t4, ones, ones, backend="triton")
    want = _run_nll(nll_with_omega_reference, z4, t4, ones, ones)
    for name, a, b in zip(("nll", "domega", "grad_logits"), got, want):
        assert a.shape == b.shape, name
        _max_err_check(name, a, b, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_on_gpu(device, dtype):
    if device.type != "cuda":
        pytest.skip("fp16/bf16 kernels are checked on a GPU only (the interpreter runs fp32 tests)")
    pre, post = _logits((64, 32001), seed=15, dtype=dtype, device=device)
    ones = torch.ones(64, device=device)
    got = _run_kl(kl_with_omega, pre, post, ones, ones, backend="triton")
    want = _run_kl(kl_with_omega_reference, pre, post, ones, ones)
    for name, a, b in zip(("kl", "domega", "grad_pre", "grad_post"), got, want):
        _max_err_check(name, a, b, TOL[dtype])


# ---------------------------------------------------------------- input checks -------------------


@pytest.mark.parametrize(
    ("pre", "post", "match"),
    [
        (torch.zeros(2, 5), torch.zeros(2, 6), "same shape"),
        (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.float64), "share a dtype"),
        (torch.zeros(0, 5), torch.zeros(0, 5), "no rows"),
        (torch.zeros(2, 0), torch.zeros(2, 0), "empty vocabulary"),
        (torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64), "floating point"),
    ],
)
def test_kl_bad_inputs_raise_value_error(pre, post, match):
    with pytest.raises(ValueError, match=match):
        kl_with_omega(pre, post)
    with pytest.raises(ValueError, match=match):
        logits_kl(pre, post)


@pytest.mark.parametrize(
    ("target", "kwargs", "match"),
    [
        (torch.tensor([0, 5]), {}, r"lie in \[0, 5\)"),
        (torch.tensor([0, -1]), {}, r"lie in \[0, 5\)"),
        (torch.tensor([0, 1, 2]), {}, "leading shape"),
        (torch.tensor([0.0, 1.0]), {}, "integer token ids"),
        (torch.tensor([0, 1]), {"backend": "gpu"}, "backend must be one of"),
    ],
)
def test_nll_bad_inputs_raise_value_error(target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nll_with_omega(torch.zeros(2, 5), target, **kwargs)


@needs_triton_package
def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kl_with_omega(torch.zeros(2, 3), torch.ones(2, 3), backend="triton")

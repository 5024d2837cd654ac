"""ODEdit's risk terms and the IRM-TV penalty against hand-computed values and autograd."""

from __future__ import annotations

import math

import pytest
import torch

from odedit_hf.methods.odedit.penalty import irm_tv_penalty
from odedit_hf.methods.odedit.risks import (
    answer_rows,
    gen_samples,
    generality_risk,
    locality_risk,
    locality_rows,
    median_bandwidths,
    reliability_risk,
)

BACKENDS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py)


def _softmax_list(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reliability_risk_matches_hand_computed_nll(backend: str) -> None:
    # batch of 1, T = 4, V = 3; target tokens at positions 2 and 3 (predicted by logits at 1 and 2)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 2, 0]])
    r_rel, g = reliability_risk(logits, labels, backend=backend)
    p1, p2 = _softmax_list([1.0, 2.0, 3.0]), _softmax_list([0.5, -1.0, 2.0])
    nll = (-math.log(p1[2]) - math.log(p2[0])) / 2
    # dNLL/domega at omega = 1 per row: E_p[z] - z_y
    d1 = sum(p * z for p, z in zip(p1, [1.0, 2.0, 3.0])) - 3.0
    d2 = sum(p * z for p, z in zip(p2, [0.5, -1.0, 2.0])) - 0.5
    assert float(r_rel) == pytest.approx(nll, rel=1e-5)
    assert float(g) == pytest.approx((d1 + d2) / 2, rel=1e-5, abs=1e-6)


def test_reliability_risk_equals_the_plain_editors_loss() -> None:
    from odedit_hf.editing import nll_from_logits

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.full((3, 7), -100)
    labels[0, 4:6] = torch.tensor([1, 2])
    labels[1, 6] = 5
    labels[2, 2:7] = torch.tensor([3, 3, 0, 10, 9])
    r_rel, _ = reliability_risk(logits, labels, backend="torch")
    assert torch.allclose(r_rel, nll_from_logits(logits, labels), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_locality_risk_matches_hand_computed_kl(backend: str) -> None:
    pre = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    post = torch.tensor([[1.0, 1.0, 0.0], [3.0, -2.0, 0.5]])
    r_loc, g = locality_risk(pre, post, backend=backend)
    kls, ds = [], []
    for a, z in zip(pre.tolist(), post.tolist()):
        p0, p = _softmax_list(a), _softmax_list(z)
        kls.append(sum(x * (math.log(x) - math.log(y)) for x, y in zip(p0, p)))
        # dKL(p0 || softmax(omega z))/domega at 1: E_p[z] - E_p0[z]
        ds.append(sum(x * v for x, v in zip(p, z)) - sum(x * v for x, v in zip(p0, z)))
    assert float(r_loc) == pytest.approx(sum(kls) / 2, rel=1e-5)
    assert float(g) == pytest.approx(sum(ds) / 2, rel=1e-5)
    # no change, no risk and no omega-gradient
    same, g0 = locality_risk(post, post, backend=backend)
    assert abs(float(same)) < 1e-6 and abs(float(g0)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_generality_risk_matches_hand_computed_mmd(backend: str) -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 2.0]])
    sigmas = (1.0, 2.0)

    def k(a: list[float], b: list[float]) -> float:
        d2 = sum((u - v) ** 2 for u, v in zip(a, b))
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    xs, ys = x.tolist(), y.tolist()
    kxx = sum(k(a, b) for a in xs for b in xs) / 4
    kyy = k(ys[0], ys[0])
    kxy = sum(k(a, ys[0]) for a in xs) / 2
    expected = kxx + kyy - 2 * kxy
    value = generality_risk([(x, y, sigmas)], backend=backend)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    # mean over pairs
    two = generality_risk([(x, y, sigmas), (x, x, sigmas)], backend=backend)
    assert float(two) == pytest.approx(expected / 2, rel=1e-5, abs=1e-6)


def test_gen_samples_take_the_positions_that_predict_the_target() -> None:
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, -100, 4, -100, -100]])
    answer = gen_samples(hidden, labels, "answer")
    # row 0: targets at 3, 4 -> states at 2, 3; row 1: target at 2 -> state at 1
    assert answer[0].flatten().tolist() == [2.0, 3.0]
    assert answer[1].flatten().tolist() == [6.0]
    last = gen_samples(hidden, labels, "last_prompt")
    assert [t.flatten().tolist() for t in last] == [[2.0], [6.0]]


def test_median_bandwidths_and_fallbacks() -> None:
    pts = [torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 8.0]])]
    # pairwise distances: 5, 8, 5 -> median 5
    assert median_bandwidths(pts, (0.5, 1.0, 2.0)) == pytest.approx((2.5, 5.0, 10.0))
    same = [torch.ones(2, 3)]
    sig = median_bandwidths(same, (1.0,))
    assert sig[0] == pytest.approx(math.sqrt(3.0))  # mean norm fallback
    assert median_bandwidths([torch.zeros(3, 2)], (2.0,)) == (2.0,)


def test_locality_rows_all_skips_padding_and_image_tokens() -> None:
    logits = torch.arange(1 * 5 * 2, dtype=torch.float32).reshape(1, 5, 2)
    labels = torch.tensor([[-100, -100, -100, 1, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 0]])
    image = torch.tensor([[True, False, False, False, False]])
    rows = locality_rows(logits, labels, attn, image, "all")
    # text positions 1..3; pairs (1,2), (2,3) -> logits rows 1 and 2
    assert torch.equal(rows, logits[0, 1:3])
    assert torch.equal(locality_rows(logits, labels, attn, image, "answer"), logits[0, 2:3])
    with pytest.raises(ValueError, match="no labelled target"):
        answer_rows(logits, torch.full((1, 5), -100))


def _risk_of_omega(omega: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows, targets = answer_rows(logits, labels)
    return torch.nn.functional.cross_entropy(omega * rows, targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_omega_gradient_matches_autograd_on_explicit_omega(backend: str) -> None:
    """g_e from the kernels' closed form == dR_e/domega by autograd with an explicit omega; and the
    penalty's gradient w.r.t. the logits matches a double-backward reference."""
    gen = torch.Generator().manual_seed(3)
    logits_in = torch.randn(
        2, 6, 9, generator=gen, dtype=torch.float64 if backend == "torch" else torch.float32
    )
    labels = torch.full((2, 6), -100)
    labels[0, 3:6] = torch.tensor([1, 4, 8])
    labels[1, 5] = 2
    pre = torch.randn(5, 9, generator=gen, dtype=logits_in.dtype)
    post_in = torch.randn(5, 9, generator=gen, dtype=logits_in.dtype)

    # closed form (kernels) path
    logits = logits_in.clone().requires_grad_(True)
    post = post_in.clone().requires_grad_(True)
    _, g_in = reliability_risk(logits, labels, backend=backend)
    _, g_ood = locality_risk(pre, post, backend=backend)
    penalty = irm_tv_penalty({"in_distribution": g_in, "ood": g_ood})
    penalty.backward()

    # explicit omega + autograd (create_graph for the second derivative)
    logits_r = logits_in.clone().requires_grad_(True)
    post_r = post_in.clone().requires_grad_(True)
    omega = torch.tensor(1.0, dtype=logits_in.dtype, requires_grad=True)
    r_in = _risk_of_omega(omega, logits_r, labels)
    p0 = torch.softmax(pre, -1)
    r_ood = (p0 * (torch.log_softmax(pre, -1) - torch.log_softmax(omega * post_r, -1))).sum(-1).mean()
    (dg_in,) = torch.autograd.grad(r_in, omega, create_graph=True)
    (dg_ood,) = torch.autograd.grad(r_ood, omega, create_graph=True)
    tol = {"rel": 1e-9, "abs": 1e-9} if logits_in.dtype == torch.float64 else {"rel": 1e-4, "abs": 1e-5}
    assert float(g_in.detach()) == pytest.approx(float(dg_in.detach()), **tol)
    assert float(g_ood.detach()) == pytest.approx(float(dg_ood.detach()), **tol)
    ref = (dg_in.abs() + dg_ood.abs()) ** 2
    assert float(penalty.detach()) == pytest.approx(float(ref.detach()), **tol)
    ref.backward()
    atol = 1e-9 if logits_in.dtype == torch.float64 else 1e-5
    assert torch.allclose(logits.grad, logits_r.grad, atol=atol)
    assert torch.allclose(post.grad, post_r.grad, atol=atol)


def test_irm_tv_penalty_value_and_errors() -> None:
    g = {"a": torch.tensor(0.5), "b": torch.tensor(-1.5), "c": torch.tensor(0.0)}
    assert float(irm_tv_penalty(g)) == pytest.approx(4.0)
    # the messages pinned whole (issue 20: mutation survivors of penalty.py)
    with pytest.raises(ValueError) as info:
        irm_tv_penalty({})
    assert str(info.value) == (
        "irm_tv_penalty: no environment given; the penalty needs at least one dR_e/domega"
    )
    with pytest.raises(ValueError) as info:
        irm_tv_penalty({"a": torch.tensor(1.0), "b": torch.ones(2)})
    assert str(info.value) == (
        "irm_tv_penalty: dR/domega of environment 'b' must be a scalar tensor, got tensor([1., 1.])"
    )

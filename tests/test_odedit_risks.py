"""ODEdit's risk terms and the IRM-TV penalty against hand-computed values and autograd."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

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


# ----------------------------------------------------------------------------------------------------
# issue 20, session 8 part 2: the mutation survivors of risks.py
# ----------------------------------------------------------------------------------------------------


def _message(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


def test_answer_rows_rejects_each_bad_shape_with_its_message() -> None:
    # 3-D logits but labels of another length: the `or` of the shape check (not `and`)
    with pytest.raises(ValueError) as info:
        answer_rows(torch.zeros(1, 5, 2), torch.zeros(1, 4, dtype=torch.long))
    assert _message(info) == (
        "answer_rows: expected logits (B, T, V) and labels (B, T), got (1, 5, 2) and (1, 4)"
    )
    # labels that fit but 2-D logits
    with pytest.raises(ValueError) as info:
        answer_rows(torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.long))
    assert _message(info) == "answer_rows: expected logits (B, T, V) and labels (B, T), got (1, 5) and (1, 5)"
    with pytest.raises(ValueError) as info:
        answer_rows(torch.zeros(1, 5, 2), torch.full((1, 5), -100))
    assert _message(info) == (
        "answer_rows: no labelled target token; build the batch with Backbone.build_batch"
    )


def test_locality_rows_and_gen_samples_messages() -> None:
    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[-100, -100, 1]])
    with pytest.raises(ValueError) as info:
        locality_rows(logits, labels, torch.ones(1, 3), None, "every")
    assert _message(info) == "locality_rows: mode must be 'answer' or 'all', got 'every'"
    # one text token: no (token, next token) pair of text
    with pytest.raises(ValueError) as info:
        locality_rows(logits, labels, torch.tensor([[1, 0, 0]]), None, "all")
    assert _message(info) == "locality_rows: no text position to compare; is the prompt empty?"
    with pytest.raises(ValueError) as info:
        gen_samples(torch.zeros(1, 3, 2), labels, "first")
    assert _message(info) == "gen_samples: mode must be 'answer' or 'last_prompt', got 'first'"
    with pytest.raises(ValueError) as info:
        gen_samples(torch.zeros(2, 3, 2), torch.tensor([[-100, -100, 1], [-100, -100, -100]]), "answer")
    assert _message(info) == "gen_samples: row 1 has no target token"


def test_locality_and_generality_risk_messages() -> None:
    with pytest.raises(ValueError) as info:
        locality_risk(torch.zeros(2, 3), torch.zeros(3, 3))
    assert _message(info) == (
        "locality_risk: pre-edit rows (2, 3) and post-edit rows (3, 3) differ; "
        "the pre-edit pass must see the very same batch"
    )
    with pytest.raises(ValueError) as info:
        generality_risk([])
    assert _message(info) == "generality_risk: no (edit, rephrase) pair; enable a rephrase kind"


def test_the_risks_default_to_the_auto_backend_and_pass_the_backend_on() -> None:
    from odedit_hf.methods.odedit.risks import reliability_risk_rows

    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]]])
    labels = torch.tensor([[-100, 2]])
    rows, targets = answer_rows(logits, labels)
    pre, post = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    # the defaults run (an unknown default backend would be rejected by the kernels) and equal "torch" on the CPU
    for default, explicit in (
        (reliability_risk(logits, labels), reliability_risk(logits, labels, backend="torch")),
        (reliability_risk_rows(rows, targets), reliability_risk_rows(rows, targets, backend="torch")),
        (locality_risk(pre, post), locality_risk(pre, post, backend="torch")),
    ):
        assert [float(t) for t in default] == pytest.approx([float(t) for t in explicit], abs=1e-7)
    assert float(generality_risk([(x, y, (1.0,))])) == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-6)
    # the backend given reaches the kernels: an unknown one is rejected there
    for call, op in (
        (lambda: reliability_risk(logits, labels, backend="nope"), "nll_with_omega"),
        (lambda: reliability_risk_rows(rows, targets, backend="nope"), "nll_with_omega"),
        (lambda: locality_risk(pre, post, backend="nope"), "kl_with_omega"),
        (lambda: generality_risk([(x, y, (1.0,))], backend="nope"), "rbf_mmd"),
    ):
        with pytest.raises(ValueError, match=f"^{op}: backend must be one of"):
            call()


def test_locality_and_generality_risk_cast_the_reference_side_to_the_post_edit_dtype() -> None:
    # pre-edit rows in float64, post-edit rows in float32 (the kernels refuse mixed dtypes)
    pre = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    post = torch.tensor([[1.0, 1.0, 0.0]])
    r_loc, g = locality_risk(pre, post, backend="torch")
    p0, p = _softmax_list(pre[0].tolist()), _softmax_list(post[0].tolist())
    assert r_loc.dtype == torch.float32 and g.dtype == torch.float32
    assert float(r_loc) == pytest.approx(
        sum(a * (math.log(a) - math.log(b)) for a, b in zip(p0, p)), rel=1e-5
    )
    # R_gen: the rephrase samples follow the edit samples' dtype
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]])
    value = generality_risk([(x, y, (1.0,))], backend="torch")
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-12)


def test_median_bandwidths_edge_cases() -> None:
    # exactly two samples: their distance is the median (not the norm fallback)
    assert median_bandwidths([torch.tensor([[0.0, 0.0], [6.0, 8.0]])], (1.0,)) == pytest.approx((10.0,))
    # one feature (H = 1): pairwise distances 1, 3, 2 -> median 2 (the mean norm would be 4/3)
    assert median_bandwidths([torch.tensor([[0.0], [1.0], [3.0]])], (1.0,)) == pytest.approx((2.0,))
    # a median below 1 is kept as it is
    assert median_bandwidths([torch.tensor([[0.0, 0.0], [0.3, 0.4]])], (2.0,)) == pytest.approx((1.0,))
    # a single sample: the mean norm (5), whatever its size
    assert median_bandwidths([torch.tensor([[3.0, 4.0]])], (1.0, 3.0)) == pytest.approx((5.0, 15.0))
    # all samples equal with a mean norm below 1: that norm (0.5), not 1.0
    assert median_bandwidths([torch.tensor([[0.3, 0.4], [0.3, 0.4]])], (1.0,)) == pytest.approx((0.5,))
    # samples with leading dimensions are flattened to (n, H) rows: (2, 2, 1) -> 4 points on a line
    stacked = torch.tensor([[[0.0], [1.0]], [[3.0], [7.0]]])
    # distances 1, 3, 7, 2, 6, 4 -> median of the six (torch: the lower middle) 3
    assert median_bandwidths([stacked], (1.0,)) == pytest.approx((3.0,))


def _editor() -> LoraConfig:
    return LoraConfig(target_modules=["x"])


def test_needed_groups_of_each_configuration() -> None:
    from odedit_hf.methods.odedit.config import ODEditConfig
    from odedit_hf.methods.odedit.risks import needed_groups

    every = ("edit", "rephrase", "image_rephrase", "loc", "m_loc")
    assert needed_groups(ODEditConfig(editor=_editor())) == every
    assert needed_groups(ODEditConfig(editor=_editor(), hard_negatives=True)) == (
        *every,
        "hard_loc",
        "hard_m_loc",
    )
    only_rel = ODEditConfig(editor=_editor(), loc_risk=False, gen_risk=False, irm_penalty=False)
    assert needed_groups(only_rel) == ("edit",)
    gen_only = ODEditConfig(editor=_editor(), loc_risk=False, irm_penalty=False, rephrase_kinds=("rephrase",))
    assert needed_groups(gen_only) == ("edit", "rephrase")
    loc_only = ODEditConfig(editor=_editor(), gen_risk=False, irm_penalty=False, hard_negatives=True)
    assert needed_groups(loc_only) == ("edit", "loc", "m_loc", "hard_loc", "hard_m_loc")
    # the penalty alone needs every environment
    assert needed_groups(ODEditConfig(editor=_editor(), loc_risk=False, gen_risk=False)) == every


def test_gen_pairs_pool_the_rephrases_of_a_request_per_kind() -> None:
    from types import SimpleNamespace

    from odedit_hf.methods.odedit.config import ODEditConfig
    from odedit_hf.methods.odedit.risks import gen_pairs

    class Group:
        def __init__(self, parts: list[torch.Tensor]) -> None:
            self.parts = parts

        def answer_hidden_per_row(self, mode: str) -> list[torch.Tensor]:
            assert mode == "answer"
            return self.parts

    x0 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    x1 = torch.tensor([[5.0, 5.0]], requires_grad=True)
    r = [torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, 0.0]])]
    outputs = {"edit": Group([x0, x1]), "rephrase": Group(r)}
    batch = SimpleNamespace(owners={"edit": [0, 1], "rephrase": [0, 0, 1]})
    config = ODEditConfig(editor=_editor(), rephrase_kinds=("rephrase",))
    pairs, per_request = gen_pairs(outputs, batch, config, {0: (1.5,), 1: (2.5,)})
    assert len(pairs) == 2
    (xa, ya, sa), (xb, yb, sb) = pairs
    # request 0's two rephrases stacked as two samples (rows), not side by side
    assert torch.equal(ya, torch.tensor([[1.0, 0.0], [2.0, 0.0]])) and sa == (1.5,)
    assert torch.equal(yb, torch.tensor([[3.0, 0.0]])) and sb == (2.5,)
    # gen_anchor_edit (the default): the edit samples are constants
    assert torch.equal(xa, x0) and not xa.requires_grad and not xb.requires_grad
    assert [len(v) for v in per_request.values()] == [3, 2]
    # absolute bandwidths win; without the anchor the edit samples keep their graph
    config = ODEditConfig(
        editor=_editor(), rephrase_kinds=("rephrase",), gen_anchor_edit=False, mmd_bandwidths=(4.0,)
    )
    pairs, _ = gen_pairs(outputs, batch, config, None)
    assert [p[2] for p in pairs] == [(4.0,), (4.0,)] and pairs[0][0] is x0

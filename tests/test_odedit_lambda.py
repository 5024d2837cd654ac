"""The λ-network (params / sketch / fixed), the count-sketch, and the dual step."""

from __future__ import annotations

import pytest
import torch

from odedit_hf.methods.odedit.lambda_net import LambdaNetwork, count_sketch, lambda_network_num_parameters
from odedit_hf.methods.odedit.objective import dual_step


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(3, 5, generator=gen)),
        torch.nn.Parameter(torch.randn(7, generator=gen)),
    ]


def _dense_sketch_matrix(params: list[torch.Tensor], k: int, seed: int) -> torch.Tensor:
    """The sketch as an explicit (k, n) matrix, by sketching the unit vectors."""
    n = sum(p.numel() for p in params)
    cols = []
    for j in range(n):
        flat = torch.zeros(n)
        flat[j] = 1.0
        parts, offset = [], 0
        for p in params:
            parts.append(flat[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        cols.append(count_sketch(parts, k, seed))
    return torch.stack(cols, dim=1)


def test_count_sketch_is_a_fixed_signed_bucketing_with_exact_gradient() -> None:
    params = _params()
    k, seed = 6, 11
    s = _dense_sketch_matrix([p.detach() for p in params], k, seed)
    # every coordinate lands in exactly one bucket with sign +-1
    assert torch.equal((s != 0).sum(0), torch.ones(s.shape[1], dtype=torch.long))
    assert set(s.unique().tolist()) <= {-1.0, 0.0, 1.0}
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    out = count_sketch(params, k, seed)
    assert torch.allclose(out, s @ flat, atol=1e-6)
    # deterministic from the seed, different for another seed
    assert torch.equal(out, count_sketch(params, k, seed))
    assert not torch.equal(out, count_sketch(params, k, seed + 1))
    # gradient = S^T grad_out (autograd against the explicit matrix)
    w = torch.randn(k, generator=torch.Generator().manual_seed(1))
    (out * w).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(grad, s.T @ w, atol=1e-6)


def test_count_sketch_memo_matches_rehashing(monkeypatch: pytest.MonkeyPatch) -> None:
    from odedit_hf.methods.odedit import lambda_net

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        params = [p.detach().clone().requires_grad_(True) for p in _params()]
        out = count_sketch(params, 7, 3)
        (out * torch.arange(7.0)).sum().backward()
        return out.detach(), torch.cat([p.grad.reshape(-1) for p in params])

    monkeypatch.setattr(lambda_net, "_memo", type(lambda_net._memo)())
    monkeypatch.setattr(lambda_net, "SKETCH_MEMO_BYTES", 0)
    rehashed = run()
    assert not lambda_net._memo, "memo off: nothing may be kept"
    monkeypatch.setattr(lambda_net, "SKETCH_MEMO_BYTES", 1 << 20)
    first, second = run(), run()
    assert len(lambda_net._memo) == len(_params()), "one table per parameter tensor"
    for a, b, c in zip(rehashed, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)
    # a tight budget evicts the least recently used tables
    monkeypatch.setattr(
        lambda_net,
        "SKETCH_MEMO_BYTES",
        4 * lambda_net._MEMO_BYTES_PER_COORDINATE * max(p.numel() for p in _params()),
    )
    for seed in range(10):
        count_sketch(_params(), 5, 100 + seed)
    assert 0 < lambda_net._memo_bytes() <= lambda_net.SKETCH_MEMO_BYTES
    assert (15, 5, 100 + 9, "cpu") in lambda_net._memo, "the newest table stays"


@pytest.mark.parametrize("mode", ["params", "sketch", "fixed"])
def test_lambda_starts_at_lambda_init_and_is_deterministic(mode: str) -> None:
    params = _params()
    n = sum(p.numel() for p in params)
    net = LambdaNetwork(mode, n, hidden_size=8, sketch_dim=4, seed=5, lambda_init=0.7)
    assert float(net(params)) == pytest.approx(0.7, rel=1e-5)
    again = LambdaNetwork(mode, n, hidden_size=8, sketch_dim=4, seed=5, lambda_init=0.7)
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert sum(p.numel() for p in net.parameters()) == lambda_network_num_parameters(mode, n, 8, 4)


def test_lambda_network_checks_its_input_size() -> None:
    net = LambdaNetwork("params", 10, hidden_size=4)
    with pytest.raises(ValueError, match="built for 10 edit parameters"):
        net(_params())
    with pytest.raises(ValueError, match="mode must be"):
        LambdaNetwork("dense", 10)


def _library_dual(mode: str, params: list[torch.nn.Parameter], **options):  # noqa: ANN202
    """The λ-network and dual optimiser exactly as ODEdit builds them (``build_lambda_network``); the
    parametrisation of config version 1 (Softplus, no slack) unless ``options`` say otherwise."""
    from peft import LoraConfig

    from odedit_hf.methods.odedit import ODEditConfig
    from odedit_hf.methods.odedit.objective import build_lambda_network

    config = ODEditConfig(
        editor=LoraConfig(target_modules=["q_proj"]),
        lambda_mode=mode,
        lambda_hidden_size=8,
        sketch_dim=4,
        **{"lambda_param": "softplus", "dual_slack": 0.0, **options},
    )
    return build_lambda_network(config, params, init_seed=0)


@pytest.mark.parametrize("mode", ["params", "sketch"])
def test_dual_step_raises_lambda_in_proportion_to_the_penalty(mode: str) -> None:
    """The library's dual optimiser is plain gradient *ascent*: λ rises, by a step proportional to P
    (an Adam dual would rise by the same amount whatever P; a descent would lower λ)."""
    params = _params()
    rises = []
    for penalty in (0.01, 0.02):
        net, opt = _library_dual(mode, params, lambda_init=1.0, lambda_lr=0.1)
        assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.1
        lam0 = float(net(params))
        loss = torch.tensor(2.0) + net(params) * penalty  # R + lambda * P
        loss.backward()
        dual_step(net, opt)
        assert all(p.grad is None for p in net.parameters())  # gradients consumed
        rises.append(float(net(params)) - lam0)
    assert rises[0] > 1e-5, rises
    assert rises[1] / rises[0] == pytest.approx(2.0, rel=0.02)


def test_dual_step_leaves_lambda_when_the_penalty_is_zero_or_lambda_is_fixed() -> None:
    params = _params()
    net, opt = _library_dual("sketch", params, lambda_init=0.5, lambda_lr=1.0)
    lam0 = float(net(params))
    (net(params) * torch.tensor(0.0)).backward()
    dual_step(net, opt)
    assert float(net(params)) == pytest.approx(lam0, rel=1e-7)
    fixed, none = _library_dual("fixed", params, lambda_init=0.5)
    assert none is None
    dual_step(fixed, none)
    assert float(fixed(params)) == pytest.approx(0.5)


def test_lambda_max_clamps() -> None:
    net = LambdaNetwork("sketch", 22, hidden_size=4, sketch_dim=4, lambda_init=1.0, lambda_max=1.5)
    with torch.no_grad():
        net.net[4].bias.fill_(10.0)
    assert float(net(_params())) == pytest.approx(1.5)


def test_sketch_memory_is_independent_of_the_edit_size() -> None:
    small = lambda_network_num_parameters("sketch", 10**3, 64, 128)
    huge = lambda_network_num_parameters("sketch", 10**9, 64, 128)
    assert small == huge
    assert lambda_network_num_parameters("params", 10**6, 64, 128) > 64 * 10**6


def test_sketch_input_has_the_scale_of_one_edit_parameter() -> None:
    """sqrt(k/n)·Sθ: per-coordinate mean square ≈ that of θ, as the `params` input (same init scaling)."""
    gen = torch.Generator().manual_seed(3)
    theta = [torch.randn(100, 100, generator=gen) * 0.02]
    net = LambdaNetwork("sketch", theta[0].numel(), hidden_size=8, sketch_dim=64, seed=1)
    u = net.features(theta)
    ratio = float(u.pow(2).mean() / theta[0].pow(2).mean())
    assert u.shape == (64,) and 0.6 < ratio < 1.4


# ---------------------------------------------------------------- parametrisations and the dual slack (issue 12)
PARAMS = ("softplus", "log", "scaled_softplus")


def _dual_steps(net: LambdaNetwork, penalty: float, steps: int, lr: float = 0.1) -> list[float]:
    """λ after each of ``steps`` primal-backward + dual steps at a constant penalty (``loss = R + λ·P``)."""
    params = _params()
    opt = torch.optim.SGD(net.parameters(), lr=lr, maximize=True)
    out = [float(net(params).detach())]
    for _ in range(steps):
        loss = torch.tensor(2.0) + net(params) * torch.tensor(penalty)
        loss.backward()
        assert dual_step(net, opt)
        out.append(float(net(params).detach()))
    return out


@pytest.mark.parametrize("lambda_param", PARAMS)
def test_every_parametrisation_starts_at_lambda_init(lambda_param: str) -> None:
    net = LambdaNetwork(
        "sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.003, lambda_param=lambda_param
    )
    assert float(net(_params()).detach()) == pytest.approx(0.003, rel=1e-5)


def test_softplus_hardly_moves_a_small_lambda() -> None:
    """The issue's measurement: λ_init 1e-3 at P = 10, lr 0.1 moves by ~1e-4 relative per step."""
    lams = _dual_steps(LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=1e-3), 10.0, 3)
    assert 1e-3 < lams[-1] < 1.01e-3


@pytest.mark.parametrize("lambda_param", ["log", "scaled_softplus"])
def test_a_dual_step_moves_a_small_lambda_measurably_up(lambda_param: str) -> None:
    net = LambdaNetwork(
        "sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=1e-3, lambda_param=lambda_param
    )
    lams = _dual_steps(net, 10.0, 1)
    # log: Δlog λ ≥ lr·P = 1 from the output bias alone; scaled softplus: Δλ/λ_init ≈ 0.5·lr·P = 0.5
    assert lams[1] > 1.45e-3


@pytest.mark.parametrize("lambda_param", PARAMS)
def test_with_slack_lambda_rises_above_and_falls_below_epsilon(lambda_param: str) -> None:
    def net() -> LambdaNetwork:
        return LambdaNetwork(
            "sketch",
            22,
            hidden_size=8,
            sketch_dim=4,
            lambda_init=0.5,
            lambda_param=lambda_param,
            dual_slack=1.0,
        )

    up = _dual_steps(net(), 3.0, 3)
    down = _dual_steps(net(), 0.2, 3)
    assert all(b > a for a, b in zip(up, up[1:])), up
    assert all(b < a for a, b in zip(down, down[1:])), down
    assert up[1] - up[0] > 1e-2 and down[0] - down[1] > 1e-2  # measurable in one step
    # at P = epsilon the dual objective is flat: λ stays
    assert _dual_steps(net(), 1.0, 2)[-1] == pytest.approx(0.5, rel=1e-6)


def test_log_lambda_moves_by_the_same_factor_whatever_its_scale() -> None:
    ratios = []
    for lam0 in (1e-4, 1e-2, 1.0):
        net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=lam0, lambda_param="log")
        lams = _dual_steps(net, 2.0, 1)
        ratios.append(lams[1] / lams[0])
    assert ratios[0] > 1.2
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-4) and ratios[1] == pytest.approx(ratios[2], rel=1e-4)


@pytest.mark.parametrize("lambda_param", PARAMS)
def test_a_clamped_lambda_can_come_down_with_the_slack(lambda_param: str) -> None:
    net = LambdaNetwork(
        "sketch",
        22,
        hidden_size=8,
        sketch_dim=4,
        lambda_init=0.5,
        lambda_max=1.0,
        lambda_param=lambda_param,
        dual_slack=1.0,
    )
    with torch.no_grad():
        net.net[4].bias.fill_(20.0)  # far above the clamp
    assert float(net(_params()).detach()) == pytest.approx(1.0)
    stuck = _dual_steps(net, 5.0, 1)  # pushed further up: no move
    assert stuck[1] == pytest.approx(1.0)
    lams = _dual_steps(net, 0.0, 400, lr=0.5)  # pushed down: the gradient passes the clamp
    assert lams[-1] < 0.99


def test_softplus_without_slack_keeps_the_original_dual_gradient() -> None:
    """ψ = λ, ε = 0: the dual gradient is the one the primal backward leaves, P·∂λ/∂φ."""
    params = _params()
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.2)
    with torch.no_grad():
        net.net[4].weight.normal_(generator=torch.Generator().manual_seed(0))
    (torch.tensor(1.0) + net(params) * torch.tensor(3.0)).backward()
    primal = [p.grad.clone() for p in net.parameters()]
    assert net.dual_backward() == pytest.approx(3.0)
    for a, b in zip(primal, net.parameters()):
        assert torch.allclose(a, b.grad, rtol=1e-5, atol=1e-7)


def test_dual_step_divides_the_recorded_signal_by_the_loss_scale() -> None:
    def run(scale: float) -> list[torch.Tensor]:
        params = _params()
        net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.2, lambda_param="log")
        opt = torch.optim.SGD(net.parameters(), lr=0.1, maximize=True)
        ((torch.tensor(1.0) + net(params) * torch.tensor(3.0)) * scale).backward()
        dual_step(net, opt, loss_scale=scale)
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(1.0), run(1024.0)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_dual_step_skip_and_non_finite_signal_leave_lambda() -> None:
    params = _params()
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.2, lambda_param="log")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, maximize=True)
    lam0 = float(net(params).detach())
    (net(params) * torch.tensor(3.0)).backward()
    assert not dual_step(net, opt, skip=True)
    assert net.dual_signal is None and all(p.grad is None for p in net.parameters())
    (net(params) * torch.tensor(float("inf"))).backward()
    assert not dual_step(net, opt)
    assert float(net(params).detach()) == pytest.approx(lam0)


def test_lambda_network_rejects_bad_parametrisations() -> None:
    with pytest.raises(ValueError, match="lambda_param must be one of"):
        LambdaNetwork("sketch", 22, lambda_param="exp")
    with pytest.raises(ValueError, match="must be > 0"):
        LambdaNetwork("sketch", 22, lambda_init=0.0, lambda_param="log")
    with pytest.raises(ValueError, match="dual_slack must be >= 0"):
        LambdaNetwork("sketch", 22, dual_slack=-1.0)


def test_config_carries_the_parametrisation_to_the_network() -> None:
    from peft import LoraConfig

    from odedit_hf.methods.odedit import ODEditConfig
    from odedit_hf.methods.odedit.objective import build_lambda_network

    config = ODEditConfig(editor=LoraConfig(target_modules=["x"]), lambda_param="log", dual_slack=0.5)
    default = ODEditConfig(editor=LoraConfig(target_modules=["x"]))
    assert (default.lambda_param, default.dual_slack) == ("log", 0.5)  # the defaults of config version 2
    net, opt = build_lambda_network(config, _params(), init_seed=0)
    assert net.lambda_param == "log" and net.dual_slack == 0.5 and opt is not None
    with pytest.raises(ValueError, match="lambda_param must be one of"):
        ODEditConfig(editor=LoraConfig(target_modules=["x"]), lambda_param="exp")
    with pytest.raises(ValueError, match="dual_slack must be a number >= 0"):
        ODEditConfig(editor=LoraConfig(target_modules=["x"]), dual_slack=-0.1)
    with pytest.raises(ValueError, match="must then be > 0"):
        ODEditConfig(editor=LoraConfig(target_modules=["x"]), lambda_param="log", lambda_init=0.0)


def test_log_lambda_falls_to_its_floor_and_stays_finite() -> None:
    net = LambdaNetwork(
        "sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.5, lambda_param="log", dual_slack=1.0
    )
    assert net.lambda_min == pytest.approx(5e-4)  # default floor lambda_init / 1000
    lams = _dual_steps(net, 0.0, 200, lr=0.5)
    assert lams[-1] == pytest.approx(5e-4, rel=1e-4)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert _dual_steps(net, 3.0, 1)[1] > 1e-3  # and rises again at once when the penalty exceeds the slack


# ---------------------------------------------------------------- pinned against hand computations (issue 20:
# the mutation survivors of lambda_net.py)
_MASK64 = (1 << 64) - 1


def _signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _splitmix(j: int, seed: int) -> int:
    """The documented hash in plain Python integers: splitmix64's finaliser with wrapping int64 products
    and arithmetic right shifts (what ``>>`` does on a signed int64 tensor)."""
    x = _signed64(j * 0x9E3779B97F4A7C15 + seed * 2 + 1)
    x ^= x >> 31
    x = _signed64(x * 0xBF58476D1CE4E5B9)
    x ^= x >> 29
    x = _signed64(x * 0x94D049BB133111EB)
    return x ^ (x >> 32)


def _reference_sketch(tensors: list[torch.Tensor], k: int, seed: int) -> list[float]:
    """``S θ`` by hand: tensor ``i`` hashes its own coordinates ``j`` with seed ``seed + 1_000_003·i``;
    bucket ``h mod k`` (non-negative), sign from bit 40 of ``h``."""
    out = [0.0] * k
    for i, t in enumerate(tensors):
        for j, value in enumerate(t.detach().reshape(-1).tolist()):
            h = _splitmix(j, seed + 1_000_003 * i)
            out[h % k] += value * (1.0 if (h >> 40) & 1 else -1.0)
    return out


def _fresh_memo(monkeypatch: pytest.MonkeyPatch, budget: int) -> object:
    from odedit_hf.methods.odedit import lambda_net

    monkeypatch.setattr(lambda_net, "_memo", type(lambda_net._memo)())
    monkeypatch.setattr(lambda_net, "SKETCH_MEMO_BYTES", budget)
    return lambda_net


@pytest.mark.parametrize("memo", [True, False])
def test_count_sketch_equals_the_hand_computed_hash(monkeypatch: pytest.MonkeyPatch, memo: bool) -> None:
    lambda_net = _fresh_memo(monkeypatch, 1 << 20 if memo else 0)
    if not memo:
        monkeypatch.setattr(lambda_net, "_CHUNK", 3)  # rehashed in chunks 0-2, 3-5, 6: starts other than 0
    gen = torch.Generator().manual_seed(4)
    # three tensors: each its own seed offset; integer values, so float32 sums are exact
    tensors = [torch.randint(-9, 10, shape, generator=gen).float() for shape in ((7,), (2, 3), (4,))]
    for k, seed in ((5, 3), (16, 12345), (1, 7)):
        params = [t.clone().requires_grad_(True) for t in tensors]
        out = count_sketch(params, k, seed)
        assert out.dtype == torch.float32 and out.shape == (k,)
        assert out.tolist() == _reference_sketch(tensors, k, seed)
        # the backward is S^T w, coordinate by coordinate: w[bucket] * sign
        w = torch.arange(1.0, k + 1.0)
        (out * w).sum().backward()
        for i, p in enumerate(params):
            expected = []
            for j in range(p.numel()):
                h = _splitmix(j, seed + 1_000_003 * i)
                expected.append(float(w[h % k]) * (1.0 if (h >> 40) & 1 else -1.0))
            assert p.grad.reshape(-1).tolist() == expected
    # some bucket receives both signs (a one-signed hash would pass sums of positive values)
    signs = {(_splitmix(j, 3) >> 40) & 1 for j in range(7)}
    assert signs == {0, 1}
    # float64 parameters get a float64 gradient, float32 sketch
    p64 = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64, requires_grad=True)
    out = count_sketch([p64], 4, 9)
    assert out.dtype == torch.float32 and out.tolist() == _reference_sketch([p64], 4, 9)
    out.sum().backward()
    assert p64.grad.dtype == torch.float64


def test_count_sketch_refusals_pinned_whole() -> None:
    with pytest.raises(ValueError) as info:
        count_sketch([torch.ones(3)], 0, 0)
    assert str(info.value) == "count_sketch: k must be >= 1, got 0"
    with pytest.raises(ValueError) as info:
        count_sketch([], 4, 0)
    assert str(info.value) == "count_sketch: no parameters to sketch"
    # k = 1 is a sketch: the signed sum of every coordinate
    assert count_sketch([torch.tensor([2.0, 3.0])], 1, 0).tolist() == _reference_sketch(
        [torch.tensor([2.0, 3.0])], 1, 0
    )


def test_sketch_memo_reuses_tables_counts_bytes_and_evicts_least_recently_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    per = 12  # int64 bucket + float32 sign per coordinate
    lambda_net = _fresh_memo(monkeypatch, 4 * 4 * per)  # a table is memoised up to 4 coordinates
    calls = []
    real = lambda_net._buckets_signs
    monkeypatch.setattr(lambda_net, "_buckets_signs", lambda *a: calls.append(a[:2]) or real(*a))
    count_sketch([torch.ones(4)], 3, 0)
    count_sketch([torch.ones(4)], 3, 0)
    assert calls == [(0, 4)], "the second sketch reuses the memoised table"
    assert lambda_net._memo_bytes() == 4 * per
    count_sketch([torch.ones(5)], 3, 0)  # 60 bytes > a quarter of the budget: hashed, not kept
    assert calls[-1] == (0, 5) and (5, 3, 0, "cpu") not in lambda_net._memo
    for seed in (1, 2, 3):  # the budget (192 bytes) holds exactly four tables of 48 bytes
        count_sketch([torch.ones(4)], 3, seed)
    assert list(lambda_net._memo) == [(4, 3, s, "cpu") for s in (0, 1, 2, 3)]
    assert lambda_net._memo_bytes() == lambda_net.SKETCH_MEMO_BYTES
    count_sketch([torch.ones(4)], 3, 0)  # used again: now the most recent
    count_sketch([torch.ones(4)], 3, 4)  # a fifth table evicts the least recently used (seed 1)
    assert list(lambda_net._memo) == [(4, 3, s, "cpu") for s in (2, 3, 0, 4)]
    # a smaller budget set at run time: the next table evicts until the memo fits, keeping the newest
    monkeypatch.setattr(lambda_net, "SKETCH_MEMO_BYTES", 4 * per)
    count_sketch([torch.ones(1)], 3, 5)
    assert list(lambda_net._memo) == [(1, 3, 5, "cpu")]
    assert lambda_net._memo_bytes() == per


@pytest.mark.parametrize("lambda_param", PARAMS)
def test_out_of_inverts_the_parametrisation(lambda_param: str) -> None:
    import math

    net = LambdaNetwork("sketch", 22, hidden_size=4, sketch_dim=4, lambda_init=0.5, lambda_param=lambda_param)
    net.lambda_min = None  # the round trip without log's default floor
    for lam in (0.2, 0.5, 0.9, 3.0):
        out = net._out_of(lam)
        assert float(net._lambda(torch.tensor(out, dtype=torch.float64))) == pytest.approx(lam, rel=1e-9)
    assert net._out_of(0.0) == -math.inf
    assert net._out_of(None) is None


def test_dual_signal_sums_the_backwards_since_the_last_step() -> None:
    params = _params()
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.2)
    assert net.dual_signal is None
    (net(params) * 2.0).backward()
    assert net.dual_signal == pytest.approx(2.0)
    (net(params) * 5.0).backward()  # gradient accumulation: a second forward and backward
    assert net.dual_signal == pytest.approx(7.0)
    with pytest.raises(ValueError) as info:
        net.dual_backward(loss_scale=0.0)
    assert str(info.value) == "LambdaNetwork.dual_backward: loss_scale must be > 0, got 0.0"


def _clamp_grads(drive: float, *, top: bool) -> list[torch.Tensor | None]:
    """The dual gradients of a log-λ network that starts exactly at its clamp (out = 0 = the clamp's
    output) under ``drive = P − ε``."""
    clamp = {"lambda_max": 0.1} if top else {"lambda_min": 0.1}
    net = LambdaNetwork(
        "sketch",
        22,
        hidden_size=8,
        sketch_dim=4,
        lambda_init=0.1,
        lambda_param="log",
        dual_slack=1.0,
        **clamp,
    )
    net(_params())
    assert net.dual_backward(penalty=1.0 + drive) == pytest.approx(1.0 + drive)
    return [p.grad for p in net.parameters()]


@pytest.mark.parametrize("top", [True, False])
def test_a_lambda_at_its_clamp_gets_a_dual_gradient_only_back_inside(top: bool) -> None:
    outward, inward = (0.5, -0.5) if top else (-0.5, 0.5)
    assert all(g is None for g in _clamp_grads(outward, top=top)), "pushed further out: no gradient"
    grads = _clamp_grads(inward, top=top)
    assert grads[-1] is not None and float(grads[-1]) == pytest.approx(inward)  # d(out)/d(bias) = 1, ψ = out
    flat = _clamp_grads(0.0, top=top)  # P = ε: the gradient is computed, and it is zero
    assert all(g is not None and not g.any() for g in flat)


def test_memory_bytes_counts_the_float32_parameters() -> None:
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4)
    assert net.memory_bytes() == 4 * lambda_network_num_parameters("sketch", 22, 8, 4) == 4 * 121
    assert net.to(torch.float64).memory_bytes() == 8 * 121


def test_lambda_network_defaults_and_accepted_edges() -> None:
    net = LambdaNetwork("sketch", 22)
    assert (net.net[0].in_features, net.net[0].out_features, net.net[2].out_features) == (128, 64, 64)
    assert (net.seed, net.init_seed, net.lambda_init, net.lambda_param, net.dual_slack) == (
        0,
        0,
        1.0,
        "softplus",
        0.0,
    )
    assert net.lambda_min is None and net.lambda_max is None  # the floor is log's default only
    assert LambdaNetwork("params", 1, hidden_size=4).net[0].in_features == 1  # one edit parameter is enough
    # lambda_init 0: allowed for softplus (lambda ~ 0) and in fixed mode whatever the parametrisation
    assert float(LambdaNetwork("sketch", 22, lambda_init=0.0)(_params()).detach()) < 1e-5
    fixed = LambdaNetwork("fixed", 22, lambda_init=0.0, lambda_param="log")
    assert float(fixed(_params())) == 0.0 and fixed.dual_signal is None
    # a floor of 0 and a floor / ceiling at lambda_init itself are accepted
    assert LambdaNetwork("sketch", 22, lambda_init=0.5, lambda_min=0.0).lambda_min == 0.0
    assert LambdaNetwork("sketch", 22, lambda_init=0.5, lambda_min=0.5, lambda_max=0.5).lambda_max == 0.5


def test_lambda_network_refusals_pinned_whole() -> None:
    def message(**kwargs) -> str:  # noqa: ANN003
        with pytest.raises(ValueError) as info:
            LambdaNetwork(**{"mode": "sketch", "num_edit_parameters": 22, **kwargs})
        return str(info.value)

    assert message(num_edit_parameters=0) == "LambdaNetwork: num_edit_parameters must be >= 1, got 0"
    assert message(lambda_init=-0.5) == "LambdaNetwork: lambda_init must be >= 0, got -0.5"
    assert message(lambda_init=1.0, lambda_max=0.5) == (
        "LambdaNetwork: lambda_max=0.5 is below lambda_init=1.0"
    )
    assert message(lambda_init=1.0, lambda_min=1.5) == (
        "LambdaNetwork: lambda_min=1.5 must be between 0 and lambda_init=1.0"
    )
    net = LambdaNetwork("params", 10, hidden_size=4)
    with pytest.raises(ValueError) as info:
        net(_params())
    assert str(info.value) == (
        "LambdaNetwork: built for 10 edit parameters, got 22; rebuild it for this adapter"
    )


def test_init_seed_alone_sets_the_initial_weights() -> None:
    a = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, seed=0, init_seed=7)
    b = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, seed=7)
    c = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, seed=0)
    assert a.init_seed == 7 and torch.equal(a.net[0].weight, b.net[0].weight)
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_initial_weights_are_uniform_in_the_fan_in_bound_drawn_in_order() -> None:
    """W1, b1, W2, b2 ~ U(±1/sqrt(fan_in)) drawn in that order from a CPU generator seeded ``init_seed``;
    the last layer zero but its bias. A first layer too large for one block (params mode, 300 000 inputs:
    blocks of 55 and 9 rows of the 64) is drawn in row blocks that give the same numbers as one draw."""
    import math

    for mode, n, hidden in (("sketch", 22, 8), ("params", 300_000, 64)):
        net = LambdaNetwork(mode, n, hidden_size=hidden, sketch_dim=4, init_seed=3)
        gen = torch.Generator().manual_seed(3)
        for layer in (net.net[0], net.net[2]):
            bound = 1.0 / math.sqrt(layer.in_features)
            weight = torch.rand(layer.out_features, layer.in_features, generator=gen) * (2 * bound) - bound
            bias = torch.rand(layer.out_features, generator=gen) * (2 * bound) - bound
            assert torch.allclose(layer.weight, weight, rtol=0, atol=1e-7)
            assert torch.allclose(layer.bias, bias, rtol=0, atol=1e-7)
        assert not net.net[4].weight.any()


def test_lambda_min_floors_the_softplus_parametrisations() -> None:
    for lambda_param in ("softplus", "scaled_softplus"):
        net = LambdaNetwork(
            "sketch",
            22,
            hidden_size=4,
            sketch_dim=4,
            lambda_init=0.5,
            lambda_min=0.2,
            lambda_param=lambda_param,
        )
        with torch.no_grad():
            net.net[4].bias.fill_(-20.0)  # far below the floor
        assert float(net(_params()).detach()) == pytest.approx(0.2)


def test_clear_dual_record_forgets_the_input_unless_told_to_keep_it() -> None:
    params = _params()
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.2)
    net(params)
    net.clear_dual_record(keep_input=True)
    assert net.dual_backward(penalty=2.0) == 2.0 and net.net[4].bias.grad is not None
    net(params)
    net.clear_dual_record()
    assert net.dual_backward(penalty=2.0) is None and net.net[4].bias.grad is None


def test_forward_in_float64_without_gradients_and_fixed_with_any_params() -> None:
    params = _params()
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.3).to(torch.float64)
    lam = net(params)
    assert lam.dtype == torch.float64 and float(lam.detach()) == pytest.approx(0.3)
    net.requires_grad_(False)  # gradients enabled, but nothing to record: no hook
    frozen = [p.detach() for p in params]
    assert float(net(frozen)) == pytest.approx(0.3) and net.dual_signal is None
    fixed = LambdaNetwork("fixed", 22, lambda_init=0.3)
    assert float(fixed([])) == pytest.approx(0.3) and float(fixed(params[:1])) == pytest.approx(0.3)


@pytest.mark.parametrize("memo", [True, False])
def test_network_sketch_and_fixed_lambda_live_on_the_device_they_are_given(
    monkeypatch: pytest.MonkeyPatch, memo: bool
) -> None:
    """The "meta" device stands in for an accelerator on a CPU-only machine: nothing may land on the CPU.
    The sketch is float32 whatever the default dtype."""
    _fresh_memo(monkeypatch, 1 << 20 if memo else 0)
    params = [
        torch.empty(3, 5, device="meta", requires_grad=True),
        torch.empty(7, device="meta", requires_grad=True),
    ]
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, device="meta")
    assert all(p.device.type == "meta" for p in net.parameters())
    out = count_sketch(params, 4, 0)
    assert out.device.type == "meta" and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad.device.type == "meta" for p in params)
    assert net(params).device.type == "meta"
    assert LambdaNetwork("fixed", 22)(params).device.type == "meta"
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert count_sketch([torch.ones(3, dtype=torch.float64)], 4, 0).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


# ----------------------------------------------------------------------------------------------------
# issue 20, session 8 part 2: mutation survivors of objective.py (build_lambda_network, dual_step, LossTerms)
# ----------------------------------------------------------------------------------------------------


def _config(**options):  # noqa: ANN202
    from peft import LoraConfig

    from odedit_hf.methods.odedit import ODEditConfig

    return ODEditConfig(editor=LoraConfig(target_modules=["x"]), **options)


def test_build_lambda_network_passes_every_setting_on() -> None:
    from odedit_hf.methods.odedit.objective import build_lambda_network

    config = _config(
        lambda_mode="sketch",
        lambda_hidden_size=6,
        sketch_dim=5,
        sketch_seed=7,
        lambda_init=0.5,
        lambda_max=3.0,
        lambda_min=0.01,
        lambda_lr=0.2,
    )
    net, opt = build_lambda_network(config, _params(), init_seed=11)
    assert (net.mode, net.num_edit_parameters, net.sketch_dim, net.seed, net.init_seed) == (
        "sketch",
        22,
        5,
        7,
        11,
    )
    assert (net.lambda_max, net.lambda_min) == (3.0, 0.01)
    assert (net.net[0].in_features, net.net[0].out_features, net.net[2].out_features) == (5, 6, 6)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.2 and opt.defaults["maximize"] is True
    assert net.net[0].weight.device.type == "cpu"
    on_meta, _ = build_lambda_network(config, _params(), torch.device("meta"), init_seed=11)
    assert on_meta.net[0].weight.device.type == "meta"
    # without the penalty λ is fixed at lambda_init and there is no dual optimiser
    fixed, none = build_lambda_network(
        _config(irm_penalty=False, lambda_mode="sketch"), _params(), init_seed=0
    )
    assert fixed.mode == "fixed" and fixed.net is None and none is None


def test_build_lambda_network_draws_its_init_seed_from_the_global_generator() -> None:
    from odedit_hf.methods.odedit.objective import build_lambda_network

    torch.manual_seed(123)
    net, _ = build_lambda_network(_config(sketch_seed=7), _params())
    torch.manual_seed(123)
    expected = int(torch.randint(0, 2**31 - 1, (1,)).item())
    assert net.init_seed == expected != 7
    torch.manual_seed(124)
    assert build_lambda_network(_config(sketch_seed=7), _params())[0].init_seed != expected


def _sketch_net() -> tuple[LambdaNetwork, torch.optim.Optimizer]:
    net = LambdaNetwork("sketch", 22, hidden_size=8, sketch_dim=4, lambda_init=0.2, lambda_param="log")
    return net, torch.optim.SGD(net.parameters(), lr=0.1, maximize=True)


def _weights(net: LambdaNetwork) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def test_dual_step_without_an_optimiser_or_a_network_does_nothing() -> None:
    params = _params()
    net, _ = _sketch_net()
    before = _weights(net)
    (net(params) * torch.tensor(3.0)).backward()
    assert dual_step(net, None) is False
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(net)))
    fixed = LambdaNetwork("fixed", 22, lambda_init=0.5)
    dummy = torch.nn.Parameter(torch.ones(2))
    dummy.grad = torch.ones(2)
    assert dual_step(fixed, torch.optim.SGD([dummy], lr=1.0, maximize=True)) is False
    assert torch.equal(dummy.detach(), torch.ones(2))


def test_dual_step_uses_the_penalty_given_instead_of_the_recorded_one() -> None:
    params = _params()
    given, opt = _sketch_net()
    (given(params) * torch.tensor(3.0)).backward()  # records P = 3
    assert dual_step(given, opt, penalty=1.0)
    recorded, opt = _sketch_net()
    (recorded(params) * torch.tensor(1.0)).backward()  # records P = 1
    assert dual_step(recorded, opt)
    other, opt = _sketch_net()
    (other(params) * torch.tensor(3.0)).backward()
    assert dual_step(other, opt)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(_weights(given), _weights(recorded)))
    assert not all(torch.allclose(a, b, atol=1e-7) for a, b in zip(_weights(given), _weights(other)))


def test_dual_step_reduces_every_gradient_before_stepping() -> None:
    params = _params()
    plain, opt = _sketch_net()
    start = _weights(plain)
    (plain(params) * torch.tensor(3.0)).backward()
    assert dual_step(plain, opt)
    seen: list[torch.Tensor] = []

    def double(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return 2 * t

    reduced, opt = _sketch_net()
    (reduced(params) * torch.tensor(3.0)).backward()
    assert dual_step(reduced, opt, reduce=double)
    assert len(seen) == len(start) and any(bool(t.abs().sum() > 0) for t in seen)
    for s, a, b in zip(start, _weights(plain), _weights(reduced)):
        assert torch.allclose(b - s, 2 * (a - s), atol=1e-7)
    assert all(p.grad is None for p in reduced.parameters())
    # nothing recorded: every process still steps (collectives must match), on zero gradients
    seen.clear()
    idle, opt = _sketch_net()
    before = _weights(idle)
    assert dual_step(idle, opt, reduce=double) is True
    assert len(seen) == len(before) and all(torch.equal(t, torch.zeros_like(t)) for t in seen)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(idle)))


def test_dual_step_without_a_signal_drops_stale_gradients() -> None:
    net, opt = _sketch_net()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    assert dual_step(net, opt) is False
    assert all(p.grad is None for p in net.parameters())


def test_loss_terms_as_floats_names_every_term() -> None:
    from odedit_hf.methods.odedit.objective import LossTerms

    terms = LossTerms(
        total=torch.tensor(3.0),
        r_rel=torch.tensor(1.0),
        r_loc=torch.tensor(0.5),
        penalty=torch.tensor(0.25),
        lam=torch.tensor(2.0),
        omega_grads={"ood": torch.tensor(-0.5)},
    )
    assert terms.as_floats() == {
        "loss": 3.0,
        "r_rel": 1.0,
        "r_loc": 0.5,
        "penalty": 0.25,
        "lambda": 2.0,
        "g_ood": -0.5,
    }

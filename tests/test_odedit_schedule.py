"""EditSchedule: warm-up with the penalty off, then a primal–dual phase with a budget and a stop test."""

from __future__ import annotations

import pytest

from odedit_hf.methods.odedit.schedule import EditSchedule
from tests import test_odedit_method as _method_tests


def _drive(schedule: EditSchedule, r_rel: list[float], penalty: list[float]) -> tuple[list[float], int]:
    """Penalty weights until the schedule stops (r_rel/penalty per step; the last value repeats)."""
    schedule.reset()
    weights = []
    for step in range(schedule.total_steps + 1):
        i = min(step, len(r_rel) - 1)
        # the stop test first, as PrimalDualObjective calls it: it decides when the warm-up ends
        stop = schedule.should_stop(step, r_rel[i], penalty[min(step, len(penalty) - 1)])
        weights.append(schedule.penalty_weight(step))
        if stop:
            return weights, step
    raise AssertionError("the schedule never stopped within total_steps")


def test_warmup_runs_with_weight_zero_then_the_penalty_acts() -> None:
    s = EditSchedule(warmup_steps=3, penalty_steps=4, stop_rel=0.1, warmup_until_fit=False)
    weights, stop = _drive(s, [5.0] * 10, [1.0])
    assert weights == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert stop == 7 == s.total_steps  # 3 warm-up + 4 primal-dual steps, then the budget ends it
    assert not s.dual_active(2) and s.dual_active(3)


def test_warmup_ends_once_the_edit_is_in_and_the_penalty_still_acts() -> None:
    s = EditSchedule(warmup_steps=10, penalty_steps=5, stop_rel=0.1, min_penalty_steps=2)
    # R_rel below τ from step 1: step 1 is already a primal-dual step (no extra plain step once the edit
    # is in), then two penalty steps before the stop
    weights, stop = _drive(s, [3.0, 0.05], [0.5])
    assert s.penalty_start == 1
    assert weights == [0.0, 1.0, 1.0, 1.0] and stop == 3
    assert not s.dual_active(0) and s.dual_active(1) and s.stopped_by_rule


def test_stop_needs_both_reliability_and_a_small_penalty() -> None:
    s = EditSchedule(warmup_steps=0, penalty_steps=20, stop_rel=0.1, stop_penalty=0.2)
    r_rel = [2.0, 0.05, 0.05, 0.05, 0.05, 0.05]
    penalty = [9.0, 3.0, 1.0, 0.5, 0.1]
    assert _drive(s, r_rel, penalty)[1] == 4
    # no penalty condition: the first step with R_rel < τ (after min_penalty_steps = 1) stops it
    assert _drive(EditSchedule(penalty_steps=20, stop_rel=0.1), r_rel, penalty)[1] == 1
    # a penalty that stays large runs the phase's whole budget
    assert _drive(s, r_rel, [5.0])[1] == 20


def test_an_unfitted_warmup_ends_the_edit_when_the_penalty_needs_a_fit() -> None:
    # R_rel never below τ: with penalty_needs_fit the edit ends after the warm-up's budget, as the editor's
    # own loop would, instead of starting the primal-dual game from an unlikely target
    s = EditSchedule(warmup_steps=3, penalty_steps=4, stop_rel=0.1, penalty_needs_fit=True)
    weights, stop = _drive(s, [5.0] * 10, [100.0])
    assert stop == 3 and weights == [0.0, 0.0, 0.0, 1.0] and not s.stopped_by_rule
    # fitted by the last warm-up step: the primal-dual phase runs
    s = EditSchedule(
        warmup_steps=3, penalty_steps=4, stop_rel=0.1, penalty_needs_fit=True, warmup_until_fit=False
    )
    weights, stop = _drive(s, [5.0, 5.0, 5.0, 0.05], [0.1])
    assert stop == 4 and weights[3] == 1.0 and s.stopped_by_rule


def test_schedule_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="penalty_steps must be an int >= 1"):
        EditSchedule(penalty_steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        EditSchedule(warmup_steps=-1)
    with pytest.raises(ValueError, match="stop_penalty must be a finite number > 0"):
        EditSchedule(stop_penalty=0.0)
    with pytest.raises(ValueError, match="exceeds penalty_steps"):
        EditSchedule(penalty_steps=2, min_penalty_steps=3)


# ---------------------------------------------------------------------------------------------------------
# The schedule wired into ODEditMethod / PrimalDualObjective (tiny random LLaVA)

requests = _method_tests.requests  # the module-scoped fixture of two requests on the tiny LLaVA
_backbone, _editor, _wrap, build_edit_batch = (
    _method_tests._backbone,
    _method_tests._editor,
    _method_tests._wrap,
    _method_tests.build_edit_batch,
)


def _step_zero_grads(config_options: dict, schedule: EditSchedule, requests_: list) -> tuple[list, object]:  # noqa: ANN001
    """Gradients of step 0's loss over the edit parameters, and the λ-network, for one fresh FT-L edit."""
    import torch

    from odedit_hf.methods.odedit.method import ODEditMethod, PrimalDualObjective
    from odedit_hf.methods.odedit.objective import ODEditObjective, build_lambda_network

    torch.manual_seed(0)
    backbone = _backbone()
    method = ODEditMethod(_editor("ft"), objective=config_options)
    peft_model, _, _ = _wrap(method, backbone)
    config = peft_model.peft_config[peft_model.active_adapter]
    params = method.edit_parameters(peft_model)
    lambda_net, dual_optimizer = build_lambda_network(config, params, init_seed=0)
    step = PrimalDualObjective(
        ODEditObjective(config, backbone),
        method.editor,
        peft_model,
        build_edit_batch(backbone, requests_, config),
        params,
        lambda_net,
        dual_optimizer,
        first_is_pre_edit=True,
        schedule=schedule,
    )
    total, _, _ = step(0)
    assert not step.should_stop(0, total)
    grads = torch.autograd.grad(total, params)
    return [g.clone() for g in grads], (lambda_net, dual_optimizer, step)


def test_no_penalty_gradient_during_the_warmup(requests) -> None:  # noqa: ANN001
    """A warm-up step's gradient is that of R alone (irm_penalty off); from step 0 the penalty changes it."""
    import torch

    from odedit_hf.methods.odedit.objective import dual_step

    opts = {"lambda_init": 1.0, "lambda_mode": "sketch"}
    warm, (lambda_net, dual_optimizer, step) = _step_zero_grads(
        opts, EditSchedule(warmup_steps=3, penalty_steps=2, stop_rel=None), requests[:1]
    )
    plain, _ = _step_zero_grads(
        {**opts, "irm_penalty": False},
        EditSchedule(warmup_steps=3, penalty_steps=2, stop_rel=None),
        requests[:1],
    )
    penalised, _ = _step_zero_grads(opts, EditSchedule.from_start(5, None), requests[:1])
    for w, p in zip(warm, plain):
        torch.testing.assert_close(w, p, rtol=1e-5, atol=1e-7)
    diff = max(float((w - p).abs().max()) for w, p in zip(warm, penalised))
    scale = max(float(w.abs().max()) for w in warm)
    assert diff > 1e-2 * scale, "λ·P (λ 1.0, P large at step 0) should change the step-0 gradient"
    # and the λ-network is left alone in the warm-up: no dual step, no change of λ
    before = [p.detach().clone() for p in lambda_net.parameters()]
    step.after_optimizer_step(0)
    assert step.trace["dual_steps"] == 0
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, lambda_net.parameters()))
    assert not dual_step(lambda_net, dual_optimizer, skip=not step.schedule.dual_active(0))


def _edit(requests_: list, editor_stop_loss: float | None, **options) -> tuple[object, dict]:  # noqa: ANN001, ANN003
    from odedit_hf.editors.ftl import FTLMethod
    from odedit_hf.methods.odedit.method import ODEditMethod

    backbone = _backbone()
    method = ODEditMethod(FTLMethod(steps=12, lr=2e-3, stop_loss=editor_stop_loss), objective=options)
    peft_model, _, _ = _wrap(method, backbone)
    stats = method.edit(peft_model, backbone, requests_)
    return stats, method.last_edit_trace


def test_warmup_schedule_runs_its_phases_and_stop_rule_in_the_method(requests) -> None:  # noqa: ANN001
    warm = {"schedule": "warmup", "lambda_param": "log", "dual_slack": 0.5, "lambda_init": 0.1}
    # no stop rule (editor stop_loss None): the whole warm-up, then the whole primal-dual budget
    stats, trace = _edit(requests[:1], None, **warm, warmup_steps=3, penalty_steps=4)
    assert stats.steps == 7 and not stats.stopped_early
    assert (trace["warmup_steps"], trace["penalty_steps"], trace["dual_steps"]) == (3, 4, 4)
    assert trace["lambda_start"] == pytest.approx(0.1) and trace["lambda_end"] != pytest.approx(0.1, rel=1e-3)
    # R_rel below τ from step 0 (τ = 100): the warm-up ends at once, min_penalty_steps steps, then the stop
    stats, trace = _edit(requests[:1], 100.0, **warm, min_penalty_steps=2, stop_penalty=1e6)
    assert stats.steps == 2 and stats.stopped_early
    assert (trace["warmup_steps"], trace["penalty_steps"], trace["dual_steps"]) == (0, 2, 2)
    # ... unless P stays above stop_penalty: the primal-dual budget runs out (not a stop by the rule)
    stats, trace = _edit(requests[:1], 100.0, **warm, penalty_steps=3, stop_penalty=1e-12)
    assert stats.steps == 3 and not stats.stopped_early and trace["penalty_steps"] == 3
    # a fixed λ: the same phases, no dual step, λ stays at lambda_init
    stats, trace = _edit(requests[:1], None, **warm, lambda_mode="fixed", warmup_steps=2, penalty_steps=2)
    assert stats.steps == 4 and trace["dual_steps"] == 0 and trace["lambda_end"] == pytest.approx(0.1)
    # the original schedule: penalty and dual step from step 0, the editor's own budget
    stats, trace = _edit(requests[:1], None, schedule="from_start", lambda_init=0.1)
    assert stats.steps == 12 and trace["dual_steps"] == 12 and trace["warmup_steps"] == 0
    # warmup_steps None (default): the warm-up gets the editor's own budget (12), then the primal-dual one
    stats, trace = _edit(requests[:1], None, **warm)
    assert stats.steps == 22 and (trace["warmup_steps"], trace["penalty_steps"]) == (12, 10)


def test_a_dual_step_at_the_defaults_moves_lambda_measurably() -> None:
    """At ODEditConfig's defaults, one dual step with the penalty of an edit's start (P = 100) raises λ
    by a measurable amount; with a slack, a penalty below it lowers λ."""
    import torch
    from peft import LoraConfig

    from odedit_hf.methods.odedit.config import ODEditConfig
    from odedit_hf.methods.odedit.objective import build_lambda_network, dual_step

    config = ODEditConfig(editor=LoraConfig(target_modules=["x"]))
    params = [torch.nn.Parameter(torch.randn(64, 32))]
    cases = [(100.0, +1)] + ([(config.dual_slack / 10, -1)] if config.dual_slack > 0 else [])
    for penalty, direction in cases:
        lambda_net, optimizer = build_lambda_network(config, params, init_seed=0)
        lam0 = float(lambda_net(params).detach())
        lam = lambda_net(params)
        (lam * penalty).backward()
        assert dual_step(lambda_net, optimizer)
        lam1 = float(lambda_net(params).detach())
        assert lam0 == pytest.approx(config.lambda_init, rel=1e-5)
        assert direction * (lam1 - lam0) / lam0 > MEASURABLE, (penalty, lam0, lam1)


#: the smallest relative change of λ per dual step that counts as measurable (a λ that moves by 1 % per
#: step moves by ~|log 1.01^k| = 0.1 over an edit of k = 10 primal-dual steps)
MEASURABLE = 0.01


def test_every_schedule_option_is_a_generated_cli_option() -> None:
    from odedit_hf.cli.options import method_options, parse_method_options
    from odedit_hf.editing import build_method
    from odedit_hf.methods.odedit.config import ODEDIT_CONFIG_VERSION

    fields = {o.field for o in method_options("odedit")}
    needed = {"schedule", "warmup_steps", "penalty_steps", "min_penalty_steps", "stop_penalty"}
    needed |= {"lambda_mode", "irm_penalty", "lambda_param", "dual_slack", "lambda_init"}
    assert needed <= fields
    options = parse_method_options(
        "odedit+ft",
        [
            "--odedit.schedule", "warmup",
            "--odedit.warmup-steps", "4",
            "--odedit.penalty-steps", "3",
            "--odedit.min-penalty-steps", "2",
            "--odedit.stop-penalty", "none",
            "--odedit.lambda-mode", "fixed",
            "--odedit.irm-penalty", "false",
        ],
    )  # fmt: skip
    method = build_method("odedit+ft", options)
    assert method.objective == {
        "schedule": "warmup",
        "warmup_steps": 4,
        "penalty_steps": 3,
        "min_penalty_steps": 2,
        "stop_penalty": None,
        "lambda_mode": "fixed",
        "irm_penalty": False,
    }
    config = method.peft_config(_backbone())
    assert (config.schedule, config.warmup_steps, config.penalty_steps, config.stop_penalty) == (
        "warmup",
        4,
        3,
        None,
    )
    resolved = method.resolved_config()
    assert resolved["config_version"] == ODEDIT_CONFIG_VERSION
    assert resolved["options"]["schedule"] == "warmup" and resolved["options"]["min_penalty_steps"] == 2
    defaults = build_method("odedit+ft", {}).resolved_config()["options"]
    assert {"schedule", "warmup_steps", "penalty_steps", "stop_penalty", "lambda_param"} <= set(defaults)
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_method(
            "odedit+ft", parse_method_options("odedit+ft", ["--odedit.schedule", "paper"])
        ).peft_config(_backbone())
    with pytest.raises(ValueError, match="min_penalty_steps=5 exceeds penalty_steps=3"):
        build_method("odedit+ft", {"odedit": {"min_penalty_steps": 5, "penalty_steps": 3}}).peft_config(
            _backbone()
        )

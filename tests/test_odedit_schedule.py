"""EditSchedule: warm-up with the penalty off, then a primal–dual phase with a budget and a stop test."""

from __future__ import annotations

import pytest

from odedit_hf.methods.odedit.schedule import EditSchedule


def _drive(schedule: EditSchedule, r_rel: list[float], penalty: list[float]) -> tuple[list[float], int]:
    """Penalty weights until the schedule stops (r_rel/penalty per step; the last value repeats)."""
    schedule.reset()
    weights = []
    for step in range(schedule.total_steps + 1):
        weights.append(schedule.penalty_weight(step))
        i = min(step, len(r_rel) - 1)
        if schedule.should_stop(step, r_rel[i], penalty[min(step, len(penalty) - 1)]):
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
    # R_rel below τ from step 1: the warm-up ends after step 1, then two penalty steps before the stop
    weights, stop = _drive(s, [3.0, 0.05], [0.5])
    assert s.penalty_start == 2
    assert weights == [0.0, 0.0, 1.0, 1.0, 1.0] and stop == 4


def test_stop_needs_both_reliability_and_a_small_penalty() -> None:
    s = EditSchedule(warmup_steps=0, penalty_steps=20, stop_rel=0.1, stop_penalty=0.2)
    r_rel = [2.0, 0.05, 0.05, 0.05, 0.05, 0.05]
    penalty = [9.0, 3.0, 1.0, 0.5, 0.1]
    assert _drive(s, r_rel, penalty)[1] == 4
    # no penalty condition: the first step with R_rel < τ (after min_penalty_steps = 1) stops it
    assert _drive(EditSchedule(penalty_steps=20, stop_rel=0.1), r_rel, penalty)[1] == 1
    # a penalty that stays large runs the phase's whole budget
    assert _drive(s, r_rel, [5.0])[1] == 20


def test_schedule_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="penalty_steps must be an int >= 1"):
        EditSchedule(penalty_steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        EditSchedule(warmup_steps=-1)
    with pytest.raises(ValueError, match="stop_penalty must be a finite number > 0"):
        EditSchedule(stop_penalty=0.0)
    with pytest.raises(ValueError, match="exceeds penalty_steps"):
        EditSchedule(penalty_steps=2, min_penalty_steps=3)

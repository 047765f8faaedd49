"""The time budget's arithmetic: what fits, what is kept for the end, and when it plans."""

from __future__ import annotations

import pytest
from maskrcnn.train.budget import MEASURE_STEPS, REPLAN_STEPS, SKIP_STEPS, BudgetPlanner

pytestmark = pytest.mark.unit


def planner(seconds: float = 100.0, full: int = 1000, per_epoch: int = 10, val: int = 0) -> BudgetPlanner:
    return BudgetPlanner(
        seconds,
        started=0.0,
        full_steps=full,
        steps_per_epoch=per_epoch,
        evaluates=(1, 100),
        val_images=val,
        images_per_step=4,
    )


def feed(budget: BudgetPlanner, steps: int, step_s: float, eval_s: float = 0.0, per_epoch: int = 10) -> float:
    now = 0.0
    for step in range(1, steps + 1):
        now += step_s + (eval_s if step > 1 and (step - 1) % per_epoch == 0 else 0.0)
        budget.record(step, (step - 1) % per_epoch + 1, now)
    return now


def cost(budget: BudgetPlanner, step: int, end: int, step_s: float = 0.5, eval_s: float = 3.0) -> float:
    """What training from ``step`` to ``end`` takes: its steps and the evaluations on the way."""
    return (end - step) * step_s + budget.evaluations_before(step, end) * eval_s


def test_the_plan_leaves_the_reserve_and_every_evaluation_free() -> None:
    budget = planner(seconds=100.0)
    now = feed(budget, 25, step_s=0.5, eval_s=3.0)  # two epoch ends seen: evaluations of 3 s
    assert abs(budget.step_seconds() - 0.5) < 1e-9 and abs(budget.eval_seconds() - 3.0) < 1e-9
    end = budget.plan(25, now)
    took = cost(budget, 25, end)
    assert took <= 100.0 - now - budget.reserve_seconds() < took + 0.5 + 3.0  # as many as fit, no more
    assert 25 < end < 1000


def test_a_plan_after_an_epochs_last_step_keeps_time_for_that_epochs_evaluation() -> None:
    # A plan due at step 30, the last of the third 10-step epoch: that epoch's evaluation runs after the plan.
    # Left out, the plan spends its time on steps, and the next one (after the evaluation) has to cut the
    # end to the step it is at, on a schedule that was not annealed there (CI, 2026-12-07: lr at 4 % of peak).
    budget = planner(seconds=100.0)
    now = feed(budget, 30, step_s=0.5, eval_s=3.0)
    assert budget.evaluations_before(30, 35) == 1 and budget.evaluations_before(31, 35) == 0
    end = budget.plan(30, now)
    assert cost(budget, 30, end) <= 100.0 - now - budget.reserve_seconds()
    # The next plan, after the evaluation it kept time for, finds the same end.
    now += 3.0 + 0.5
    budget.record(31, 1, now)
    assert budget.plan(31, now) == end


def test_a_budget_never_lengthens_the_job() -> None:
    budget = planner(seconds=10_000.0, full=40)
    now = feed(budget, 12, step_s=0.1)
    assert budget.plan(12, now) == 40


def test_no_time_left_plans_no_further_step() -> None:
    budget = planner(seconds=10.0)
    now = feed(budget, 12, step_s=0.5)
    assert budget.plan(12, now) == 12
    assert budget.out_of_time(now)


def test_before_an_evaluation_was_measured_it_is_estimated_from_the_step_time() -> None:
    budget = planner(val=40)  # 40 images at 0.5 s a step of 4: 5 s
    feed(budget, 9, step_s=0.5)
    assert abs(budget.eval_seconds() - 5.0) < 1e-9


def test_every_rank_plans_at_the_same_steps() -> None:
    budget = planner()
    first = SKIP_STEPS + MEASURE_STEPS
    due = [s for s in range(1, 40) if budget.due(s, (s - 1) % 10 + 1)]
    # measured, then every REPLAN_STEPS steps and each epoch's first step (its end measured)
    assert REPLAN_STEPS == 10 and due == [first, 11, 20, 21, 30, 31]


def test_a_slow_start_is_corrected_within_the_first_epoch() -> None:
    # The first steps share the CPU with another process (5 s a step), then run at 0.2 s: the first plan
    # is short, and a plan 30 steps later, still in the first of 100-step epochs, follows the real speed.
    budget = planner(seconds=400.0, full=1000, per_epoch=100)
    now, plans = 0.0, {}
    for step in range(1, 61):
        now += 5.0 if step <= SKIP_STEPS + MEASURE_STEPS else 0.2
        budget.record(step, step, now)
        if budget.due(step, step):
            plans[step] = budget.plan(step, now)
    first = SKIP_STEPS + MEASURE_STEPS
    assert plans[first] < 80  # 5 s a step: a few dozen steps fit
    assert plans[60] == 1000  # 0.2 s a step: the whole unbudgeted plan fits in what is left


def test_a_plan_is_logged_when_it_moved_the_end_not_for_every_jitter() -> None:
    budget = planner()
    assert budget.worth_telling(1000)  # the first plan
    assert not budget.worth_telling(1030)  # 3 % from the last one told
    assert budget.worth_telling(1060)  # 6 %
    assert not budget.worth_telling(1020)  # 3.8 % from 1060


def test_a_restart_plans_at_its_first_step_with_what_the_attempt_before_it_measured() -> None:
    # The first attempt measured 0.5 s a step and 3 s an epoch end, and was stopped at step 25, 60 s into a
    # 100-s budget. Its restart has 40 s left: too few to spend ten steps measuring before the first plan.
    first = planner(seconds=100.0)
    feed(first, 25, step_s=0.5, eval_s=3.0)
    restart = BudgetPlanner(
        100.0,
        started=-60.0,  # the first attempt's runtime, counted against the budget
        full_steps=1000,
        steps_per_epoch=10,
        evaluates=(1, 100),
        val_images=0,
        images_per_step=4,
        first_step=25,
        prior=first.measurements(),
    )
    assert restart.due(26, 6)  # its first step
    restart.record(26, 6, 0.6)
    end = restart.plan(26, 0.6)
    assert restart.step_seconds() == 0.5 and restart.eval_seconds() == 3.0
    took = cost(restart, 26, end)
    assert took <= 100.0 - 60.6 - restart.reserve_seconds() < took + 0.5 + 3.0  # as many as fit, no more
    # Its own steps replace the earlier step time as they come; the earlier largest epoch end still counts.
    for step in range(27, 40):
        restart.record(step, (step - 1) % 10 + 1, 0.6 + (step - 26) * 0.25)
    assert restart.step_seconds() == 0.25 and restart.eval_seconds() >= 3.0


def test_a_job_without_an_earlier_attempt_measures_before_it_plans() -> None:
    budget = planner()
    assert budget.measurements() == {"step_seconds": 0.0, "eval_seconds": 0.0}
    assert not budget.due(1, 1)

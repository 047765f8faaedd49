"""A training time budget (``max_runtime``): how many steps fit, leaving time to evaluate and write the model.

SageMaker stops a job at ``StoppingCondition.MaxRuntimeInSeconds`` (SIGTERM, then SIGKILL); a job stopped
there has a checkpoint but no model. With ``max_runtime`` the job instead plans to end inside the budget:
it times its own steps (``MEASURE_STEPS`` of them, after ``SKIP_STEPS`` that allocate memory and pick
kernels), then plans the number of steps N for which

    N x seconds per step + evaluations before the end x seconds per evaluation + final reserve <= time left

and sizes the learning-rate schedule to N, so it anneals to its end inside the budget. It plans again every
``REPLAN_STEPS`` steps and at every epoch's first step, with what it measured meanwhile (the median of the
recent steps, an evaluation's real cost), so a wrong first estimate (a start slowed by another process) is
corrected while there is schedule left to correct. N never exceeds the plan without a
budget (``epochs``, ``max_steps``): a budget caps a job, it never lengthens one.

A restarted job (the same job resuming its checkpoint after a Spot interruption or a retry) starts with what
the attempts before it measured (:meth:`BudgetPlanner.measurements`, kept in the checkpoint) and plans at its
first step: what is left of the budget may be too short to measure ten steps before planning.

The clock starts when the ``train`` process starts (SageMaker's also counts the data download before it:
the workflow passes ``MaxRuntimeInSeconds`` minus a margin for that). Pure arithmetic, no torch: the
training loop feeds it timestamps and step numbers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

SKIP_STEPS = 2  # the first steps allocate memory and pick kernels: slower than the rest
MEASURE_STEPS = 8  # steps timed before the first plan
REPLAN_STEPS = 10  # plans again this often (and at each epoch's first step)
RECENT_STEPS = 50  # the step time is the median of this many recent steps: robust to a stall, follows a change
TELL_SHARE = 0.05  # a new plan is logged when it moved the end by this share since the last one logged
WRITE_SECONDS = 5.0  # writing the model, metrics.json and metrics.png, and the process's exit
SAFETY_SHARE = 0.03  # of the budget, kept free for jitter (a slower step, a slower disk)
EVAL_FLOOR_SECONDS = 2.0  # the least an evaluation is assumed to cost before one was measured


@dataclass
class BudgetPlanner:
    """Turns step timestamps into a step plan; one per training process (ranks agree on the minimum)."""

    seconds: float  # max_runtime
    started: float  # time.monotonic() when the process started
    full_steps: int  # the plan without a budget
    steps_per_epoch: int
    evaluates: tuple[int, int]  # (eval_every, epochs): which epoch ends evaluate
    val_images: int
    images_per_step: int
    first_step: int = 0  # the step training started from (a resumed job plans from there)
    prior: dict[str, float] = field(default_factory=dict)  # a restarted job's earlier measurements
    step_times: list[float] = field(default_factory=list)
    epoch_overheads: list[float] = field(default_factory=list)
    _last: tuple[int, float] | None = None  # (global step, time) of the previous step
    _told: int | None = None  # the last plan logged

    def record(self, global_step: int, step_in_epoch: int, now: float) -> None:
        """One finished step: a step's own time, or, across an epoch's end, that end's overhead."""
        if self._last is not None and global_step == self._last[0] + 1:
            interval = now - self._last[1]
            if step_in_epoch == 1:  # the previous step ended the last epoch: checkpoint, evaluation, loader start
                self.epoch_overheads.append(max(interval - self.step_seconds(), 0.0))
            elif global_step > self.first_step + SKIP_STEPS:
                self.step_times.append(interval)
        self._last = (global_step, now)

    def due(self, global_step: int, step_in_epoch: int) -> bool:
        """Whether to plan after this step; depends on step numbers only, so every rank plans at the same one."""
        if self.prior.get("step_seconds") and global_step == self.first_step + 1:
            return True  # a restart plans at once, with the step time measured before it
        measured = self.first_step + SKIP_STEPS + MEASURE_STEPS
        later = global_step > measured and (step_in_epoch == 1 or (global_step - measured) % REPLAN_STEPS == 0)
        return global_step == measured or later

    def step_seconds(self) -> float:
        if self.step_times:
            return statistics.median(self.step_times[-RECENT_STEPS:])
        return self.prior.get("step_seconds", 0.0)

    def measurements(self) -> dict[str, float]:
        """What a restart of this job starts from (see ``prior``): the step time and the largest epoch end."""
        return {"step_seconds": self.step_seconds(), "eval_seconds": max(self._overheads(), default=0.0)}

    def _overheads(self) -> list[float]:
        """The epoch ends measured, an earlier attempt's largest included."""
        earlier = self.prior.get("eval_seconds", 0.0)
        return [*self.epoch_overheads, earlier] if earlier else self.epoch_overheads

    def eval_seconds(self) -> float:
        """An epoch end's cost: the largest measured, else predicting each validation image is assumed to
        cost as much as training one (the forward pass alone is cheaper, scoring and mask pasting add some)."""
        if overheads := self._overheads():
            return max(overheads)
        per_image = self.step_seconds() / max(self.images_per_step, 1)
        return max(EVAL_FLOOR_SECONDS, self.val_images * per_image)

    def reserve_seconds(self) -> float:
        """Kept for the end: the final evaluation, writing the model, and a share of the budget for jitter."""
        return self.eval_seconds() + WRITE_SECONDS + SAFETY_SHARE * self.seconds

    def evaluations_before(self, global_step: int, end: int) -> int:
        """Evaluating epoch ends from ``global_step`` on and before ``end`` (the final one is in the reserve).
        A plan made after an epoch's last step counts that epoch's end: its evaluation runs after the plan."""
        eval_every, epochs = self.evaluates
        first = max(-(-global_step // self.steps_per_epoch), 1)  # the first epoch end at or after global_step
        last = min((end - 1) // self.steps_per_epoch, epochs - 1)  # an epoch end before ``end``
        return sum(1 for epoch in range(first, last + 1) if epoch % eval_every == 0)

    def plan(self, global_step: int, now: float) -> int:
        """The last step to train to: as many as fit in the time left, at most ``full_steps``."""
        step = self.step_seconds()
        left = self.seconds - (now - self.started) - self.reserve_seconds()
        if step <= 0:
            return self.full_steps

        def cost(end: int) -> float:
            return (end - global_step) * step + self.evaluations_before(global_step, end) * self.eval_seconds()

        if cost(self.full_steps) <= left:
            return self.full_steps
        low, high = global_step, self.full_steps  # cost(low) = 0 fits (or nothing does), cost(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if cost(middle) <= left else (low, middle)
        return low

    def worth_telling(self, planned: int) -> bool:
        """Whether a new plan is news: the first, or one that moved the end by ``TELL_SHARE`` since the last
        one told (every plan moves the schedule; jitter of a few steps is not worth a line each time)."""
        if self._told is None or abs(planned - self._told) >= TELL_SHARE * self._told:
            self._told = planned
            return True
        return False

    def out_of_time(self, now: float) -> bool:
        """The last resort: not even one more step fits before the final evaluation (the plan ran slow)."""
        left = self.seconds - (now - self.started)
        return left < self.step_seconds() + self.eval_seconds() + WRITE_SECONDS


def describe(seconds: float, step_seconds: float, planned: int, was: int) -> str:
    """The line a person reads to see what the budget did (local/training.py reads ``planning N steps``)."""
    per_step = f"{step_seconds:.3g}" if math.isfinite(step_seconds) else "?"
    return f"budget: max_runtime={seconds:g} s, measured {per_step} s/step, planning {planned} steps (was {was})"

"""The learning-rate schedule, the resume sampler and the checkpoint round trip, each on its own.

The SIGTERM integration tests show a stopped job ends where an uninterrupted one does; these name the part
that broke when one of them fails.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from maskrcnn.train import checkpoint
from maskrcnn.train.config import Hyperparameters
from maskrcnn.train.engine import LoopState, make_optimizer, make_scheduler
from maskrcnn.train.job import SkipSampler

pytestmark = pytest.mark.unit


def lrs(hp: Hyperparameters, steps_per_epoch: int, total, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    """The lr each of ``steps`` optimizer steps runs with."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=hp.lr)
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch, total)
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    seen.append(scheduler.get_last_lr()[0])
    return seen


def advance(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()


def hp(**values: str) -> Hyperparameters:
    return Hyperparameters.from_strings({"lr": "0.1", "warmup_steps": "10", "warmup_factor": "0.01", **values})


def test_cosine_warms_up_linearly_then_anneals_to_zero_at_the_last_step() -> None:
    seen = lrs(hp(), 10, 110, 110)
    assert seen[0] == pytest.approx(0.001)  # lr x warmup_factor
    assert seen[5] == pytest.approx(0.1 * (0.01 * 0.5 + 0.5))  # halfway up, linearly
    assert seen[10] == pytest.approx(0.1)  # the peak when warm-up ends
    assert seen[60] == pytest.approx(0.05)  # half the cosine: half the peak
    after = seen[10:]
    assert all(b < a for a, b in itertools.pairwise(after))  # strictly decreasing to the end
    assert seen[110] == pytest.approx(0.0, abs=1e-12)


def test_a_replanned_length_anneals_at_the_new_end() -> None:
    """A time budget moves the end while the job runs: the cosine follows it and still ends at zero."""
    plan = {"total": 200}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer, hp(), 10, lambda: plan["total"])
    advance(optimizer, scheduler, 50)
    before = scheduler.get_last_lr()[0]
    plan["total"] = 80
    advance(optimizer, scheduler, 30)
    assert before == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 40 / 190)))  # on the old plan
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_a_plan_shorter_than_the_warm_up_still_anneals_to_zero() -> None:
    """A tight budget (or a small max_steps) can plan fewer steps than warmup_steps: the warm-up then takes half
    the plan, so the schedule still peaks and anneals to zero at the last step instead of ending mid-warm-up."""
    seen = lrs(hp(warmup_steps="50"), 10, 20, 20)
    assert seen[0] == pytest.approx(0.001)
    assert seen[10] == pytest.approx(0.1)  # the peak, halfway through the plan
    assert all(b < a for a, b in itertools.pairwise(seen[10:]))
    assert seen[20] == pytest.approx(0.0, abs=1e-12)
    # The same when a budget shortens a longer plan after the job started.
    plan = {"total": 1000}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer, hp(warmup_steps="50"), 10, lambda: plan["total"])
    advance(optimizer, scheduler, 10)
    plan["total"] = 40
    advance(optimizer, scheduler, 30)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_multistep_divides_at_its_epochs_and_constant_stays() -> None:
    seen = lrs(hp(lr_schedule="multistep", lr_steps="[2, 3]", lr_gamma="0.1"), 10, 40, 40)
    assert seen[19] == pytest.approx(0.1) and seen[20] == pytest.approx(0.01)
    assert seen[29] == pytest.approx(0.01) and seen[30] == pytest.approx(0.001)
    flat = lrs(hp(lr_schedule="constant"), 10, 40, 40)
    assert set(map(lambda v: round(v, 12), flat[10:])) == {0.1}


def test_multistep_built_before_the_job_has_planned_divides_at_its_epochs() -> None:
    """The job builds its scheduler while its plan is still 0 (LambdaLR calls the factor at once) and plans
    afterwards: multistep failed there with ZeroDivisionError, and must count epochs of the plan it then gets."""
    plan = {"total": 0}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer, hp(lr_schedule="multistep", lr_steps="[2, 3]"), 10, lambda: plan["total"])
    plan["total"] = 40
    seen = []
    for _ in range(40):
        optimizer.step()
        scheduler.step()
        seen.append(scheduler.get_last_lr()[0])
    assert seen[18] == pytest.approx(0.1) and seen[19] == pytest.approx(0.01)  # the lr of steps 20 and 21
    assert seen[29] == pytest.approx(0.001)


def test_skip_sampler_resumes_the_epochs_order_where_it_stopped() -> None:
    base = torch.utils.data.RandomSampler(range(10), generator=torch.Generator().manual_seed(3))
    order = list(base)
    base.generator.manual_seed(3)
    resumed = SkipSampler(base, 4)
    assert len(resumed) == 6
    assert list(resumed) == order[4:]
    assert len(SkipSampler(base, 12)) == 0


def test_checkpoint_round_trip_continues_exactly(tmp_path: Path) -> None:
    """Saved and restored into fresh objects, the next step gives the same weights as never stopping."""
    settings = hp(optimizer="adamw", lr="0.01", weight_decay="0.05")

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        optimizer = make_optimizer(model, settings)
        return model, optimizer, make_scheduler(optimizer, settings, 5, 30)

    def step(model, optimizer, scheduler) -> None:  # type: ignore[no-untyped-def]
        loss = model(torch.randn(16, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    model, optimizer, scheduler = fresh()
    for _ in range(7):
        step(model, optimizer, scheduler)
    state = LoopState(epoch=1, step_in_epoch=2, global_step=7, history=[{"epoch": 0, "loss": 1.5}])
    checkpoint.save(tmp_path, model, optimizer, scheduler, None, state, {"job": "a"})
    step(model, optimizer, scheduler)  # the run that was never stopped

    restored_model, restored_optimizer, restored_scheduler = fresh()
    payload = checkpoint.load(tmp_path)
    assert payload is not None and payload["fingerprint"] == {"job": "a"}
    loop = checkpoint.restore(payload, restored_model, restored_optimizer, restored_scheduler, None)
    assert (loop.epoch, loop.step_in_epoch, loop.global_step, loop.history) == (1, 2, 7, state.history)
    step(restored_model, restored_optimizer, restored_scheduler)  # the same random batch: RNG restored too
    for a, b in zip(model.state_dict().values(), restored_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert restored_scheduler.get_last_lr() == scheduler.get_last_lr()

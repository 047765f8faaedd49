"""The job's first optimizer step runs at the warm-up's first rate, not the peak.

The schedule reads the job's plan at every step; built before the job had planned (a plan of 0 steps), its
first step ran at the peak rate, the one step of the warm-up that most needs the small rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from maskrcnn.train import distributed
from maskrcnn.train.config import TrainConfig
from maskrcnn.train.engine import LoopState
from maskrcnn.train.job import StopSignal, _Job

pytestmark = pytest.mark.integration


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """The job turns deterministic kernels on for the whole process; the tests after this one expect them off."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


@pytest.mark.usefixtures("restore_determinism")
@pytest.mark.parametrize("schedule", ["cosine", "multistep", "constant"])
def test_the_first_step_runs_at_lr_times_warmup_factor(make_job, schedule: str) -> None:  # type: ignore[no-untyped-def]
    base: Path = make_job({"lr": "0.02", "warmup_steps": "3", "warmup_factor": "0.1", "lr_schedule": schedule})
    config = TrainConfig.from_env({"SAGEMAKER_BASE_DIR": str(base), "TRAINING_JOB_NAME": "job"})
    ctx = distributed.init(config, 0, 1)
    state = LoopState()
    job = _Job(config, ctx, StopSignal(), state, time.monotonic())

    assert state.last_step == 4  # make_job's max_steps
    assert job.optimization.lr() == pytest.approx(0.02 * 0.1)

"""The metrics line and the regexes SageMaker's MetricDefinitions will apply to it."""

from __future__ import annotations

import math
import re

import pytest
from maskrcnn.train.metrics import METRIC_DEFINITIONS, Plan, format_metrics, parse_metrics, parse_plan

pytestmark = pytest.mark.unit


def test_a_training_line_is_read_back_by_the_exported_regexes() -> None:
    line = "2026-01-01 INFO maskrcnn.train.engine: " + format_metrics(
        "train",
        {
            "epoch": 1,
            "step": 40,
            "loss_mask": 0.25,
            "loss": 0.8123,
            "lr": 0.01,
            "images_per_sec": 6.5,
            "job_images_per_sec": 52.0,
            "data_wait": 0.03,
        },
    )
    found = parse_metrics(line)
    assert found == {
        "train:loss": 0.8123,
        "train:lr": 0.01,
        "train:images_per_sec": 6.5,  # one process's (one GPU's), never read from job_images_per_sec
        "train:job_images_per_sec": 52.0,
        "train:data_wait_share": 0.03,
    }
    job_only = format_metrics("train", {"job_images_per_sec": 52.0})
    assert parse_metrics(job_only) == {"train:job_images_per_sec": 52.0}


def test_evaluation_line_and_non_finite_values() -> None:
    line = format_metrics(
        "eval", {"epoch": 2, "bbox_mAP": 0.5, "segm_mAP": 0.25, "segm_AP50": 0.875, "bbox_AP50": 0.75}
    )
    assert parse_metrics(line)["validation:segm_AP50"] == 0.875
    assert math.isnan(parse_metrics(format_metrics("train", {"loss": float("nan")}))["train:loss"])


def test_definitions_fit_sagemaker_limits() -> None:
    # CreateTrainingJob: at most 40 definitions, Name <= 255 chars, Regex <= 500 chars, one group.
    assert len(METRIC_DEFINITIONS) <= 40
    for definition in METRIC_DEFINITIONS:
        assert len(definition["Name"]) <= 255 and len(definition["Regex"]) <= 500
        assert re.compile(definition["Regex"]).groups == 1


def test_unrelated_lines_yield_nothing() -> None:
    assert parse_metrics("loss=0.5 lr=0.1") == {}


@pytest.mark.parametrize("event", ["start", "budget", "end"])
def test_a_plan_line_is_read_back_and_matches_no_metric(event: str) -> None:
    plan = Plan(event, 10, 57)
    line = "2026-01-01 INFO [rank 0] maskrcnn.train.job: " + plan.line()
    assert parse_plan(line) == plan
    assert parse_metrics(line) == {}  # SageMaker's regexes never read a plan as a metric
    assert parse_plan("budget: planning 57 steps (was 8000)") is None
    assert parse_plan(format_metrics("train", {"step": 10, "loss": 0.5})) is None

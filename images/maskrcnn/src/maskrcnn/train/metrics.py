"""One log-line format for metrics, and the regexes that read it.

Every metric the training job reports is printed on a single line that starts with
``#metrics`` followed by ``name=value`` pairs::

    #metrics phase=train epoch=1 step=40 loss=0.81 lr=0.01 images_per_sec=6.2 job_images_per_sec=49.7 data_wait=0.03
    #metrics phase=eval epoch=1 bbox_mAP=0.5123 segm_mAP=0.4981 segm_AP50=0.8712

SageMaker's ``MetricDefinitions`` apply a regex per log line and take the first group as
a float. ``images_per_sec`` is one training process's (one GPU's on a GPU host), ``job_images_per_sec``
the whole job's (that times the processes). ``METRIC_DEFINITIONS`` is that list; the local harness and
the Step Functions workflow import it from here so the three never drift apart.

The job's plan (the step it will end at) has a line of its own, which no metric regex matches::

    #plan event=start step=0 last_step=16       before the first step: epochs or max_steps, whichever ends first
    #plan event=budget step=10 last_step=57     a time budget (max_runtime) moved the end
    #plan event=end step=55 last_step=55        training ended at this step (the final evaluation follows)

The local harness's progress bar reads these only (:func:`parse_plan`); the sentences the job logs beside
them are for people and may be reworded freely.

This module imports nothing heavy: ``pipeline/`` imports it without torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "#metrics"
PLAN_PREFIX = "#plan"
PLAN_EVENTS = ("start", "budget", "end")

_NUMBER = r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))"

# name in the log line -> name shown in SageMaker
_METRICS: dict[str, str] = {
    "loss": "train:loss",
    "lr": "train:lr",
    "images_per_sec": "train:images_per_sec",  # per process: per GPU
    "job_images_per_sec": "train:job_images_per_sec",  # every process of every host
    "data_wait": "train:data_wait_share",
    "bbox_mAP": "validation:bbox_mAP",
    "segm_mAP": "validation:segm_mAP",
    "bbox_AP50": "validation:bbox_AP50",
    "segm_AP50": "validation:segm_AP50",
}

METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": shown, "Regex": rf"{PREFIX} .*\b{key}={_NUMBER}"} for key, shown in _METRICS.items()
]


def format_metrics(phase: str, values: Mapping[str, float | int]) -> str:
    """Render one metrics line; floats get 6 significant digits."""
    parts = [PREFIX, f"phase={phase}"]
    for key, value in values.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.6g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def parse_metrics(line: str) -> dict[str, float]:
    """Read a log line with the same regexes SageMaker would use; {} when it has none."""
    found: dict[str, float] = {}
    if PREFIX not in line:
        return found
    for definition in METRIC_DEFINITIONS:
        match = re.search(definition["Regex"], line)
        if match:
            found[definition["Name"]] = float(match.group(1))
    return found


@dataclass(frozen=True)
class Plan:
    """Where the job plans to end: ``last_step``, as decided at ``step`` for the reason ``event``."""

    event: str  # one of PLAN_EVENTS
    step: int  # the global step the plan was made at (the step training ended at, for "end")
    last_step: int

    def line(self) -> str:
        return f"{PLAN_PREFIX} event={self.event} step={self.step} last_step={self.last_step}"


_PLAN = re.compile(rf"{PLAN_PREFIX} event=({'|'.join(PLAN_EVENTS)}) step=(\d+) last_step=(\d+)\b")


def parse_plan(line: str) -> Plan | None:
    """The plan a log line announces (as :meth:`Plan.line` wrote it), else None."""
    match = _PLAN.search(line)
    return Plan(match[1], int(match[2]), int(match[3])) if match else None

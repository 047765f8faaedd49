"""The test side of running this workflow in moto's Step Functions interpreter.

The interpreter's adaptation (``.sync`` SageMaker, in-process Lambda, aws-sdk casing, UpdateEndpoint and
UpdateProject) is product code now: :mod:`local.sfn`, which ``python -m local workflow`` also runs on.
What stays here is what only tests want, on top of moto's stand-in services, given to :mod:`local.sfn` as its
``Backing`` (the one place that patches moto's services):

* moto's CodeBuild reports every build SUCCEEDED on first look; ``BuildScript`` scripts the
  statuses a build goes through so the poll loop and the failure branch run;
* retries and Waits are instant and recorded, so the tests assert the definition's intervals
  (``python -m local workflow`` shortens them in its copy of the definition instead);
* moto's training jobs report one fixed metric (``train:progress``); ``Recorder.metrics`` is what the
  quality gate reads from FinalMetricDataList instead;
* ``Recorder.rollback`` scripts SageMaker rolling an update back: the named alarms go to ALARM in moto's
  CloudWatch and the endpoint stays InService on its old config, as after a blue/green rollback.

The fixtures skip on another moto version than ``local.sfn.MOTO_VERSION``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from local.sfn import MOTO_VERSION, Backing, UnsupportedMoto, finish_update, history, interpreter_patches

__all__ = ["BuildScript", "Recorder", "history", "install"]


@dataclass
class BuildScript:
    """Statuses successive BatchGetBuilds calls report; the last one repeats."""

    statuses: list[str] = field(default_factory=lambda: ["SUCCEEDED"])
    looks: int = 0

    def next_status(self) -> str:
        status = self.statuses[min(self.looks, len(self.statuses) - 1)]
        self.looks += 1
        return status


@dataclass
class Recorder:
    """What the adapted interpreter did, for the tests to assert on."""

    lambda_calls: list[dict[str, Any]] = field(default_factory=list)
    retry_sleeps: list[float] = field(default_factory=list)
    waits: list[int] = field(default_factory=list)
    build: BuildScript = field(default_factory=BuildScript)
    # FinalMetricDataList of every training job; the default passes the workflow's default gate.
    metrics: dict[str, float] = field(default_factory=lambda: {"train:loss": 0.4, "validation:segm_AP50": 0.87})
    rollback: list[str] | None = None  # alarms that fire during the next update's baking period
    deployment_configs: list[Any] = field(default_factory=list)  # what each UpdateEndpoint asked for


def install(monkeypatch: pytest.MonkeyPatch, handlers: Mapping[str, Callable[[Any, Any], Any]]) -> Recorder:
    """Patch moto's interpreter and backends for this test; monkeypatch undoes it all."""
    from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction

    recorder = Recorder()
    try:
        patches = interpreter_patches(handlers, recorder.lambda_calls, recorder_backing(recorder))
    except UnsupportedMoto as error:
        pytest.skip(f"{error} (pinned: {MOTO_VERSION})")
    for owner, name, value in patches:
        monkeypatch.setattr(owner, name, value, raising=False)
    # Only the retrier's own view of ``time`` is replaced; time.sleep stays real everywhere else.
    monkeypatch.setattr(retrier_decl, "time", SimpleNamespace(sleep=recorder.retry_sleeps.append))
    monkeypatch.setattr(
        WaitFunction, "_wait_interval", lambda self, env, wait_seconds: recorder.waits.append(wait_seconds)
    )
    return recorder


def recorder_backing(recorder: Recorder) -> Backing:
    """moto's records as the recorder scripts them: the metrics, the builds' statuses, the updates' rollbacks."""

    def training_job(job: Any) -> None:
        job.final_metric_data_list = [
            {"MetricName": name, "Value": value, "Timestamp": job.creation_time}
            for name, value in recorder.metrics.items()
        ]

    def batch_get_builds(ids: list[str], moto_answer: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        builds = moto_answer()
        status = recorder.build.next_status()
        for build in builds:
            build["buildStatus"] = status
        return builds

    def update_endpoint(endpoint: Any, endpoint_config_name: str, deployment_config: Any) -> None:
        recorder.deployment_configs.append(deployment_config)
        if recorder.rollback is None:
            finish_update(endpoint, endpoint_config_name)
            return
        import boto3

        region = endpoint.arn.split(":")[3]
        cloudwatch = boto3.client("cloudwatch", region_name=region)
        for alarm in recorder.rollback:
            cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="ALARM", StateReason="scripted by the test")
        endpoint.endpoint_status = "InService"  # rolled back: the old config serves on

    return Backing(training_job=training_job, update_endpoint=update_endpoint, batch_get_builds=batch_get_builds)

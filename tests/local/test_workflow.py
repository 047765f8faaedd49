"""``python -m local workflow``: the deployed state machine, a real training job and a real endpoint (process mode)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiny import TINY_HP

from local import client
from local.cli import main
from local.endpoint import Endpoint
from local.errors import EndpointError
from local.workflow import LocalWorkflow, WorkflowRun, deployed_definition, shorten_waits
from pipeline.__main__ import main as pipeline_main
from pipeline.settings import StackSettings
from pipeline.workflow import build_definition

IMAGE = "maskrcnn-sagemaker:latest"  # process mode runs this checkout's code; the tag only names the image
TINY = [f"{k}={v}" for k, v in TINY_HP.items()]
MET = "validation:segm_AP50=0"  # a bar two training steps meet


def entered_states(folder: Path) -> list[str]:
    events = json.loads((folder / "history.json").read_text())
    return [e["stateEnteredEventDetails"]["name"] for e in events if e["type"].endswith("StateEntered")]


@pytest.mark.unit
def test_local_definition_is_the_deployed_one_with_only_waits_shortened() -> None:
    deployed = deployed_definition(StackSettings())
    short, changes = shorten_waits(deployed, seconds=2)

    assert "${" not in json.dumps(deployed)  # every DefinitionSubstitution of the template has a local value
    assert short["States"]["WaitForEndpoint"]["Seconds"] == 2 and deployed["States"]["WaitForEndpoint"]["Seconds"] > 2
    assert short["States"]["BuildImage"]["Retry"][0]["IntervalSeconds"] == 2
    assert any("WaitForEndpoint" in c for c in changes)
    # Apart from the intervals, the same states, resources and transitions as build_definition's.
    for name, state in build_definition(StackSettings())["States"].items():
        assert short["States"][name]["Type"] == state["Type"]
        assert short["States"][name].get("Next") == state.get("Next")
        assert short["States"][name].get("Resource") == state.get("Resource")


@pytest.mark.integration
def test_workflow_command_succeeds_with_a_real_endpoint(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "wf"
    args = ["workflow", "--training-data", str(dataset), "--image", IMAGE, "--mode", "process", "--output", str(out)]
    code = main(args + ["--gate", MET] + [a for hp in TINY for a in ("--hp", hp)])

    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "execution SUCCEEDED" in printed
    assert re.search(r"quality gate: validation:segm_AP50 = [0-9.e-]+ passes the bar 0\.0", printed), printed
    assert re.search(r"registered arn:aws:sagemaker:\S+:model-package/maskrcnn-models/1 as Approved", printed)
    assert "> IsGateMetric\n" not in printed  # the Map's iterations are its detail
    assert "smoke request: " in printed and "-> HTTP 200" in printed
    assert "WaitForEndpoint waits 2 s (deployed: 60 s)" in printed  # the run says what it shortened
    (folder,) = [p for p in out.iterdir() if p.name.startswith("maskrcnn-")]
    states = entered_states(folder)
    assert states[:4] == ["ChooseImage", "UseGivenImage", "TrainModel", "MeasureGateMetric"]
    assert {"CheckQualityGate", "RegisterModel", "DescribeModelPackage"} <= set(states) and states[-1] == "Deployed"
    assert "CreateEndpoint" in states and "BuildImage" not in states
    # The job ran in the job folder on the channel downloaded from S3, and wrote the model it served.
    (job,) = list((out / "jobs").iterdir())
    assert (job / "job" / "model.tar.gz").is_file()
    assert sorted(p.name for p in (job / "channels" / "training").iterdir()) == sorted(
        p.name for p in dataset.iterdir()
    )


@pytest.mark.integration
def test_a_model_below_the_gate_ends_the_run_before_any_endpoint(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "wf"
    args = ["workflow", "--training-data", str(dataset), "--image", IMAGE, "--mode", "process", "--output", str(out)]
    code = main(args + ["--gate", "validation:segm_AP50=0.99"] + [a for hp in TINY for a in ("--hp", hp)])

    printed = capsys.readouterr().out
    assert code == 1, printed
    verdict = re.search(
        r"FAILED in state BelowQualityBar: BelowQualityBar: validation:segm_AP50 = (\S+) is below", printed
    )
    assert verdict and printed.count("the quality bar 0.99") == 1, printed
    (folder,) = [p for p in out.iterdir() if p.name.startswith("maskrcnn-")]
    assert "RegisterModel" not in entered_states(folder) and "CreateModel" not in entered_states(folder)
    assert not (out / "endpoints").exists()  # no model was ever served
    job_metrics = json.loads((folder / "execution.json").read_text())["outcome"]
    assert job_metrics["error"] == "BelowQualityBar" and float(verdict.group(1)) < 0.99


@pytest.mark.integration
def test_unknown_hyperparameter_fails_in_train_model_with_the_jobs_reason(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["workflow", "--training-data", str(dataset), "--image", IMAGE, "--mode", "process"]
    code = main([*args, "--hp", "bogus_knob=1", "--output", str(tmp_path / "wf")])

    printed = capsys.readouterr().out
    assert code == 1
    assert "FAILED in state TrainModel: SageMaker.TrainingJobFailed: unknown hyperparameter 'bogus_knob'" in printed


@pytest.mark.integration
def test_second_execution_updates_the_running_endpoint(dataset: Path, tmp_path: Path, process_runtime) -> None:
    import boto3

    run = WorkflowRun(training=dataset, image=IMAGE, hyperparameters=TINY, gate=MET)
    with LocalWorkflow(process_runtime, tmp_path / "wf", io.StringIO()) as workflow:
        first = workflow.run(run)
        assert first.ok, first
        url = first.endpoint_url
        second = workflow.run(run)
        assert second.ok, second

        assert "UpdateEndpoint" in entered_states(second.folder) and "CreateEndpoint" not in entered_states(
            second.folder
        )
        assert second.endpoint_url == url  # same endpoint, now serving the second job's model
        sagemaker, s3 = boto3.client("sagemaker"), boto3.client("s3")
        endpoint = sagemaker.describe_endpoint(EndpointName=second.endpoint_name)
        assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", second.name)
        served = workflow.endpoint(second.endpoint_name)
        assert served is not None and second.name in str(served.model)
        assert client.ping(url)
        job = sagemaker.describe_training_job(TrainingJobName=second.name)
        assert job["TrainingJobStatus"] == "Completed"
        assert {m["MetricName"] for m in job["FinalMetricDataList"]} >= {"train:loss", "validation:segm_AP50"}
        bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"].removeprefix("s3://").split("/", 1)
        assert key == f"output/{second.name}/output/model.tar.gz"
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    assert not client.ping(url)  # leaving the workflow stops the endpoint


def approve_as_printed(stream: io.StringIO, verb: str, after: int = 0, timeout: float = 180.0) -> str:
    """Wait for the run to print the approval command (past ``after``), then run it (``verb`` in place of
    approve) in another process, as a person would in another shell; returns the package ARN."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(
            r"waiting for approval; .*\n\s+(.+python -m pipeline approve --model-package (\S+))\n",
            stream.getvalue()[after:],
        )
        if found:
            break
        time.sleep(0.5)
    else:
        raise TimeoutError(stream.getvalue())
    *assignments, _python, _m, _pipeline, _verb, flag, package = shlex.split(found.group(1))
    env = {**os.environ, **dict(a.split("=", 1) for a in assignments)}
    if "AWS_ENDPOINT_URL" not in env:  # moto's server lacks flask-cors here: the run said so; approve in-process
        assert pipeline_main([verb, flag, package]) == 0
        return package
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", verb, flag, package], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return package


@pytest.mark.integration
def test_manual_approval_waits_for_pipeline_approve_or_reject_from_another_shell(
    dataset: Path, tmp_path: Path, process_runtime
) -> None:
    import boto3

    stream = io.StringIO()
    # A short approval timeout: a test that fails to approve ends in ApprovalTimedOut instead of hanging.
    run = WorkflowRun(
        training=dataset, image=IMAGE, hyperparameters=TINY, gate=MET, approve="manual", approval_timeout_s=240
    )
    with LocalWorkflow(process_runtime, tmp_path / "wf", stream) as workflow, ThreadPoolExecutor(1) as pool:
        approved = pool.submit(workflow.run, run)
        package = approve_as_printed(stream, "approve")
        first = approved.result(timeout=300)
        assert first.ok, stream.getvalue()
        states = entered_states(first.folder)
        assert states.count("WaitForApproval") >= 1 and states[-1] == "Deployed"
        sagemaker = boto3.client("sagemaker")
        assert sagemaker.describe_model_package(ModelPackageName=package)["ModelApprovalStatus"] == "Approved"

        rejected = pool.submit(workflow.run, run)
        approve_as_printed(stream, "reject", after=len(stream.getvalue()))
        second = rejected.result(timeout=300)
        assert (second.status, second.failed_state, second.error) == ("FAILED", "Rejected", "Rejected")
        assert "CreateModel" not in entered_states(second.folder)
        endpoint = sagemaker.describe_endpoint(EndpointName=first.endpoint_name)
        assert endpoint["EndpointConfigName"] == first.name  # the first model still serves
        assert client.ping(first.endpoint_url)


class FaultyModelServer(Endpoint):
    """The harness's model server, or, while ``fault`` is set, one that cannot start or answers every invocation
    with a 500 (its /ping says healthy, so only the 5xx alarm can catch it)."""

    fault: str | None = None

    def start(self) -> None:
        self._fault, self._stub = FaultyModelServer.fault, None
        if self._fault is None:
            super().start()
        elif self._fault == "cannot start":
            raise EndpointError("serve exited with code 1 before answering /ping; last lines:\nmodel.json is broken")
        else:

            class Answer(BaseHTTPRequestHandler):
                def log_message(self, *args: object) -> None:
                    pass

                def do_GET(self) -> None:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                def do_POST(self) -> None:
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            self._stub = ThreadingHTTPServer(("127.0.0.1", self.port), Answer)
            threading.Thread(target=self._stub.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._stub is not None:
            self._stub.shutdown()
            self._stub.server_close()
        super().stop()


@pytest.mark.integration
def test_a_bad_update_rolls_back_and_the_endpoint_answers_throughout(
    dataset: Path, tmp_path: Path, process_runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    monkeypatch.setattr("local.workflow.Endpoint", FaultyModelServer)
    image = next(p for p in sorted(dataset.rglob("*")) if p.suffix == ".png")
    run = WorkflowRun(training=dataset, image=IMAGE, hyperparameters=TINY, gate=MET)
    with LocalWorkflow(process_runtime, tmp_path / "wf", io.StringIO()) as workflow:
        first = workflow.run(run)
        assert first.ok, first
        url = first.endpoint_url
        for fault, alarms in (("cannot start", "[]"), ("answers 500", '["maskrcnn-endpoint-5xx-errors"]')):
            FaultyModelServer.fault = fault
            statuses: list[int] = []
            done = threading.Event()

            def load(url: str = url, statuses: list[int] = statuses, done: threading.Event = done) -> None:
                while not done.is_set():
                    statuses.append(client.invoke(url, image.read_bytes(), "image/png").status)

            sender = threading.Thread(target=load)
            sender.start()
            try:
                outcome = workflow.run(run)
            finally:
                done.set()
                sender.join()
            assert (outcome.status, outcome.failed_state) == ("FAILED", "DeploymentRolledBack"), (fault, outcome)
            assert f"alarms in ALARM: {alarms}" in str(outcome.cause)
            assert len(statuses) > 5 and set(statuses) == {200}, (fault, statuses)  # the old model, throughout
            endpoint = boto3.client("sagemaker").describe_endpoint(EndpointName=first.endpoint_name)
            assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", first.name)
            assert endpoint["FailureReason"].startswith("Rolled back: ")
        FaultyModelServer.fault = None
    assert not client.ping(url)  # nothing left serving

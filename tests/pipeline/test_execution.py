"""The workflow executed end to end by moto's Step Functions interpreter against moto's AWS."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest
from conftest import BUCKET, SETTINGS, run_execution
from maskrcnn.train.metrics import METRIC_DEFINITIONS
from moto_sfn import history

from pipeline.__main__ import main
from pipeline.execution import example_input
from pipeline.shapes import validate_request
from pipeline.workflow import AWS_SDK, SAGEMAKER

pytestmark = pytest.mark.integration
DIGEST_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/maskrcnn-sagemaker@sha256:" + "cd" * 32


def failed_state_names(execution_arn: str) -> list[str]:
    return [
        e["stateEnteredEventDetails"]["name"]
        for e in history(boto3.client("stepfunctions"), execution_arn)
        if e["type"] == "FailStateEntered"
    ]


def scheduled_requests(execution_arn: str) -> list[tuple[str, dict[str, Any]]]:
    """(resource, parameters) of every task the interpreter really called, in order."""
    found = []
    for event in history(boto3.client("stepfunctions"), execution_arn):
        details = event.get("taskScheduledEventDetails")
        if details:
            resource = f"arn:aws:states:::{details['resourceType']}:{details['resource']}"
            found.append((resource, json.loads(details["parameters"])))
    return found


def test_success_path_builds_trains_and_deploys(state_machine_arn: str, artifact_bucket: str, interpreter: Any) -> None:
    interpreter.build.statuses = ["IN_PROGRESS", "SUCCEEDED"]
    document = example_input(bucket=artifact_bucket, approval="auto").to_document()

    result = run_execution(state_machine_arn, document)

    assert result["status"] == "SUCCEEDED", result
    ecr, sagemaker = boto3.client("ecr"), boto3.client("sagemaker")
    tag = f"git-{document['Build']['GitSha']}"
    digest = ecr.describe_images(repositoryName=SETTINGS.repository_name, imageIds=[{"imageTag": tag}])["imageDetails"][
        0
    ]["imageDigest"]
    repo = ecr.describe_repositories(repositoryNames=[SETTINGS.repository_name])["repositories"][0]
    job = sagemaker.describe_training_job(TrainingJobName=document["JobName"])
    assert job["AlgorithmSpecification"]["TrainingImage"] == f"{repo['repositoryUri']}@{digest}"
    sent = dict(scheduled_requests(result["executionArn"]))[f"{SAGEMAKER}:createTrainingJob.sync"]
    assert sent["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS  # moto echoes fixed ones
    assert job["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert job["HyperParameters"] == document["Training"]["HyperParameters"]
    assert [c["ChannelName"] for c in job["InputDataConfig"]] == ["training", "validation"]
    model = sagemaker.describe_model(ModelName=document["ModelName"])
    assert model["PrimaryContainer"]["Image"] == f"{repo['repositoryUri']}@{digest}"
    endpoint = sagemaker.describe_endpoint(EndpointName=document["EndpointName"])
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == (
        "InService",
        document["ModelName"],
    )
    # The build was waited for in the state machine: one poll saw IN_PROGRESS, then a Wait, then SUCCEEDED.
    assert interpreter.waits == [SETTINGS.build_poll_seconds]
    assert len(interpreter.lambda_calls) == 1
    # The Lambda left the repository configured and the context uploaded with its folders.
    assert repo["imageTagMutability"] == "IMMUTABLE" and repo["imageScanningConfiguration"]["scanOnPush"]
    assert ecr.get_lifecycle_policy(repositoryName=SETTINGS.repository_name)["lifecyclePolicyText"]
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]}
    prefix = f"build-context/{document['Build']['GitSha']}"
    assert {f"{prefix}/buildspec.yml", f"{prefix}/images/maskrcnn/src/maskrcnn/train/metrics.py"} <= keys


def test_requests_the_interpreter_sent_are_valid_botocore_requests(
    state_machine_arn: str, artifact_bucket: str, interpreter: Any
) -> None:
    result = run_execution(
        state_machine_arn, example_input(bucket=artifact_bucket, use_spot=True, approval="auto").to_document()
    )
    assert result["status"] == "SUCCEEDED", result

    checked = []
    for resource, parameters in scheduled_requests(result["executionArn"]):
        if resource.startswith(f"{SAGEMAKER}:"):
            action, sdk = resource.removeprefix(f"{SAGEMAKER}:").split(".")[0], False
            service = "sagemaker"
        elif resource.startswith(f"{AWS_SDK}:"):
            service, action = resource.removeprefix(f"{AWS_SDK}:").split(":")
            sdk = True
        else:
            continue
        operation = action[0].upper() + action[1:]
        assert validate_request(service, operation, parameters, sdk_casing=sdk) is None, (
            operation,
            parameters,
        )
        checked.append(operation)
    assert {
        "CreateTrainingJob",
        "CreateModel",
        "CreateEndpointConfig",
        "CreateEndpoint",
        "BatchGetBuilds",
        "DescribeImages",
        "ListEndpoints",
        "DescribeEndpoint",
    } <= set(checked)


def test_build_failure_is_retried_then_caught_into_fail(state_machine_arn: str, interpreter: Any) -> None:
    # No artifact bucket: the Lambda's upload fails on every attempt.
    result = run_execution(state_machine_arn, example_input(bucket=BUCKET).to_document())

    assert result["status"] == "FAILED"
    assert failed_state_names(result["executionArn"]) == ["BuildImageFailed"]
    assert len(interpreter.lambda_calls) == 3  # the first try and MaxAttempts 2 retries
    assert interpreter.retry_sleeps == [15.0, 60.0]  # IntervalSeconds 15, BackoffRate 4.0
    assert boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []
    assert result.get("error") == "BuildImageFailed"


def test_failed_codebuild_build_stops_before_training(
    state_machine_arn: str, artifact_bucket: str, interpreter: Any
) -> None:
    interpreter.build.statuses = ["IN_PROGRESS", "FAILED"]

    result = run_execution(state_machine_arn, example_input(bucket=artifact_bucket, approval="auto").to_document())

    assert result["status"] == "FAILED"
    assert failed_state_names(result["executionArn"]) == ["BuildFailed"]
    assert boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


def test_existing_endpoint_is_updated_with_a_given_image(
    state_machine_arn: str, artifact_bucket: str, interpreter: Any
) -> None:
    first = example_input(bucket=artifact_bucket, approval="auto").to_document()
    assert run_execution(state_machine_arn, first)["status"] == "SUCCEEDED"
    image_uri = boto3.client("sagemaker").describe_training_job(TrainingJobName=first["JobName"])[
        "AlgorithmSpecification"
    ]["TrainingImage"]
    second = example_input(bucket=artifact_bucket, image_uri=image_uri, approval="auto").to_document()
    second.update(JobName="maskrcnn-train-2", ModelName="maskrcnn-model-2")

    result = run_execution(state_machine_arn, second)

    assert result["status"] == "SUCCEEDED", result
    entered = [
        e["stateEnteredEventDetails"]["name"]
        for e in history(boto3.client("stepfunctions"), result["executionArn"])
        if e["type"].endswith("StateEntered")
    ]
    assert "UpdateEndpoint" in entered and "CreateEndpoint" not in entered and "BuildImage" not in entered
    endpoint = boto3.client("sagemaker").describe_endpoint(EndpointName=second["EndpointName"])
    assert endpoint["EndpointConfigName"] == "maskrcnn-model-2"
    assert len(interpreter.lambda_calls) == 1  # the second execution built nothing
    assert (
        boto3.client("sagemaker").describe_training_job(TrainingJobName="maskrcnn-train-2")["AlgorithmSpecification"][
            "TrainingImage"
        ]
        == image_uri
    )


def model_packages(status: str | None = None) -> list[dict[str, Any]]:
    sagemaker = boto3.client("sagemaker")
    listed = sagemaker.list_model_packages(ModelPackageGroupName=SETTINGS.model_package_group_name)
    described = [
        sagemaker.describe_model_package(ModelPackageName=p["ModelPackageArn"])
        for p in listed["ModelPackageSummaryList"]
    ]
    return [p for p in described if status is None or p["ModelApprovalStatus"] == status]


def test_success_registers_the_model_approved_with_its_gate_metric(
    state_machine_arn: str, artifact_bucket: str, interpreter: Any
) -> None:
    document = example_input(bucket=artifact_bucket, approval="auto").to_document()

    result = run_execution(state_machine_arn, document)

    assert result["status"] == "SUCCEEDED", result
    (package,) = model_packages()
    assert package["ModelApprovalStatus"] == "Approved"
    assert package["CustomerMetadataProperties"] == {
        "TrainingJobName": document["JobName"],
        "GateMetricName": "validation:segm_AP50",
        "GateMetricValue": "0.87",
    }
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName=document["JobName"])
    (container,) = package["InferenceSpecification"]["Containers"]
    assert container["ModelDataUrl"] == job["ModelArtifacts"]["S3ModelArtifacts"]
    assert container["Image"] == job["AlgorithmSpecification"]["TrainingImage"]
    assert interpreter.waits == []  # auto: approved at once, no approval wait


@pytest.mark.parametrize(
    ("metrics", "error", "cause"),
    [
        (
            {"validation:segm_AP50": 0.31},
            "BelowQualityBar",
            "validation:segm_AP50 = 0.31 is below the quality bar 0.5",
        ),
        (
            {"train:loss": 1.2},
            "GateMetricNotLogged",
            "the training job logged no validation:segm_AP50: no model to judge",
        ),
    ],
)
def test_a_model_below_the_gate_is_neither_registered_nor_deployed(
    state_machine_arn: str,
    artifact_bucket: str,
    interpreter: Any,
    metrics: dict[str, float],
    error: str,
    cause: str,
) -> None:
    interpreter.metrics = metrics
    document = example_input(bucket=artifact_bucket, approval="auto").to_document()

    result = run_execution(state_machine_arn, document)

    assert (result["status"], result.get("error"), result.get("cause")) == ("FAILED", error, cause)
    assert failed_state_names(result["executionArn"]) == [error]
    sagemaker = boto3.client("sagemaker")
    assert model_packages() == []
    assert sagemaker.list_models()["Models"] == [] and sagemaker.list_endpoints()["Endpoints"] == []


def test_the_gate_takes_its_metric_and_bar_from_the_input(
    state_machine_arn: str, artifact_bucket: str, interpreter: Any
) -> None:
    interpreter.metrics = {"validation:segm_AP50": 0.87, "validation:bbox_AP50": 0.42}
    document = example_input(bucket=artifact_bucket, image_uri=DIGEST_URI, approval="auto").to_document()
    document["QualityGate"] = {"MetricName": "validation:bbox_AP50", "MinValue": 0.4}
    assert run_execution(state_machine_arn, document)["status"] == "SUCCEEDED"

    document.update(JobName="maskrcnn-train-2", ModelName="maskrcnn-model-2")
    document["QualityGate"]["MinValue"] = 0.99
    result = run_execution(state_machine_arn, document)
    assert result.get("cause") == "validation:bbox_AP50 = 0.42 is below the quality bar 0.99"


def wait_for_pending_package(timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = model_packages("PendingManualApproval")
        if pending:
            arn: str = pending[0]["ModelPackageArn"]
            return arn
        time.sleep(0.05)
    raise TimeoutError("no model package PendingManualApproval")


@pytest.mark.parametrize(("verb", "status"), [("approve", "SUCCEEDED"), ("reject", "FAILED")])
def test_manual_approval_waits_for_the_approve_or_reject_command(
    state_machine_arn: str,
    artifact_bucket: str,
    interpreter: Any,
    monkeypatch: pytest.MonkeyPatch,
    verb: str,
    status: str,
) -> None:
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction

    def wait(self: Any, env: Any, wait_seconds: int) -> None:
        interpreter.waits.append(wait_seconds)
        time.sleep(0.02)  # the person takes a while: the poll loop goes round

    monkeypatch.setattr(WaitFunction, "_wait_interval", wait)
    document = example_input(bucket=artifact_bucket, image_uri=DIGEST_URI, approval="manual").to_document()
    sfn = boto3.client("stepfunctions")
    arn = sfn.start_execution(stateMachineArn=state_machine_arn, name="manual", input=json.dumps(document))[
        "executionArn"
    ]
    package = wait_for_pending_package()
    time.sleep(0.2)
    assert sfn.describe_execution(executionArn=arn)["status"] == "RUNNING"
    assert boto3.client("sagemaker").list_models()["Models"] == []  # nothing deployed while it waits

    assert main([verb, "--model-package", package, "--description", "looked at the overlays"]) == 0

    result = wait_for_end(arn)
    assert result["status"] == status, result
    assert set(interpreter.waits) == {60}  # PollSeconds, polled until decided
    models = boto3.client("sagemaker").list_models()["Models"]
    if verb == "approve":
        assert [m["ModelName"] for m in models] == [document["ModelName"]]
    else:
        assert (result.get("error"), models) == ("Rejected", [])
        assert result.get("cause") == f"model package {package} was rejected; nothing deployed"


def test_an_approval_never_given_times_out(state_machine_arn: str, artifact_bucket: str, interpreter: Any) -> None:
    document = example_input(bucket=artifact_bucket, image_uri=DIGEST_URI, approval="manual").to_document()
    document["Approval"].update(TimeoutSeconds=150, PollSeconds=60)

    result = run_execution(state_machine_arn, document)

    assert (result["status"], result.get("error")) == ("FAILED", "ApprovalTimedOut")
    assert interpreter.waits == [60, 60, 60]  # 0, 60, 120 waited: still pending; 180 >= 150
    assert [p["ModelApprovalStatus"] for p in model_packages()] == ["PendingManualApproval"]
    assert boto3.client("sagemaker").list_models()["Models"] == []


def wait_for_end(arn: str, timeout: float = 30.0) -> dict[str, Any]:
    sfn = boto3.client("stepfunctions")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described: dict[str, Any] = sfn.describe_execution(executionArn=arn)
        if described["status"] != "RUNNING":
            return described
        time.sleep(0.05)
    raise TimeoutError(arn)


def test_an_update_is_blue_green_with_a_canary_and_both_alarms(
    state_machine_arn: str, artifact_bucket: str, interpreter: Any
) -> None:
    first = example_input(bucket=artifact_bucket, image_uri=DIGEST_URI, approval="auto").to_document()
    assert run_execution(state_machine_arn, first)["status"] == "SUCCEEDED"
    assert interpreter.deployment_configs == []  # a new endpoint has nothing to shift from
    second = {**first, "JobName": "maskrcnn-train-2", "ModelName": "maskrcnn-model-2"}

    assert run_execution(state_machine_arn, second)["status"] == "SUCCEEDED"

    alarms = [f"{first['EndpointName']}-5xx-errors", f"{first['EndpointName']}-model-latency"]
    assert interpreter.deployment_configs == [
        {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {
                    "Type": "CANARY",
                    "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
                    "WaitIntervalInSeconds": 300,
                },
                "TerminationWaitInSeconds": 0,
            },
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in alarms]},
        }
    ]
    described = boto3.client("cloudwatch").describe_alarms(AlarmNames=alarms)["MetricAlarms"]
    by_name = {a["AlarmName"]: a for a in described}
    assert (by_name[alarms[0]]["MetricName"], by_name[alarms[0]]["Threshold"]) == ("Invocation5XXErrors", 0.0)
    assert (by_name[alarms[1]]["MetricName"], by_name[alarms[1]]["ExtendedStatistic"]) == ("ModelLatency", "p99")
    assert by_name[alarms[1]]["Threshold"] == 2_000_000.0  # 2000 ms in ModelLatency's microseconds
    dimensions = {d["Name"]: d["Value"] for d in by_name[alarms[0]]["Dimensions"]}
    assert dimensions == {"EndpointName": first["EndpointName"], "VariantName": "AllTraffic"}


@pytest.mark.parametrize("fired", [["maskrcnn-endpoint-5xx-errors"], []])
def test_a_rolled_back_update_fails_in_deployment_rolled_back_naming_the_alarm(
    state_machine_arn: str, artifact_bucket: str, interpreter: Any, fired: list[str]
) -> None:
    first = example_input(bucket=artifact_bucket, image_uri=DIGEST_URI, approval="auto").to_document()
    assert run_execution(state_machine_arn, first)["status"] == "SUCCEEDED"
    interpreter.rollback = fired
    second = {**first, "JobName": "maskrcnn-train-2", "ModelName": "maskrcnn-model-2"}

    result = run_execution(state_machine_arn, second)

    assert (result["status"], result.get("error")) == ("FAILED", "DeploymentRolledBack")
    assert result["cause"].startswith(
        f"the update to maskrcnn-model-2 was rolled back and {first['ModelName']} serves on; "
        f"alarms in ALARM: {json.dumps(fired, separators=(',', ':'))}"
    ), result["cause"]
    endpoint = boto3.client("sagemaker").describe_endpoint(EndpointName=first["EndpointName"])
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", first["ModelName"])

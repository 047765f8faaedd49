"""The rendered state machine: its shape, its policies, and its requests against botocore."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from maskrcnn.train.metrics import METRIC_DEFINITIONS

from pipeline.__main__ import main
from pipeline.execution import ExecutionInput, InputError, example_input
from pipeline.settings import StackSettings
from pipeline.shapes import validate_definition
from pipeline.workflow import build_definition

pytestmark = pytest.mark.unit
DIGEST_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/maskrcnn-sagemaker@sha256:" + "cd" * 32


@pytest.fixture
def definition() -> dict:
    """The definition with the default settings."""
    return build_definition(StackSettings())


def test_every_transition_lands_on_a_state_and_every_state_is_reachable(definition: dict) -> None:
    states = definition["States"]
    targets = {definition["StartAt"]}
    for state in states.values():
        targets |= {state.get("Next"), state.get("Default")} - {None}
        targets |= {rule["Next"] for rule in state.get("Choices", [])}
        targets |= {catch["Next"] for catch in state.get("Catch", [])}
    assert targets == set(states)


def test_build_step_keeps_the_seed_retry_and_catches_into_fail(definition: dict) -> None:
    build = definition["States"]["BuildImage"]
    assert build["Resource"] == "arn:aws:states:::lambda:invoke"
    assert build["Retry"] == [
        {"ErrorEquals": ["States.TaskFailed"], "IntervalSeconds": 15, "MaxAttempts": 2, "BackoffRate": 4.0}
    ]
    caught = definition["States"][build["Catch"][0]["Next"]]
    assert build["Catch"][0]["ErrorEquals"] == ["States.TaskFailed"] and caught["Type"] == "Fail"


def test_build_is_awaited_by_the_state_machine(definition: dict) -> None:
    states = definition["States"]
    assert states["BuildImage"]["Next"] == "DescribeBuild"
    assert states["WaitForBuild"] == {"Type": "Wait", "Seconds": 30, "Next": "DescribeBuild"}
    assert states["IsBuildDone"]["Default"] == "WaitForBuild"


def test_training_is_sync_with_metrics_and_checkpoints(definition: dict) -> None:
    train = definition["States"]["TrainModel"]
    assert train["Resource"] == "arn:aws:states:::sagemaker:createTrainingJob.sync"
    spec = train["Parameters"]["AlgorithmSpecification"]
    assert spec["MetricDefinitions"] == METRIC_DEFINITIONS
    assert train["Parameters"]["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert (
        definition["States"]["CreateModel"]["Parameters"]["PrimaryContainer"]["ModelDataUrl.$"]
        == "$.TrainingJob.S3ModelArtifacts"
    )


@pytest.mark.parametrize("image_uri", [None, DIGEST_URI])
@pytest.mark.parametrize("use_spot", [False, True])
def test_every_api_request_validates_against_botocore(definition: dict, image_uri: str | None, use_spot: bool) -> None:
    document = example_input(image_uri=image_uri, use_spot=use_spot).to_document()
    assert validate_definition(definition, document) == []


def test_a_wrong_request_is_reported_by_the_validator(definition: dict) -> None:
    document = example_input().to_document()
    document["Inference"]["ProductionVariants"][0]["InitialInstanceCount"] = "1"
    del definition["States"]["CreateModel"]["Parameters"]["ModelName.$"]

    errors = validate_definition(definition, document)

    assert len(errors) == 2
    assert "InitialInstanceCount" in errors[0] or "InitialInstanceCount" in errors[1]
    assert any("ModelName" in e for e in errors)


def test_execution_input_renders_strings_optional_channels_and_spot() -> None:
    document = example_input(use_spot=True).to_document()
    training = document["Training"]
    assert all(isinstance(v, str) for v in training["HyperParameters"].values())
    assert training["HyperParameters"]["arch"] == "resnet50_fpn_v2"
    assert [c["ChannelName"] for c in training["InputDataConfig"]] == ["training", "validation"]
    assert training["StoppingCondition"]["MaxWaitTimeInSeconds"] >= training["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert "MaxWaitTimeInSeconds" not in example_input(use_spot=False).to_document()["Training"]["StoppingCondition"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_uri": DIGEST_URI.split("@")[0] + ":latest"}, "pinned by digest"),
        ({"job_name": "other-job"}, "must start with"),
        ({"hyperparameters": {"epochs": "1", "bogus_knob": "0.9"}}, "unknown hyperparameter 'bogus_knob'; accepted: "),
        ({"hyperparameters": {"arch": "resnet101"}}, "arch must be one of"),
        ({"hyperparameters": {"amp": "maybe"}}, "'amp' must be true or false"),
        ({"training_data": "/local/path"}, "s3://"),
        ({"git_sha": "main"}, "git_sha"),
        ({"gate_metric": "validation:segm_AP75"}, "gate metric 'validation:segm_AP75' is none the job logs; one of "),
        ({"gate_min_value": float("nan")}, "finite number"),
        ({"approval": "yes"}, "approval must be one of auto, manual"),
        ({"canary_percent": 60}, "canary_percent must be 1-50"),
        ({"baking_seconds": 7200}, "baking_seconds must be 0-3600"),
    ],
)
def test_bad_execution_input_is_refused_before_start(change: dict, message: str) -> None:
    fields = {**example_input().__dict__, **change}
    with pytest.raises(InputError, match=message):
        ExecutionInput(**fields)


def test_render_writes_definition_template_and_example(tmp_path: Path) -> None:
    assert main(["render", "--out", str(tmp_path)]) == 0

    definition = json.loads((tmp_path / "statemachine.asl.json").read_text())
    template = json.loads((tmp_path / "template.json").read_text())
    assert template["Resources"]["StateMachine"]["Properties"]["Definition"] == definition
    assert json.loads((tmp_path / "example-input.json").read_text())["JobName"].startswith("maskrcnn-")


def test_validate_command_succeeds() -> None:
    assert main(["validate"]) == 0


def test_the_job_is_budgeted_to_end_inside_its_stopping_condition() -> None:
    training = example_input().to_document()["Training"]
    budget = int(training["HyperParameters"]["max_runtime"])
    assert 0 < budget < training["StoppingCondition"]["MaxRuntimeInSeconds"]
    chosen = dataclasses.replace(example_input(), hyperparameters={"max_runtime": "0"})
    assert chosen.to_document()["Training"]["HyperParameters"]["max_runtime"] == "0"  # the user's value wins

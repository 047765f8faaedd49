"""`python -m pipeline start`: hyperparameters checked by the image's own schema before any AWS call.

The stack is emulated with moto; the no-credentials path runs the real command line in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from maskrcnn.train.config import PRESETS, Hyperparameters
from support import REPO

from pipeline import aws
from pipeline.__main__ import main, parser

STACK = "maskrcnn-test"
GIT_SHA = "0123456789abcdef0123456789abcdef01234567"
START = ["start", "--stack", STACK, "--training-data", "s3://data/train/", "--git-sha", GIT_SHA]


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A state machine in moto that runs nothing, and the stack outputs `start` reads pointing at it.

    The outputs are stubbed: moto's CloudFormation needs extras this project does not install.
    """
    from moto import mock_aws

    with mock_aws():
        arn = boto3.client("stepfunctions").create_state_machine(
            name="maskrcnn-train-deploy",
            definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}),
            roleArn="arn:aws:iam::123456789012:role/maskrcnn-states",
        )["stateMachineArn"]
        outputs = {"ArtifactBucketName": "artifacts", "StateMachineArn": arn}
        monkeypatch.setattr(aws, "stack_outputs", lambda session, name: outputs)
        yield arn


def sent_documents(state_machine_arn: str) -> list[dict]:
    sfn = boto3.client("stepfunctions")
    return [
        json.loads(sfn.describe_execution(executionArn=e["executionArn"])["input"])
        for e in sfn.list_executions(stateMachineArn=state_machine_arn)["executions"]
    ]


@pytest.mark.unit
def test_start_sends_any_image_hyperparameter_over_the_gpu_preset(stack: str) -> None:
    assert main([*START, "-p", "optimizer=adamw", "-p", "photometric=true"]) == 0

    [document] = sent_documents(stack)
    assert document["Training"]["UseSpot"] is False
    hp = Hyperparameters.from_strings(document["Training"]["HyperParameters"])
    assert (hp.optimizer, hp.photometric) == ("adamw", True)
    assert hp.arch == "resnet50_fpn"  # from the preset, not the schema's CPU-sized default
    # checkpoint_every counts steps: the workflow once wrote a resnet50 checkpoint after every step.
    assert hp.checkpoint_every >= 100


@pytest.mark.unit
def test_start_sends_the_gate_and_the_approval_mode(stack: str) -> None:
    assert main([*START, "--gate", "validation:bbox_AP50=0.7", "--approve", "auto", "--approval-timeout", "600"]) == 0

    [document] = sent_documents(stack)
    assert document["QualityGate"] == {"MetricName": "validation:bbox_AP50", "MinValue": 0.7}
    assert (document["Approval"]["Mode"], document["Approval"]["TimeoutSeconds"]) == ("auto", 600)
    assert document["Deployment"] == {
        "CanaryPercent": 10,
        "BakingSeconds": 300,
        "Max5xxErrors": 0,
        "MaxModelLatencyMicroseconds": 2_000_000,
    }
    defaults = parser().parse_args(START)
    assert (defaults.gate, defaults.approve) == ("validation:segm_AP50=0.5", "manual")  # production waits for a person


@pytest.mark.unit
@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["bogus_knob=1"], "unknown hyperparameter 'bogus_knob'; accepted: amp, arch, "),
        (["amp=maybe"], "'amp' must be true or false"),
        (["epochs"], "-p takes KEY=VALUE, got 'epochs'"),
    ],
)
def test_bad_hyperparameters_are_refused_before_any_aws_call(
    pairs: list[str], message: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert refused_without_aws([*START, *(arg for pair in pairs for arg in ("-p", pair))], monkeypatch) == 2
    assert message in caplog.text


@pytest.mark.unit
@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ("validation:segm_AP50=high", "--gate takes METRIC=MIN with a number, got 'validation:segm_AP50=high'"),
        ("segm_AP50=0.5", "gate metric 'segm_AP50' is none the job logs"),
    ],
)
def test_a_bad_gate_is_refused_before_any_aws_call(
    gate: str, message: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert refused_without_aws([*START, "--gate", gate], monkeypatch) == 2
    assert message in caplog.text


def refused_without_aws(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    # No credentials: had `start` called AWS first, it would fail on those instead (exit 1).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return main(args)


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    clean.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_EC2_METADATA_DISABLED="true")
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=clean, capture_output=True, text=True, timeout=60
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["-p", "optimizer=adamw"], {"AWS_DEFAULT_REGION": "us-east-1"}, 1, "Unable to locate credentials"),
        (["-p", "optimizer=adamw"], {}, 1, "region"),
        (["-p", "bogus_knob=1"], {}, 2, "unknown hyperparameter 'bogus_knob'"),
    ],
)
def test_start_without_aws_fails_in_one_line(args: list[str], env: dict[str, str], code: int, message: str) -> None:
    result = run_cli([*START, *args], **env)

    assert result.returncode == code, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr


@pytest.mark.unit
def test_every_preset_decodes_with_the_image_schema() -> None:
    for name, preset in PRESETS.items():
        assert Hyperparameters.from_strings(preset), name


@pytest.mark.integration
def test_rendered_example_input_trains_the_image_for_one_step(tmp_path: Path, make_job: Callable[..., Path]) -> None:
    assert main(["render", "--out", str(tmp_path / "render")]) == 0
    sent = json.loads((tmp_path / "render" / "example-input.json").read_text())["Training"]["HyperParameters"]
    Hyperparameters.from_strings(sent)
    # Only sizes shrink so that one step fits a CPU test; the arch (resnet50_fpn_v2) is the example's own.
    tiny = {"max_steps": "1", "batch_size": "1", "min_size": "128", "max_size": "128", "num_workers": "0"}
    base = make_job({**sent, **tiny})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update(SAGEMAKER_BASE_DIR=str(base), TRAINING_JOB_NAME=base.name, PYTHONUNBUFFERED="1")

    result = subprocess.run(
        [sys.executable, str(REPO / "images" / "maskrcnn" / "train")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    spec = json.loads((base / "model" / "model.json").read_text())
    assert (spec["arch"], spec["training"]["steps"]) == (sent["arch"], 1)


@pytest.mark.unit
def test_the_pipeline_imports_the_schema_without_torch() -> None:
    # The pipeline runs on a laptop or in CI without torch: the image's config module must stay light.
    code = "import sys, pipeline.__main__; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0

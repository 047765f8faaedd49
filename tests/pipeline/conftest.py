"""Fixtures for the pipeline tests: a clean fake AWS environment, moto, and the adapted interpreter."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from support import REPO

from pipeline import build_lambda
from pipeline.settings import StackSettings
from pipeline.workflow import build_definition, substitute

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
BUCKET = "maskrcnn-artifacts-test"
SETTINGS = StackSettings()


@pytest.fixture(autouse=True)
def fake_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real credentials or profile can leak into a test; one region everywhere."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


@pytest.fixture
def build_context(tmp_path: Path) -> Path:
    """A small build context with the real buildspec and nested folders."""
    context = tmp_path / "build_context"
    (context / "images/maskrcnn/src/maskrcnn/train").mkdir(parents=True)
    shutil.copy(REPO / "buildspec.yml", context / "buildspec.yml")
    shutil.copy(REPO / "images/maskrcnn/src/maskrcnn/train/metrics.py", context / "images/maskrcnn/src/maskrcnn/train/")
    (context / "Makefile").write_text("build:\n\tdocker build -t maskrcnn-sagemaker:latest images/maskrcnn\n")
    return context


@pytest.fixture
def moto_aws(monkeypatch: pytest.MonkeyPatch, build_context: Path) -> Iterator[None]:
    """moto with state machines executed for real, and the build Lambda's environment set."""
    from moto import mock_aws

    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        monkeypatch.setenv("REPOSITORY_NAME", SETTINGS.repository_name)
        monkeypatch.setenv("PROJECT_NAME", SETTINGS.project_name)
        monkeypatch.setenv("CONTEXT_BUCKET", BUCKET)
        monkeypatch.setenv("CODEBUILD_ROLE_ARN", f"arn:aws:iam::{ACCOUNT}:role/maskrcnn-codebuild")
        monkeypatch.setenv("CODEBUILD_LOG_GROUP", f"/aws/codebuild/{SETTINGS.project_name}")
        monkeypatch.setenv("CONTEXT_DIR", str(build_context))
        yield


@pytest.fixture
def artifact_bucket(moto_aws: None) -> str:
    """The stack's bucket (the build failure tests leave it out)."""
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return BUCKET


def emulated_build(event: Any, context: Any) -> Any:
    """The real handler, then the push CodeBuild would do (moto runs no builds)."""
    result = build_lambda.handler(event, context)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "digest": "sha256:" + "0" * 64,
            "size": 1,
            "mediaType": "application/vnd.docker.container.image.v1+json",
        },
        "layers": [],
        "annotations": {"tag": result["ImageTag"]},
    }
    boto3.client("ecr").put_image(
        repositoryName=result["RepositoryName"],
        imageTag=result["ImageTag"],
        imageManifest=json.dumps(manifest),
    )
    return result


@pytest.fixture
def interpreter(moto_aws: None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's interpreter adapted for .sync SageMaker, in-process Lambda and instant waits."""
    from moto_sfn import install

    return install(monkeypatch, {SETTINGS.function_name: emulated_build})


@pytest.fixture
def state_machine_arn(interpreter: Any) -> str:
    """The rendered definition, deployed to moto with the ARNs CloudFormation would substitute."""
    definition = substitute(
        build_definition(SETTINGS),
        {
            "BuildFunctionArn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{SETTINGS.function_name}",
            "SageMakerRoleArn": f"arn:aws:iam::{ACCOUNT}:role/maskrcnn-sagemaker",
        },
    )
    # The stack's model package group (AWS::SageMaker::ModelPackageGroup), which RegisterModel versions into.
    boto3.client("sagemaker").create_model_package_group(ModelPackageGroupName=SETTINGS.model_package_group_name)
    created = boto3.client("stepfunctions").create_state_machine(
        name=SETTINGS.state_machine_name,
        definition=json.dumps(definition),
        roleArn=f"arn:aws:iam::{ACCOUNT}:role/maskrcnn-states",
    )
    arn: str = created["stateMachineArn"]
    return arn


def run_execution(state_machine_arn: str, document: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Start an execution and wait for its end; returns DescribeExecution."""
    sfn = boto3.client("stepfunctions")
    arn = sfn.start_execution(stateMachineArn=state_machine_arn, name=document["JobName"], input=json.dumps(document))[
        "executionArn"
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described: dict[str, Any] = sfn.describe_execution(executionArn=arn)
        if described["status"] != "RUNNING":
            return described
        time.sleep(0.05)
    raise TimeoutError(f"execution {arn} still running after {timeout} s")

"""``deploy`` and ``start``: the only code here that talks to a real AWS account (boto3).

    python -m pipeline deploy --stack maskrcnn --code-bucket my-deploy-bucket --data-bucket my-data
    python -m pipeline start --stack maskrcnn --training-data s3://my-data/coco/train/ ...

``deploy`` zips the build Lambda together with the build context (the repository's tracked files,
folders kept, plus ``SOURCE_VERSION`` = the commit), uploads the zip, and creates or updates the
CloudFormation stack. ``start`` reads the stack's outputs and starts one execution. Neither runs in
CI; their pure parts (packaging, the execution input) are tested.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import zipfile
from pathlib import Path
from typing import Any

from pipeline.build_lambda import SOURCE_VERSION_FILE
from pipeline.settings import StackSettings
from pipeline.template import build_template

log = logging.getLogger(__name__)

LAMBDA_MODULES = ("pipeline/__init__.py", "pipeline/build_lambda.py")


def git_sha(repo_root: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo_root, check=True, capture_output=True, text=True
    ).stdout.strip()


def tracked_files(repo_root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, check=True, capture_output=True).stdout
    return sorted(name for name in out.decode().split("\0") if name)


def package_lambda(repo_root: Path, files: list[str], sha: str) -> bytes:
    """The function's zip: its handler module and ``build_context/<the files, folders kept>``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for module in LAMBDA_MODULES:
            archive.write(repo_root / module, module)
        for name in files:
            path = repo_root / name
            if path.is_file():
                archive.write(path, f"build_context/{name}")
        archive.writestr(f"build_context/{SOURCE_VERSION_FILE}", sha + "\n")
    return buffer.getvalue()


def deploy(
    session: Any, settings: StackSettings, stack: str, code_bucket: str, data_bucket: str, repo_root: Path
) -> dict[str, str]:
    """Upload the Lambda zip, create or update the stack, wait for it; returns the stack's outputs."""
    sha = git_sha(repo_root)
    body = package_lambda(repo_root, tracked_files(repo_root), sha)
    key = f"{settings.prefix}/lambda/{sha}-{hashlib.sha256(body).hexdigest()[:12]}.zip"
    session.client("s3").put_object(Bucket=code_bucket, Key=key, Body=body)
    log.info("uploaded the build Lambda (%d bytes) to s3://%s/%s", len(body), code_bucket, key)
    cfn = session.client("cloudformation")
    arguments = {
        "StackName": stack,
        "TemplateBody": json.dumps(build_template(settings)),
        "Parameters": [
            {"ParameterKey": "LambdaCodeBucket", "ParameterValue": code_bucket},
            {"ParameterKey": "LambdaCodeKey", "ParameterValue": key},
            {"ParameterKey": "DataBucketName", "ParameterValue": data_bucket},
        ],
        "Capabilities": ["CAPABILITY_IAM"],
    }
    try:
        cfn.describe_stacks(StackName=stack)
        exists = True
    except cfn.exceptions.ClientError:
        exists = False
    if exists:
        try:
            cfn.update_stack(**arguments)
            cfn.get_waiter("stack_update_complete").wait(StackName=stack)
        except cfn.exceptions.ClientError as error:
            if "No updates are to be performed" not in str(error):
                raise
            log.info("stack %s is up to date", stack)
    else:
        cfn.create_stack(**arguments)
        cfn.get_waiter("stack_create_complete").wait(StackName=stack)
    return stack_outputs(session, stack)


def stack_outputs(session: Any, stack: str) -> dict[str, str]:
    described = session.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]
    return {item["OutputKey"]: item["OutputValue"] for item in described.get("Outputs", [])}


def start(session: Any, state_machine_arn: str, document: dict[str, Any], name: str) -> str:
    """Start one execution named after the job; returns its ARN."""
    response = session.client("stepfunctions").start_execution(
        stateMachineArn=state_machine_arn, name=name, input=json.dumps(document)
    )
    arn: str = response["executionArn"]
    return arn


def review(session: Any, model_package_arn: str, status: str, description: str | None) -> str:
    """Approve or reject a registered model package; an execution waiting on it goes on. Returns the new status."""
    sagemaker = session.client("sagemaker")
    update: dict[str, Any] = {"ModelPackageArn": model_package_arn, "ModelApprovalStatus": status}
    if description:
        update["ApprovalDescription"] = description
    sagemaker.update_model_package(**update)
    status_now: str = sagemaker.describe_model_package(ModelPackageName=model_package_arn)["ModelApprovalStatus"]
    return status_now

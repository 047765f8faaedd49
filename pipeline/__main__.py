"""Command line of the pipeline package: parse, build the config, call one function.

    python -m pipeline render --out build/pipeline            # state machine JSON, template, example input
    python -m pipeline validate                               # botocore shape check of every API task
    python -m pipeline deploy --stack maskrcnn --code-bucket B --data-bucket D
    python -m pipeline start --stack maskrcnn --training-data s3://D/train/ [--image-uri URI@sha256:...]
    python -m pipeline promote --repository maskrcnn-sagemaker --digest sha256:... --tag release-1.0
    python -m pipeline approve --model-package arn:aws:sagemaker:...:model-package/maskrcnn-models/3
    python -m pipeline reject --model-package arn:aws:sagemaker:...:model-package/maskrcnn-models/3

``render`` and ``validate`` need no AWS; the others use boto3's default credentials and region.
See docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from maskrcnn.train.config import Hyperparameters

from pipeline import aws, release
from pipeline.execution import (
    APPROVAL_MODES,
    GATE_METRIC,
    GATE_MIN_VALUE,
    WORKFLOW_PRESET,
    ExecutionInput,
    InputError,
    example_input,
    parse_pairs,
)
from pipeline.settings import StackSettings
from pipeline.shapes import validate_definition
from pipeline.template import build_template
from pipeline.workflow import build_definition

log = logging.getLogger("pipeline")
REVIEWS = {"approve": "Approved", "reject": "Rejected"}  # verb -> ModelApprovalStatus
REPO_ROOT = Path(__file__).resolve().parent.parent


def render(settings: StackSettings, out: Path) -> list[Path]:
    """Write the definition, the template and an example execution input; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "statemachine.asl.json": build_definition(settings),
        "template.json": build_template(settings),
        "example-input.json": example_input(settings.prefix).to_document(),
    }
    written = []
    for name, document in files.items():
        path = out / name
        path.write_text(json.dumps(document, indent=2) + "\n")
        written.append(path)
    return written


def parser() -> argparse.ArgumentParser:
    """The command line: global flags and one subcommand, each with its own arguments."""
    top = argparse.ArgumentParser(
        prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--prefix", default=StackSettings.prefix, help="resource name prefix")
    top.add_argument("-v", "--verbose", action="store_true")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("render", help="write the ASL definition and the template").add_argument(
        "--out", type=Path, required=True
    )
    commands.add_parser("validate", help="check the API tasks' Parameters against botocore")
    _deploy_arguments(commands.add_parser("deploy", help="package the Lambda and create/update the stack"))
    start = commands.add_parser("start", help="start one train-and-deploy execution")
    _start_arguments(start)
    _gate_arguments(start)
    for verb, status in REVIEWS.items():
        review = commands.add_parser(verb, help=f"set a registered model package's approval status to {status}")
        review.add_argument(
            "--model-package", required=True, metavar="ARN", help="the package the execution registered"
        )
        review.add_argument("--description", help="ApprovalDescription: why (shown in the registry)")
    promote = commands.add_parser("promote", help="retag a tested digest as a release (no rebuild)")
    promote.add_argument("--repository", required=True)
    promote.add_argument("--digest", required=True)
    promote.add_argument("--tag", required=True)
    return top


def _deploy_arguments(deploy: argparse.ArgumentParser) -> None:
    """``deploy``: the stack and its two buckets."""
    deploy.add_argument("--stack", required=True)
    deploy.add_argument("--code-bucket", required=True, help="existing bucket for the Lambda zip")
    deploy.add_argument("--data-bucket", required=True, help="bucket the training data is read from")


def _start_arguments(start: argparse.ArgumentParser) -> None:
    """``start``: the data, the image, the instances and the hyperparameters of one execution."""
    start.add_argument("--stack", required=True)
    start.add_argument("--training-data", required=True)
    start.add_argument("--validation-data")
    start.add_argument("--pretrained-data")
    start.add_argument("--image-uri", help="ECR URI pinned by digest; omit to build --git-sha")
    start.add_argument("--git-sha", help="commit to build (default: HEAD; must be the deployed one)")
    start.add_argument("--release-tag", help="release-<name>: promote the tested build to this tag")
    start.add_argument("--endpoint-name", help="default: <prefix>-endpoint")
    start.add_argument("--training-instance-type", default=ExecutionInput.training_instance_type)
    start.add_argument("--inference-instance-type", default=ExecutionInput.inference_instance_type)
    start.add_argument(
        "--inference-ami-version",
        help="the endpoint hosts' InferenceAmiVersion (GPU instances only; default: one whose driver the image "
        "runs on, pipeline/amis.py)",
    )
    start.add_argument("--spot", action="store_true", help="managed spot training (checkpoints resume)")
    start.add_argument(
        "--hyperparameter",
        "-p",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any image hyperparameter ({', '.join(Hyperparameters.accepted())}; README's table), "
        f"over the {WORKFLOW_PRESET!r} preset in maskrcnn/train/config.py; repeatable",
    )


def _gate_arguments(start: argparse.ArgumentParser) -> None:
    """``start``: what a trained model must pass before it is deployed: the quality gate and the approval."""
    start.add_argument(
        "--gate",
        default=f"{GATE_METRIC}={GATE_MIN_VALUE}",
        metavar="METRIC=MIN",
        help="the quality gate: a FinalMetricDataList metric and its least value (default: %(default)s)",
    )
    start.add_argument(
        "--approve",
        choices=APPROVAL_MODES,
        default=ExecutionInput.approval,
        help="auto: register the model Approved; manual (default): wait for `approve` or `reject`",
    )
    start.add_argument("--approval-timeout", type=int, default=ExecutionInput.approval_timeout_seconds, metavar="S")


def execution_from_args(
    args: argparse.Namespace,
    settings: StackSettings,
    bucket: str,
    stamp: str,
    head_sha: str | None,
) -> ExecutionInput:
    """The execution ``start`` sends; ``bucket`` is the stack's artifact bucket."""
    job = f"{settings.prefix}-{stamp}"
    hyperparameters = parse_pairs(args.hyperparameter, "-p")
    metric, _, bar = args.gate.rpartition("=")
    try:
        gate_min_value = float(bar)
    except ValueError:
        raise InputError(f"--gate takes METRIC=MIN with a number, got {args.gate!r}") from None
    return ExecutionInput(
        prefix=settings.prefix,
        job_name=job,
        model_name=job,
        endpoint_name=args.endpoint_name or settings.endpoint_name,
        training_data=args.training_data,
        validation_data=args.validation_data,
        pretrained_data=args.pretrained_data,
        output_path=f"s3://{bucket}/output/",
        checkpoint_s3_uri=f"s3://{bucket}/checkpoints/{job}/",
        image_uri=args.image_uri,
        git_sha=None if args.image_uri else (args.git_sha or head_sha),
        release_tag=args.release_tag,
        training_instance_type=args.training_instance_type,
        inference_instance_type=args.inference_instance_type,
        inference_ami_version=args.inference_ami_version,
        use_spot=args.spot,
        hyperparameters=hyperparameters,
        gate_metric=metric,
        gate_min_value=gate_min_value,
        approval=args.approve,
        approval_timeout_seconds=args.approval_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, and turn every error a person can act on into one line and an exit code."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except InputError as error:  # the arguments; nothing was started
        log.error("%s", error)
        return 2
    except release.PromotionError as error:
        log.error("%s", error)
        return 1
    except (BotoCoreError, ClientError) as error:  # no credentials or region, a missing stack, a denied call
        log.error("AWS: %s", error)
        return 1
    except subprocess.CalledProcessError as error:
        log.error("%s failed: %s", " ".join(error.cmd), (error.stderr or "").strip())
        return 1


def run(args: argparse.Namespace) -> int:
    settings = StackSettings(prefix=args.prefix)
    if args.command == "render":
        for path in render(settings, args.out):
            log.info("wrote %s", path)
        return 0
    if args.command == "validate":
        errors = [
            e
            for spot in (False, True)
            for e in validate_definition(
                build_definition(settings), example_input(settings.prefix, use_spot=spot).to_document()
            )
        ]
        for error in errors:
            log.error("%s", error)
        return 1 if errors else 0

    session = boto3.session.Session()
    if args.command == "deploy":
        outputs = aws.deploy(session, settings, args.stack, args.code_bucket, args.data_bucket, REPO_ROOT)
        log.info("stack outputs: %s", json.dumps(outputs, indent=2))
        return 0
    if args.command == "start":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        head_sha = None if args.image_uri or args.git_sha else aws.git_sha(REPO_ROOT)
        # Check the whole input before any AWS call; only the bucket comes from the stack, and a
        # stand-in one passes the same checks as the real one.
        execution_from_args(args, settings, "stack-artifact-bucket", stamp, head_sha)
        outputs = aws.stack_outputs(session, args.stack)
        execution = execution_from_args(args, settings, outputs["ArtifactBucketName"], stamp, head_sha)
        arn = aws.start(session, outputs["StateMachineArn"], execution.to_document(), execution.job_name)
        log.info("started %s", arn)
        return 0
    if args.command in REVIEWS:
        status = aws.review(session, args.model_package, REVIEWS[args.command], args.description)
        log.info("%s: %s", args.model_package, status)
        return 0
    if args.command == "promote":
        release.promote(session.client("ecr"), args.repository, args.digest, args.tag)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

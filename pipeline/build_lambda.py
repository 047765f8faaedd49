"""The build Lambda: ECR repository, build context in S3, CodeBuild project, one build started.

Handler ``pipeline.build_lambda.handler``; ``python -m pipeline deploy`` packages this module and
the build context (the repository's files under ``build_context/``) into the function's zip.
The Lambda only starts the build and returns; the state machine polls CodeBuild for the result::

    event  = {"Build": {"GitSha": "<hex>", "ReleaseTag": "release-1.2"?}, "ExecutionId": "..."}
    result = {"BuildId", "RepositoryName", "RepositoryUri", "ImageTag", "ImageUri"}

Configuration comes from the function's environment, read once in ``handler`` into
``BuildSettings``: REPOSITORY_NAME, PROJECT_NAME, CONTEXT_BUCKET, CODEBUILD_ROLE_ARN,
CODEBUILD_LOG_GROUP, and optionally BUILD_IMAGE, COMPUTE_TYPE, BUILD_TIMEOUT_MINUTES, CONTEXT_DIR.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_TAG_PREFIX = "git-"  # build tags; the lifecycle policy counts only these
RELEASE_TAG_PREFIX = "release-"  # promoted tags; never expired
CONTEXT_PREFIX = "build-context"
SOURCE_VERSION_FILE = "SOURCE_VERSION"  # written by `python -m pipeline deploy` into the context
LIFECYCLE_POLICY: dict[str, Any] = {
    "rules": [
        {  # An image matched by a rule is never expired by a lower-priority one: this shields releases.
            "rulePriority": 1,
            "description": "Keep every release image",
            "selection": {
                "tagStatus": "tagged",
                "tagPrefixList": [RELEASE_TAG_PREFIX],
                "countType": "imageCountMoreThan",
                "countNumber": 10000,
            },
            "action": {"type": "expire"},
        },
        {
            "rulePriority": 2,
            "description": "Expire untagged images after 7 days",
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countUnit": "days",
                "countNumber": 7,
            },
            "action": {"type": "expire"},
        },
        {
            "rulePriority": 3,
            "description": "Keep the 50 newest build images",
            "selection": {
                "tagStatus": "tagged",
                "tagPrefixList": [IMAGE_TAG_PREFIX],
                "countType": "imageCountMoreThan",
                "countNumber": 50,
            },
            "action": {"type": "expire"},
        },
    ]
}
_GIT_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_RELEASE_TAG = re.compile(rf"^{RELEASE_TAG_PREFIX}[A-Za-z0-9._-]{{1,100}}$")


class BuildRequestError(ValueError):
    """The event asks for something this function will not build."""


@dataclass(frozen=True)
class BuildSettings:
    repository_name: str
    project_name: str
    context_bucket: str
    codebuild_role_arn: str
    log_group: str
    context_dir: Path
    build_image: str = "aws/codebuild/standard:7.0"
    compute_type: str = "BUILD_GENERAL1_LARGE"
    timeout_minutes: int = 120

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BuildSettings:
        """Fails with KeyError naming the first missing variable."""
        return cls(
            repository_name=env["REPOSITORY_NAME"],
            project_name=env["PROJECT_NAME"],
            context_bucket=env["CONTEXT_BUCKET"],
            codebuild_role_arn=env["CODEBUILD_ROLE_ARN"],
            log_group=env["CODEBUILD_LOG_GROUP"],
            context_dir=Path(env.get("CONTEXT_DIR", str(Path(__file__).resolve().parent.parent / "build_context"))),
            build_image=env.get("BUILD_IMAGE", cls.build_image),
            compute_type=env.get("COMPUTE_TYPE", cls.compute_type),
            timeout_minutes=int(env.get("BUILD_TIMEOUT_MINUTES", cls.timeout_minutes)),
        )


def ensure_repository(ecr: Any, name: str) -> str:
    """Create the repository if missing and (re)apply its settings; returns its URI."""
    try:
        repository = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ecr.exceptions.RepositoryNotFoundException:
        log.info("creating ECR repository %s", name)
        repository = ecr.create_repository(
            repositoryName=name,
            imageTagMutability="IMMUTABLE",
            imageScanningConfiguration={"scanOnPush": True},
            encryptionConfiguration={"encryptionType": "AES256"},
        )["repository"]
    ecr.put_image_tag_mutability(repositoryName=name, imageTagMutability="IMMUTABLE")
    ecr.put_image_scanning_configuration(repositoryName=name, imageScanningConfiguration={"scanOnPush": True})
    ecr.put_lifecycle_policy(repositoryName=name, lifecyclePolicyText=json.dumps(LIFECYCLE_POLICY))
    uri: str = repository["repositoryUri"]
    return uri


def upload_context(s3: Any, bucket: str, prefix: str, context_dir: Path) -> str:
    """Upload every file under ``context_dir`` to ``s3://bucket/prefix/<relative path>``.

    Returns CodeBuild's S3 folder location ``bucket/prefix/``; the folders are kept, so the
    buildspec sees the repository as it is.
    """
    if not (context_dir / "buildspec.yml").is_file():
        raise BuildRequestError(f"no buildspec.yml in the build context {context_dir}")
    count = 0
    for path in sorted(p for p in context_dir.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(context_dir).as_posix()}"
        s3.upload_file(str(path), bucket, key)
        count += 1
    log.info("uploaded %d files to s3://%s/%s/", count, bucket, prefix)
    return f"{bucket}/{prefix}/"


def project_request(settings: BuildSettings, source_location: str, repository_uri: str) -> dict[str, Any]:
    """The CreateProject / UpdateProject request (the two take the same fields)."""
    return {
        "name": settings.project_name,
        "description": "Builds, tests and pushes the Mask R-CNN SageMaker image",
        "source": {"type": "S3", "location": source_location, "buildspec": "buildspec.yml"},
        "artifacts": {"type": "NO_ARTIFACTS"},
        "environment": {
            "type": "LINUX_CONTAINER",
            "image": settings.build_image,
            "computeType": settings.compute_type,
            "privilegedMode": True,  # docker build inside the build container
            "environmentVariables": [
                {"name": "REPOSITORY_URI", "value": repository_uri, "type": "PLAINTEXT"},
            ],
        },
        "serviceRole": settings.codebuild_role_arn,
        "timeoutInMinutes": settings.timeout_minutes,
        "logsConfig": {"cloudWatchLogs": {"status": "ENABLED", "groupName": settings.log_group}},
    }


def ensure_project(codebuild: Any, request: Mapping[str, Any]) -> str:
    """Create the project, or update it in place: never delete and recreate (that loses its history)."""
    existing = codebuild.batch_get_projects(names=[request["name"]])["projects"]
    if existing:
        log.info("updating CodeBuild project %s", request["name"])
        codebuild.update_project(**request)
        return "updated"
    log.info("creating CodeBuild project %s", request["name"])
    codebuild.create_project(**request)
    return "created"


def parse_event(event: Mapping[str, Any]) -> tuple[str, str | None]:
    """(git sha, release tag or None) from the state machine's payload."""
    build = event.get("Build") or {}
    git_sha = str(build.get("GitSha", ""))
    if not _GIT_SHA.match(git_sha):
        raise BuildRequestError(f"Build.GitSha must be a hex git sha, got {git_sha!r}")
    release_tag = build.get("ReleaseTag")
    if release_tag is not None and not _RELEASE_TAG.match(release_tag):
        raise BuildRequestError(f"Build.ReleaseTag must match {_RELEASE_TAG.pattern}, got {release_tag!r}")
    return git_sha, release_tag


def check_source_version(context_dir: Path, git_sha: str) -> None:
    """The packaged context records its commit (``SOURCE_VERSION``); building another sha would lie."""
    marker = context_dir / SOURCE_VERSION_FILE
    if marker.is_file():
        packaged = marker.read_text().strip()
        if not packaged.startswith(git_sha):
            raise BuildRequestError(f"this function carries the source of {packaged}, not {git_sha}: redeploy")


def run_build(settings: BuildSettings, event: Mapping[str, Any], ecr: Any, s3: Any, codebuild: Any) -> dict[str, str]:
    """Everything the handler does, with the clients passed in."""
    git_sha, release_tag = parse_event(event)
    check_source_version(settings.context_dir, git_sha)
    repository_uri = ensure_repository(ecr, settings.repository_name)
    location = upload_context(s3, settings.context_bucket, f"{CONTEXT_PREFIX}/{git_sha}", settings.context_dir)
    ensure_project(codebuild, project_request(settings, location, repository_uri))
    image_tag = f"{IMAGE_TAG_PREFIX}{git_sha}"
    overrides = [
        {"name": "GIT_SHA", "value": git_sha, "type": "PLAINTEXT"},
        {"name": "IMAGE_TAG", "value": image_tag, "type": "PLAINTEXT"},
        {"name": "RELEASE_TAG", "value": release_tag or "", "type": "PLAINTEXT"},
    ]
    # The location is also overridden per build, so concurrent executions cannot swap each other's source.
    build = codebuild.start_build(
        projectName=settings.project_name,
        sourceTypeOverride="S3",
        sourceLocationOverride=location,
        environmentVariablesOverride=overrides,
    )["build"]
    log.info("started build %s for %s:%s", build["id"], repository_uri, image_tag)
    return {
        "BuildId": build["id"],
        "RepositoryName": settings.repository_name,
        "RepositoryUri": repository_uri,
        "ImageTag": image_tag,
        "ImageUri": f"{repository_uri}:{image_tag}",
    }


def handler(event: Mapping[str, Any], context: Any) -> dict[str, str]:
    """Lambda entrypoint: settings from the environment, clients from boto3, then ``run_build``."""
    import boto3  # the Lambda runtime ships boto3; imported here so the module loads without it

    logging.getLogger().setLevel(logging.INFO)
    settings = BuildSettings.from_env(os.environ)
    return run_build(settings, event, boto3.client("ecr"), boto3.client("s3"), boto3.client("codebuild"))

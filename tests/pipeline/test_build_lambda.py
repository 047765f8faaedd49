"""The build Lambda's handler, the release promotion and the Lambda packaging, in-process under moto."""

from __future__ import annotations

import hashlib
import json
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import BUCKET, SETTINGS

from pipeline import build_lambda
from pipeline.aws import package_lambda
from pipeline.release import PromotionError, promote

SHA = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def update_project(monkeypatch: pytest.MonkeyPatch, moto_aws: None) -> None:
    """moto 5.2.5 lacks CodeBuild UpdateProject; the adapter adds it."""
    from moto_sfn import install

    install(monkeypatch, {})


@pytest.mark.integration
def test_handler_creates_everything_then_updates_in_place(artifact_bucket: str, update_project: None) -> None:
    first = build_lambda.handler({"Build": {"GitSha": SHA}}, None)
    codebuild = boto3.client("codebuild")
    project_arn = codebuild.batch_get_projects(names=[SETTINGS.project_name])["projects"][0]["arn"]

    second = build_lambda.handler({"Build": {"GitSha": SHA[::-1]}}, None)

    assert first["ImageUri"] == f"{first['RepositoryUri']}:git-{SHA}"
    assert second["ImageTag"] == f"git-{SHA[::-1]}"
    project = codebuild.batch_get_projects(names=[SETTINGS.project_name])["projects"][0]
    assert project["arn"] == project_arn  # updated, not deleted and recreated
    assert project["environment"]["privilegedMode"] is True
    builds = codebuild.list_builds_for_project(projectName=SETTINGS.project_name)["ids"]
    assert set(builds) == {first["BuildId"], second["BuildId"]}  # the history survived the update
    ecr = boto3.client("ecr")
    repo = ecr.describe_repositories(repositoryNames=[SETTINGS.repository_name])["repositories"][0]
    assert repo["imageTagMutability"] == "IMMUTABLE"
    rules = json.loads(ecr.get_lifecycle_policy(repositoryName=SETTINGS.repository_name)["lifecyclePolicyText"])
    assert rules == build_lambda.LIFECYCLE_POLICY
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert f"build-context/{SHA}/images/maskrcnn/src/maskrcnn/train/metrics.py" in keys


@pytest.mark.integration
@pytest.mark.parametrize(
    "event", [{}, {"Build": {"GitSha": "main"}}, {"Build": {"GitSha": SHA, "ReleaseTag": "latest"}}]
)
def test_handler_refuses_a_bad_request_before_touching_aws(artifact_bucket: str, event: dict[str, Any]) -> None:
    with pytest.raises(build_lambda.BuildRequestError):
        build_lambda.handler(event, None)
    assert boto3.client("ecr").describe_repositories()["repositories"] == []


@pytest.mark.integration
def test_handler_refuses_a_sha_other_than_the_packaged_source(artifact_bucket: str, build_context: Path) -> None:
    (build_context / build_lambda.SOURCE_VERSION_FILE).write_text(SHA + "\n")
    with pytest.raises(build_lambda.BuildRequestError, match="redeploy"):
        build_lambda.handler({"Build": {"GitSha": "0" * 40}}, None)


def push(ecr: Any, tag: str) -> str:
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "digest": "sha256:" + "1" * 64,
                "size": 1,
                "mediaType": "application/vnd.docker.container.image.v1+json",
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": 1,
                    "digest": "sha256:" + hashlib.sha256(tag.encode()).hexdigest(),
                }
            ],
        }
    )
    digest: str = ecr.put_image(repositoryName=SETTINGS.repository_name, imageManifest=manifest, imageTag=tag)["image"][
        "imageId"
    ]["imageDigest"]
    return digest


@pytest.mark.integration
def test_promotion_retags_the_tested_digest_without_a_new_image(moto_aws: None) -> None:
    ecr = boto3.client("ecr")
    build_lambda.ensure_repository(ecr, SETTINGS.repository_name)
    tested = push(ecr, f"git-{SHA}")
    other = push(ecr, "git-other")

    assert promote(ecr, SETTINGS.repository_name, tested, "release-1.0") == tested
    assert promote(ecr, SETTINGS.repository_name, tested, "release-1.0") == tested  # idempotent

    found = ecr.describe_images(repositoryName=SETTINGS.repository_name, imageIds=[{"imageTag": "release-1.0"}])
    assert found["imageDetails"][0]["imageDigest"] == tested
    assert len(ecr.list_images(repositoryName=SETTINGS.repository_name)["imageIds"]) == 3  # 2 images, 3 tags
    with pytest.raises(PromotionError, match="immutable"):
        promote(ecr, SETTINGS.repository_name, other, "release-1.0")
    with pytest.raises(PromotionError, match="does not exist"):
        promote(ecr, SETTINGS.repository_name, "sha256:" + "f" * 64, "release-2.0")


@pytest.mark.unit
def test_lambda_zip_holds_the_handler_and_the_context_with_folders(tmp_path: Path) -> None:
    (tmp_path / "pipeline").mkdir()
    for module in ("__init__.py", "build_lambda.py"):
        (tmp_path / "pipeline" / module).write_text("# module\n")
    (tmp_path / "images/maskrcnn").mkdir(parents=True)
    (tmp_path / "images/maskrcnn/Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "buildspec.yml").write_text("version: 0.2\n")

    body = package_lambda(tmp_path, ["buildspec.yml", "images/maskrcnn/Dockerfile", "deleted.txt"], SHA)

    names = set(zipfile.ZipFile(BytesIO(body)).namelist())
    assert names == {
        "pipeline/__init__.py",
        "pipeline/build_lambda.py",
        "build_context/buildspec.yml",
        "build_context/images/maskrcnn/Dockerfile",
        "build_context/SOURCE_VERSION",
    }
    assert zipfile.ZipFile(BytesIO(body)).read("build_context/SOURCE_VERSION").decode().strip() == SHA

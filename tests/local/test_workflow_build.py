"""``python -m local workflow --build``: the build Lambda in-process, the buildspec on the local Docker engine.

The success path builds from the layer cache of ``maskrcnn-sagemaker:latest`` (same tree: seconds) and
trains and serves in the image it built; the build failures need no image build.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import REPO
from tiny import TINY_HP

from local import runtime as rt
from local.cli import main
from local.codebuild import DEFAULT_BASE_IMAGE, failure_of, lambda_environment, package_context, phase_script
from local.workflow import ACCOUNT, ARTIFACT_BUCKET, REGION, LocalWorkflow, WorkflowRun, report
from pipeline.build_lambda import BuildSettings
from pipeline.settings import StackSettings

TINY = [a for k, v in TINY_HP.items() for a in ("--hp", f"{k}={v}")]
REPOSITORY_URI = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{StackSettings().repository_name}"


def entered_states(folder: Path) -> list[str]:
    events = json.loads((folder / "history.json").read_text())
    return [e["stateEnteredEventDetails"]["name"] for e in events if e["type"].endswith("StateEntered")]


def image_id(tag: str) -> str | None:
    found = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


@pytest.fixture
def engine() -> Iterator[None]:
    """A Docker engine with the offline base the build starts from; the tags the builds made are removed after."""
    usable, why = rt.docker_status(os.environ.get("BASE_IMAGE", DEFAULT_BASE_IMAGE))
    if not usable:
        pytest.skip(f"--build needs a Docker engine and the base image (make base-image): {why}")
    yield
    tags = subprocess.run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY_URI],
        capture_output=True,
        text=True,
    ).stdout.split()
    if tags:  # untags only: the layers are latest's
        subprocess.run(["docker", "image", "rm", *tags], capture_output=True, check=False)


@pytest.mark.unit
def test_build_function_environment_is_the_templates_and_complete(tmp_path: Path) -> None:
    env = lambda_environment(StackSettings(), tmp_path, ARTIFACT_BUCKET, ACCOUNT, REGION)

    settings = BuildSettings.from_env(env)  # KeyError if the template lost a variable the handler needs
    assert settings.context_bucket == ARTIFACT_BUCKET and settings.context_dir == tmp_path
    assert settings.project_name == StackSettings().project_name


@pytest.mark.unit
def test_a_failed_build_names_its_phase_and_command() -> None:
    log = "\n".join(
        [
            "[Container] Entering phase INSTALL",
            "[Container] Running command make setup",
            "[Container] Entering phase BUILD",
            "[Container] Running command make build",
            "dockerfile parse error line 3: unknown instruction: FROMM",
        ]
    )
    failed = failure_of(log, 2)

    assert failed.phase == "BUILD"
    assert failed.message == "Error while executing command: make build. Reason: exit status 2"


@pytest.mark.unit
def test_the_local_build_judges_each_command_by_its_exit_status_as_codebuild_does() -> None:
    """CodeBuild stops at the first command whose status is not 0, and sees nothing else: a line failing inside a
    multi-line command is hidden by the lines after it. The local build does the same, so a buildspec that would
    hide a failure on AWS hides it here too (tests/pipeline/test_buildspec.py holds ours to chaining)."""
    buildspec = {
        "phases": {
            "install": {"commands": ["echo one", "false\necho after-a-hidden-failure", "export CARRIED=yes"]},
            "build": {"commands": ["echo carried=$CARRIED", "(exit 3)", "echo never"]},
        }
    }
    result = subprocess.run(["bash", "-c", phase_script(buildspec, {})], capture_output=True, text=True)

    assert result.returncode == 3
    assert "after-a-hidden-failure" in result.stdout and "carried=yes" in result.stdout
    assert "never" not in result.stdout
    assert failure_of(result.stdout, 3).message == "Error while executing command: (exit 3). Reason: exit status 3"


@pytest.mark.unit
def test_buildspec_restores_every_executable_bit_the_s3_source_loses() -> None:
    # CodeBuild downloads an S3 source without file modes; the image's entrypoints and scripts need them back.
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True)
    executables = {line.split("\t")[1] for line in staged.stdout.splitlines() if line.startswith("100755")}
    install = yaml.safe_load((REPO / "buildspec.yml").read_text())["phases"]["install"]["commands"]
    (chmod,) = [c for c in install if c.startswith("chmod +x ")]
    restored = {str(p.relative_to(REPO)) for pattern in chmod.split()[2:] for p in REPO.glob(pattern)}

    assert executables - {".ci/run"} <= restored  # .ci/run is not part of any build


@pytest.mark.integration
def test_failing_build_function_is_retried_then_caught(dataset: Path, tmp_path: Path, process_runtime) -> None:
    context = tmp_path / "context"  # a context without buildspec.yml: the Lambda refuses it every time
    (context / "images").mkdir(parents=True)
    stream = io.StringIO()
    with LocalWorkflow(process_runtime, tmp_path / "wf", stream) as workflow:
        outcome = workflow.run(WorkflowRun(training=dataset, build=True, build_context=context))
        report(outcome, stream)

    assert (outcome.status, outcome.failed_state, outcome.error) == ("FAILED", "BuildImageFailed", "BuildImageFailed")
    assert len(workflow.lambda_calls) == 3  # the first try and the definition's 2 retries
    printed = stream.getvalue()
    assert "FAILED in state BuildImageFailed" in printed
    assert "BuildRequestError" in printed and "no buildspec.yml in the build context" in printed
    assert "TrainModel" not in entered_states(outcome.folder)


@pytest.mark.container
def test_failed_codebuild_build_ends_in_build_failed_with_the_commands_output(
    engine: None, dataset: Path, tmp_path: Path, process_runtime
) -> None:
    context, _ = package_context(tmp_path / "function")
    dockerfile = context / "images/maskrcnn/Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\nFROMM broken\n")
    stream = io.StringIO()
    with LocalWorkflow(process_runtime, tmp_path / "wf", stream) as workflow:
        outcome = workflow.run(WorkflowRun(training=dataset, build=True, build_context=context))
        report(outcome, stream)

    assert (outcome.status, outcome.failed_state) == ("FAILED", "BuildFailed"), stream.getvalue()
    states = entered_states(outcome.folder)
    assert states[:4] == ["ChooseImage", "BuildImage", "DescribeBuild", "IsBuildDone"] and "TrainModel" not in states
    printed = stream.getvalue()
    assert "FAILED in phase BUILD: Error while executing command:" in printed
    assert "unknown instruction: FROMM" in printed  # the failing command's own output, from the build's log


@pytest.mark.container
def test_build_branch_trains_and_serves_the_image_it_built(engine: None, dataset: Path, tmp_path: Path, capsys) -> None:
    latest = image_id(rt.DEFAULT_IMAGE)
    out = tmp_path / "wf"

    args = ["workflow", "--training-data", str(dataset), "--build", "--mode", "docker", "--output", str(out)]
    code = main([*args, *TINY, "--gate", "validation:segm_AP50=0"])  # a bar two training steps meet

    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "smoke request: " in printed and "-> HTTP 200" in printed
    (folder,) = [p for p in out.iterdir() if p.name.startswith("maskrcnn-")]
    states = entered_states(folder)
    assert states[:3] == ["ChooseImage", "BuildImage", "DescribeBuild"] and states[-1] == "Deployed"
    assert {"ResolveImageDigest", "UseBuiltImage", "TrainModel", "CreateEndpoint"} <= set(states)
    sha = json.loads((folder / "input.json").read_text())["Build"]["GitSha"]
    built = f"{REPOSITORY_URI}:git-{sha}"
    assert image_id(built) is not None
    assert f"training job {folder.name}: image {built}" in printed  # the ECR URI resolved to the local build
    assert image_id(rt.DEFAULT_IMAGE) == latest  # the build never replaces the image you work with

"""The workflow's build branch on this machine: the build Lambda in-process, CodeBuild on the local Docker engine.

:mod:`local.workflow` hands :class:`LocalCodeBuild` moto's CodeBuild records (through :class:`local.sfn.Backing`)
when a run asks for ``--build``:

* the Lambda: ``pipeline.build_lambda.handler`` itself, called in-process with the environment the stack's
  template gives the function (``BuildFunction``'s ``Environment``) and ``CONTEXT_DIR`` pointing at the
  context ``python -m pipeline deploy`` would package (:func:`package_context`: the same zip, unpacked as
  Lambda unpacks it);
* StartBuild: moto records the build (IN_PROGRESS), then a thread downloads the source from the local S3
  location the Lambda passed (``sourceLocationOverride``) and runs the buildspec from that source with bash:
  its ``install`` and ``build`` phases as written, in one shell, stopping at the first command that exits
  non-zero (a failing line inside a multi-line command counts only if the command's own status says so). What
  needs AWS is done by the harness against the local ECR instead: ``pre_build`` (ECR login, "is the tag
  pushed?", the cache pull; the local engine's layer cache is the cache) and ``post_build`` (the push: the
  built image is recorded in the local ECR under ``IMAGE_TAG``, its manifest naming the local image id);
* BatchGetBuilds: moto's answers every build SUCCEEDED at once; here it reports the build's real status and
  phases, and a failed phase carries CodeBuild's context (``Error while executing command: ...``).

Local differences, each printed in the build's log: ``make setup`` is skipped (this interpreter stands in for
``.venv``: ``PYTHON``), ``make test-unit`` and ``make test-container`` are skipped (the test layers run them),
and ``make build`` tags the build's own ``REPOSITORY_URI:IMAGE_TAG`` (``IMAGE`` and ``LOCAL_IMAGE``), so a
local build never replaces the ``maskrcnn-sagemaker:latest`` you work with. ``build/wheelhouse`` and
``build/torch-cache`` of this checkout are hard-linked into the source, as CodeBuild's local cache would keep
them, so the image build needs no PyPI. The ECR URI the state machine passes on (``repository@digest``) is
resolved back to that local tag by :meth:`LocalCodeBuild.local_image` for the training job and the endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

from local.errors import HarnessError
from local.runtime import REPO
from local.s3 import download_prefix
from pipeline.aws import git_sha, package_lambda, tracked_files
from pipeline.build_lambda import handler as build_handler
from pipeline.settings import StackSettings
from pipeline.template import build_template

log = logging.getLogger(__name__)

# What CodeBuild's own log says, so the phase and the command of a failure can be read back from it.
PHASE_MARK = "[Container] Entering phase "
COMMAND_MARK = "[Container] Running command "
LOCAL_PHASES = ("INSTALL", "BUILD")  # run from the buildspec as written; PRE_BUILD and POST_BUILD by the harness
CACHED_FOLDERS = ("build/wheelhouse", "build/torch-cache")
LOG_TAIL_LINES = 15
DEFAULT_BASE_IMAGE = "maskrcnn-base:bookworm"  # the Makefile's BASE_IMAGE default
PASSED_THROUGH = ("PATH", "HOME", "LANG", "TMPDIR", "DOCKER_HOST", "DOCKER_CONFIG", "BASE_IMAGE")
MAKE_SHIM = r"""
make() {
    case "${1:-}" in
        setup) echo "[local] make setup skipped: $PYTHON stands in for .venv" ;;
        test-unit|test-container) echo "[local] make $1 skipped: the harness's test layers run it" ;;
        *) command make -o setup "$@" ;;
    esac
}
"""


class BuildFailed(Exception):
    """A phase command exited non-zero (or the harness's own part of a phase failed)."""

    def __init__(self, phase: str, message: str):
        super().__init__(message)
        self.phase = phase
        self.message = message


def package_context(dest: Path, repo: Path = REPO) -> tuple[Path, str]:
    """The build context ``deploy`` ships in the Lambda's zip, unpacked under ``dest``; and the commit.

    The same ``package_lambda`` that deploy runs: tracked files as they are in the working tree, plus
    ``SOURCE_VERSION``.
    """
    try:
        sha = git_sha(repo)
        files = tracked_files(repo)
    except (OSError, subprocess.CalledProcessError) as error:
        raise HarnessError(f"--build packages the source as deploy does, which needs a git checkout: {error}") from None
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "function.zip"
    archive.write_bytes(package_lambda(repo, files, sha))
    with zipfile.ZipFile(archive) as unpacked:
        unpacked.extractall(dest)
    return dest / "build_context", sha


def lambda_environment(
    settings: StackSettings, context_dir: Path, bucket: str, account: str, region: str
) -> dict[str, str]:
    """The build function's environment as the stack's template sets it, with local values for its references."""
    template = build_template(settings)
    variables = template["Resources"]["BuildFunction"]["Properties"]["Environment"]["Variables"]
    local = {
        "ArtifactBucket": bucket,
        "CodeBuildRole": f"arn:aws:iam::{account}:role/{settings.prefix}-codebuild",
        "CodeBuildLogGroup": f"/aws/codebuild/{settings.project_name}",
    }
    env = {}
    for name, value in variables.items():
        if isinstance(value, dict):
            reference = value.get("Ref") or value.get("Fn::GetAtt", [None])[0]
            if reference not in local:
                raise HarnessError(f"the template sets the build function's {name} to {value}; no local value")
            value = local[reference]
        env[name] = str(value)
    return {**env, "CONTEXT_DIR": str(context_dir), "AWS_REGION": region}


def phase_script(buildspec: Mapping[str, Any], pre_build: Mapping[str, str]) -> str:
    """The bash script that runs the buildspec's INSTALL and BUILD commands in one shell, as CodeBuild does.

    ``pre_build`` are the variables the harness computed for the PRE_BUILD phase; they are exported between
    the two. Each command is announced with CodeBuild's own log line, and the build stops at the first command
    whose exit status is not 0. As in CodeBuild, that status is all that is judged: a line that fails inside
    a multi-line command goes unnoticed unless the command's last status says so (no errexit, no pipefail),
    so a buildspec that would hide a failure on AWS hides it here too.
    """
    lines = [MAKE_SHIM]
    phases = buildspec.get("phases") or {}
    for phase in LOCAL_PHASES:
        if phase == "BUILD":
            lines.append(f"echo {shlex.quote(PHASE_MARK + 'PRE_BUILD (local: ECR login and cache pull skipped)')}")
            lines += [f"export {k}={shlex.quote(v)}" for k, v in pre_build.items()]
        lines.append(f"echo {shlex.quote(PHASE_MARK + phase)}")
        for command in (phases.get(phase.lower()) or {}).get("commands") or []:
            shown = command.strip().splitlines()[0]
            lines.append(f"echo {shlex.quote(COMMAND_MARK + shown)}")
            lines.append(command.rstrip("\n"))
            lines.append('codebuild_status=$?; [ "$codebuild_status" -eq 0 ] || exit "$codebuild_status"')
    return "\n".join(lines) + "\n"


def failure_of(log_text: str, exit_code: int) -> BuildFailed:
    """The phase and command a failed script was in, read back from its log's CodeBuild lines."""
    phase, command = "SUBMITTED", "?"
    for line in log_text.splitlines():
        if line.startswith(PHASE_MARK):
            phase = line.removeprefix(PHASE_MARK).split()[0]
        elif line.startswith(COMMAND_MARK):
            command = line.removeprefix(COMMAND_MARK)
    return BuildFailed(phase, f"Error while executing command: {command}. Reason: exit status {exit_code}")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class BuildRecord:
    """One local build: moto's metadata dict (what BatchGetBuilds returns) and where its files are."""

    metadata: dict[str, Any]
    folder: Path
    image: str = ""  # the local tag, REPOSITORY_URI:IMAGE_TAG
    failure: str | None = None
    process: subprocess.Popen[bytes] | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.folder / "build.log"


def build_variables(
    spec: Mapping[str, Any], environment: Mapping[str, str], record: BuildRecord, src: Path, region: str
) -> dict[str, str]:
    """The build shell's environment: this machine's basics, the buildspec's, the project's, CodeBuild's own."""
    return {
        **{k: os.environ[k] for k in PASSED_THROUGH if k in os.environ},
        **{k: str(v) for k, v in ((spec.get("env") or {}).get("variables") or {}).items()},
        **environment,
        "CODEBUILD_BUILD_ID": record.metadata["id"],
        "CODEBUILD_SRC_DIR": str(src),
        "CODEBUILD_BUILD_SUCCEEDING": "1",
        "AWS_DEFAULT_REGION": region,  # CodeBuild's: the project's region
        "PYTHON": sys.executable,  # `make setup`'s .venv: this interpreter stands in
        "IMAGE": record.image,  # `make build` tags the build's own name, never maskrcnn-sagemaker:latest
        "LOCAL_IMAGE": record.image,
    }


class LocalCodeBuild:
    """The build Lambda and CodeBuild's StartBuild / BatchGetBuilds, served on this machine."""

    def __init__(self, root: Path, notes: queue.Queue[str], client: Callable[[str], Any], docker: str = "docker"):
        self.root = root
        self.notes = notes
        self.client = client
        self.docker = shutil.which(docker) or docker
        self.builds: dict[str, BuildRecord] = {}
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.lambda_env: dict[str, str] = {}
        # Held while the build function runs with its environment patched into os.environ: a build it starts
        # waits for it, since a thread reading os.environ while patch.dict restores it gets KeyError.
        self.lambda_running = threading.Lock()

    # -- the Lambda ------------------------------------------------------------------------------------
    def handler(self, event: Any, context: Any) -> Any:
        """``pipeline.build_lambda.handler`` with the function's environment, as Lambda runs it."""
        if not self.lambda_env:
            raise HarnessError("the local build function has no environment: LocalCodeBuild.configure first")
        with self.lambda_running, mock.patch.dict(os.environ, self.lambda_env):
            return build_handler(event, context)

    def configure(self, settings: StackSettings, context_dir: Path, bucket: str, account: str, region: str) -> None:
        self.lambda_env = lambda_environment(settings, context_dir, bucket, account, region)

    # -- CodeBuild -------------------------------------------------------------------------------------
    def batch_get_builds(self, ids: list[str], moto_answer: Callable[[], Any]) -> list[dict[str, Any]]:
        """The builds' real status and phases; moto's answer (every build SUCCEEDED at once) is not asked for."""
        return [record.metadata for build_id, record in self.builds.items() if build_id in ids]

    def start(
        self,
        project: Mapping[str, Any],
        metadata: dict[str, Any],
        location: str | None,
        overrides: list[Mapping[str, str]],
    ) -> None:
        build_id = metadata["id"]
        record = BuildRecord(metadata, self.root / "builds" / build_id.split(":")[-1])
        record.folder.mkdir(parents=True)
        metadata.update(currentPhase="SUBMITTED", buildStatus="IN_PROGRESS", buildComplete=False)
        metadata["phases"] = record.phases
        self.builds[build_id] = record
        environment = {v["name"]: v["value"] for v in project["environment"].get("environmentVariables", [])}
        environment.update({v["name"]: v["value"] for v in overrides})
        source = location or project["source"]["location"]
        timeout = int(project.get("timeoutInMinutes", 60)) * 60
        thread = threading.Thread(target=self.run, args=(record, source, environment, timeout), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _phase(self, record: BuildRecord, phase: str, status: str, started: datetime, message: str = "") -> None:
        ended = datetime.now(UTC)
        entry: dict[str, Any] = {
            "phaseType": phase,
            "phaseStatus": status,
            "startTime": started,
            "endTime": ended,
            "durationInSeconds": int((ended - started).total_seconds()),
        }
        if message:
            entry["contexts"] = [{"statusCode": "COMMAND_EXECUTION_ERROR", "message": message}]
        record.phases.append(entry)

    def run(self, record: BuildRecord, source: str, environment: dict[str, str], timeout: float) -> None:
        """One build, to its end; its status and phases land on moto's build record."""
        build_id = record.metadata["id"]
        with self.lambda_running:  # the function that started this build has returned, os.environ is whole
            started = time.monotonic()
        self.notes.put(f"build {build_id}: IN_PROGRESS, log {record.log}")
        try:
            self._build(record, source, environment, timeout)
            status = "SUCCEEDED"
            self.notes.put(f"build {build_id}: SUCCEEDED in {time.monotonic() - started:.1f} s, image {record.image}")
        except BuildFailed as failed:
            status = "STOPPED" if self.stop.is_set() else "FAILED"
            if "timed out" in failed.message:
                status = "TIMED_OUT"
            self._phase(record, failed.phase, status, datetime.now(UTC), failed.message)
            tail = log_tail(record.log)
            record.failure = f"build {build_id} {status} in phase {failed.phase}: {failed.message}\n{tail}"
            self.notes.put(f"build {build_id}: {status} in phase {failed.phase}: {failed.message}")
        except Exception as error:  # a harness problem is the build's failure, as CodeBuild reports its own
            status = "FAULT"
            record.failure = f"build {build_id} FAULT: {type(error).__name__}: {error}"
            self.notes.put(record.failure)
        record.metadata.update(
            buildStatus=status, currentPhase="COMPLETED", buildComplete=True, endTime=datetime.now(UTC)
        )

    def _build(self, record: BuildRecord, source: str, environment: dict[str, str], timeout: float) -> None:
        """CodeBuild's phases in order: DOWNLOAD_SOURCE, INSTALL and BUILD from the buildspec, POST_BUILD's push."""
        src = record.folder / "src"
        spec = self._download_source(record, source, src)
        linked = [folder for folder in CACHED_FOLDERS if link_tree(REPO / folder, src / folder)]
        repository_uri = environment.get("REPOSITORY_URI", "")
        tag = environment.get("IMAGE_TAG") or f"git-{environment.get('GIT_SHA', '')}"
        record.image = f"{repository_uri}:{tag}"
        repository = repository_uri.partition("/")[2]
        pushed = bool(self._digest(repository, tag))
        variables = build_variables(spec, environment, record, src, self.lambda_env["AWS_REGION"])
        self._run_phases(record, src, spec, variables, pushed, linked, timeout)
        self._post_build(record, repository_uri, tag, pushed)

    def _download_source(self, record: BuildRecord, source: str, src: Path) -> dict[str, Any]:
        """DOWNLOAD_SOURCE: the S3 source into ``src``; returns its buildspec."""
        import yaml  # PyYAML, a development dependency (with moto); only --build needs it

        record.metadata["currentPhase"] = "DOWNLOAD_SOURCE"
        now = datetime.now(UTC)
        try:
            download_prefix(self.client("s3"), f"s3://{source}", src)
            spec: dict[str, Any] = yaml.safe_load((src / "buildspec.yml").read_text())
        except Exception as error:
            raise BuildFailed("DOWNLOAD_SOURCE", f"{type(error).__name__}: {error}") from None
        self._phase(record, "DOWNLOAD_SOURCE", "SUCCEEDED", now)
        return spec

    def _run_phases(
        self,
        record: BuildRecord,
        src: Path,
        spec: Mapping[str, Any],
        variables: dict[str, str],
        pushed: bool,
        linked: list[str],
        timeout: float,
    ) -> None:
        """INSTALL and BUILD (PRE_BUILD's variables between them): the buildspec's commands in bash, logged."""
        script = phase_script(spec, {"ALREADY_PUSHED": "1" if pushed else "0", "CACHE_FROM": ""})
        (record.folder / "phases.sh").write_text(script)
        with record.log.open("wb") as out:
            out.write(f"[local] cached from this checkout: {', '.join(linked) or 'nothing'}\n".encode())
            out.flush()
            record.metadata["currentPhase"] = "BUILD"
            now = datetime.now(UTC)
            record.process = subprocess.Popen(
                ["bash", str(record.folder / "phases.sh")],
                cwd=src,
                env=variables,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = record.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill(record)
                raise BuildFailed("BUILD", f"Build timed out after {timeout / 60:.0f} minutes") from None
        if code != 0:
            raise failure_of(record.log.read_text(errors="replace"), code)
        for phase in LOCAL_PHASES:
            self._phase(record, phase, "SUCCEEDED", now)

    def _post_build(self, record: BuildRecord, repository_uri: str, tag: str, pushed: bool) -> None:
        """POST_BUILD: the image pushed to the local ECR unless it was already; its digest exported."""
        repository = repository_uri.partition("/")[2]
        record.metadata["currentPhase"] = "POST_BUILD"
        now = datetime.now(UTC)
        if not pushed:
            self.push(repository, tag, record.image)
        digest = self._digest(repository, tag)
        if not digest:
            raise BuildFailed("POST_BUILD", f"{tag} is not in the local ECR repository {repository}")
        record.metadata["exportedEnvironmentVariables"] = [
            {"name": "IMAGE_DIGEST", "value": digest},
            {"name": "IMAGE_URI", "value": f"{repository_uri}@{digest}"},
        ]
        self._phase(record, "POST_BUILD", "SUCCEEDED", now)

    def push(self, repository: str, tag: str, image: str) -> None:
        """``docker push`` to the local ECR: the tag recorded with a manifest naming the local image id."""
        found = subprocess.run(
            [self.docker, "image", "inspect", "--format", "{{.Id}} {{.Size}}", image],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if found.returncode != 0:
            raise BuildFailed("POST_BUILD", f"the build made no image {image}: {found.stderr.strip()}")
        image_id, size = found.stdout.split()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": image_id,
                "size": int(size),
            },
            "layers": [],
        }
        self.client("ecr").put_image(repositoryName=repository, imageTag=tag, imageManifest=json.dumps(manifest))

    def _digest(self, repository: str, tag: str) -> str | None:
        ecr = self.client("ecr")
        try:
            details = ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])["imageDetails"]
        except (ecr.exceptions.ImageNotFoundException, ecr.exceptions.RepositoryNotFoundException):
            return None
        return str(details[0]["imageDigest"]) if details else None

    def local_image(self, uri: str) -> str | None:
        """The local tag an ECR URI of the local account names (``repo@sha256:…`` or ``repo:tag``), if any."""
        registry, _, rest = uri.partition("/")
        if ".dkr.ecr." not in registry or not rest:
            return None
        if "@" in rest:
            repository, _, digest = rest.partition("@")
            image_id = {"imageDigest": digest}
        else:
            repository, _, tag = rest.partition(":")
            image_id = {"imageTag": tag}
        ecr = self.client("ecr")
        try:
            details = ecr.describe_images(repositoryName=repository, imageIds=[image_id])["imageDetails"]
        except (ecr.exceptions.ImageNotFoundException, ecr.exceptions.RepositoryNotFoundException):
            return None
        tags = details[0].get("imageTags") or [] if details else []
        return f"{registry}/{repository}:{tags[0]}" if tags else None

    def failure(self, build_id: str | None = None) -> str | None:
        """What the given (or the last) failed build says: status, phase, command and its log's last lines."""
        records = [self.builds[build_id]] if build_id in self.builds else list(self.builds.values())[-1:]
        return next((r.failure for r in records if r.failure), None)

    def _kill(self, record: BuildRecord) -> None:
        process = record.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, 15)  # the build's own session: bash, make, docker build
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)

    def shutdown(self) -> None:
        """StopBuild for every running build; wait for the threads."""
        self.stop.set()
        for record in self.builds.values():
            self._kill(record)
        for thread in self.threads:
            thread.join(timeout=60)


def link_tree(source: Path, dest: Path) -> bool:
    """Hard-link ``source``'s files under ``dest`` (same file system; nothing is copied). False if absent."""
    if not source.is_dir() or dest.exists():
        return False
    try:
        shutil.copytree(source, dest, copy_function=os.link)
    except (OSError, shutil.Error) as error:
        log.info("cannot hard-link %s into the build (%s); the build fills it itself", source, error)
        shutil.rmtree(dest, ignore_errors=True)
        return False
    return True

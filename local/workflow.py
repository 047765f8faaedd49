"""``python -m local workflow``: the deployed state machine, executed on this machine with real work behind it.

    with LocalWorkflow(runtime, Path("wf"), sys.stdout) as workflow:
        outcome = workflow.run(WorkflowRun(training=Path("data/train"), image="maskrcnn-sagemaker:latest"))

What runs, and who does it:

* the definition is ``pipeline.workflow.build_definition`` with the substitutions the stack's template
  names (``DefinitionSubstitutions``), as ``render`` writes it and ``deploy`` deploys it; the one local
  change is that Waits and retry intervals above ``SHORT_WAIT_S`` are shortened, and the run says so;
* the execution input is built by ``pipeline.__main__.execution_from_args``, the code of ``pipeline start``;
* moto's Step Functions interpreter executes it (``mock_aws`` in this process, adapted by
  :mod:`local.sfn`); every service call goes to moto's backends, and the SageMaker ones that do work are
  served for real by :class:`LocalSageMaker`:
  - CreateTrainingJob downloads the job's S3 channels into the job folder and runs
    :func:`local.training.run_training` in a thread (hyperparameters and instance count from the request);
    DescribeTrainingJob reports InProgress, then Completed with ``ModelArtifacts`` (``model.tar.gz``
    uploaded to ``OutputPath/<job>/output/``) and ``FinalMetricDataList`` (the last value of every metric
    the image's ``METRIC_DEFINITIONS`` read from the log), or Failed / Stopped with the job's own
    FailureReason;
  - CreateEndpoint / UpdateEndpoint download the model's ``ModelDataUrl`` from S3 and start
    :class:`local.endpoint.Endpoint` in a thread, behind a :class:`local.router.Router` whose URL is the
    endpoint's: Creating / Updating until ``/ping`` answers, then InService; Failed with the server's last lines
    as FailureReason. An update is blue/green as its DeploymentConfig asks: the new server starts beside the
    old one, gets the canary share of a smoke load for the baking period, and the rollback alarms are evaluated
    from its answers (5xx count, p99 latency) and set in CloudWatch; then all traffic shifts to it and the old
    server stops, or the new one stops and the endpoint stays InService on its old config (rolled back);
* S3 is moto's: the data folders are uploaded file by file, as ``aws s3 cp --recursive`` would.

* the build branch (``--build``): the build Lambda's handler and CodeBuild's StartBuild / BatchGetBuilds are
  served by :class:`local.codebuild.LocalCodeBuild` (the buildspec on the local Docker engine).

What moto answers by itself (CreateModel, CreateEndpointConfig, ListEndpoints, ECR) keeps moto's behaviour.
The local AWS lives as long as the :class:`LocalWorkflow`: a second ``run`` in the same one sees the
first's endpoint and takes the UpdateEndpoint branch; a second command starts from an empty account.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO
from unittest import mock

import boto3
from maskrcnn.contract import EXIT_STOPPED
from maskrcnn.dataset_layout import IMAGE_SUFFIXES

from local import client
from local.codebuild import LocalCodeBuild, package_context
from local.endpoint import Endpoint
from local.errors import HarnessError, JobFailed
from local.layout import JobSpec, parse_pairs
from local.progress import Progress
from local.router import Router
from local.runtime import REPO, Runtime, free_port
from local.s3 import download_prefix, split_uri, upload_folder
from local.sfn import Backing, history, interpreter_patches, json_safe
from local.training import run_training
from pipeline.__main__ import execution_from_args, parser
from pipeline.aws import git_sha
from pipeline.build_lambda import SOURCE_VERSION_FILE
from pipeline.execution import PRESETS, WORKFLOW_PRESET, InputError, workflow_hyperparameters
from pipeline.settings import StackSettings
from pipeline.template import build_template
from pipeline.workflow import ERROR_METRIC, build_definition, substitute

log = logging.getLogger(__name__)

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
DATA_BUCKET = "maskrcnn-local-data"
ARTIFACT_BUCKET = "maskrcnn-local-artifacts"  # the stack's ArtifactBucket
SHORT_WAIT_S = 2  # Wait states and retry intervals above this are shortened to it
LOCAL_BAKING_S = 6  # a blue/green update's baking period here: the smoke load runs this long
POLL_S = 0.5


def local_arns(settings: StackSettings) -> dict[str, str]:
    """The ARN each stack resource a DefinitionSubstitution names would have, in the local account."""
    return {
        "BuildFunction": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{settings.function_name}",
        "SageMakerExecutionRole": f"arn:aws:iam::{ACCOUNT}:role/{settings.prefix}-sagemaker",
    }


def deployed_definition(settings: StackSettings) -> dict[str, Any]:
    """``build_definition`` with the template's own DefinitionSubstitutions, as ``deploy`` deploys it."""
    substitutions = build_template(settings)["Resources"]["StateMachine"]["Properties"]["DefinitionSubstitutions"]
    arns = local_arns(settings)
    values = {}
    for name, value in substitutions.items():
        resource = value["Fn::GetAtt"][0] if isinstance(value, dict) and "Fn::GetAtt" in value else None
        if resource not in arns:
            raise HarnessError(f"the template substitutes ${{{name}}} with {value}; the local run has no value for it")
        values[name] = arns[resource]
    return substitute(build_definition(settings), values)


def shorten_waits(definition: Mapping[str, Any], seconds: int = SHORT_WAIT_S) -> tuple[dict[str, Any], list[str]]:
    """A copy with every Wait and retry interval at most ``seconds``; and what was changed, for the user."""
    short = copy.deepcopy(dict(definition))
    changes = []
    for name, state in short["States"].items():
        if state["Type"] == "Wait" and state.get("Seconds", 0) > seconds:
            changes.append(f"{name} waits {seconds} s (deployed: {state['Seconds']} s)")
            state["Seconds"] = seconds
        for retry in state.get("Retry", []):
            if retry.get("IntervalSeconds", 1) > seconds:
                changes.append(f"{name} retries after {seconds} s (deployed: {retry['IntervalSeconds']} s)")
                retry["IntervalSeconds"] = seconds
    return short, changes


def image_uri(tag: str, repository: str, runtime: Runtime) -> str:
    """The ECR URI pinned by digest that stands for local image ``tag`` in the execution input.

    The digest is the local image's id when the engine has it (docker mode), else a hash of the tag:
    process mode runs the repository's code, and the workflow only needs the URI's shape.
    """
    digest = hashlib.sha256(tag.encode()).hexdigest()
    if runtime.mode == "docker":
        found = subprocess.run(
            [runtime.docker, "image", "inspect", "--format", "{{.Id}}", tag],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if found.returncode == 0 and found.stdout.strip().startswith("sha256:"):
            digest = found.stdout.strip().removeprefix("sha256:")
    return f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{repository}@sha256:{digest}"


def final_metrics(history_records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The last value of every metric the job logged (``name:metric`` keys), as FinalMetricDataList holds."""
    last: dict[str, float] = {}
    for record in history_records:
        last.update({k: float(v) for k, v in record.items() if ":" in k and isinstance(v, int | float)})
    return last


class _LogProgress(Progress):
    """The job's log into a file; milestones logged as usual."""

    def __init__(self, path: Path):
        self._file: TextIO = path.open("a")
        super().__init__(self._file, every_s=10.0)

    def close(self) -> None:
        self._file.close()


class LocalSageMaker:
    """The SageMaker calls that do work, served by the harness; moto's records reach it through :class:`Backing`."""

    def __init__(self, runtime: Runtime, root: Path, notes: queue.Queue[str]):
        self.runtime = runtime
        self.root = root
        self.notes = notes
        self.endpoints: dict[str, Endpoint] = {}  # the model server now taking all traffic
        self.routers: dict[str, Router] = {}  # the endpoint's URL, in front of its servers
        self.canaries: dict[str, Endpoint] = {}  # a new model's server while an update decides on it
        self.urls: dict[str, str] = {}
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()  # StopTrainingJob for every running job (Ctrl-C)
        self._lock = threading.Lock()
        # An ECR URI of the local account -> the local image built for it (LocalCodeBuild.local_image).
        self.resolve_image: Callable[[str], str | None] = lambda uri: None

    def runtime_for(self, uri: str) -> Runtime:
        """The runtime that runs ``uri``: in docker mode the local image the local ECR names, else --image's."""
        if self.runtime.mode != "docker":
            return self.runtime  # process mode runs this checkout's code whatever the image
        local = self.resolve_image(uri)
        return self.runtime if local is None else dataclasses.replace(self.runtime, image=local)

    def create_training_job(self, job: Any) -> None:
        job.training_job_status, job.secondary_status = "InProgress", "Starting"
        job.model_artifacts = job.final_metric_data_list = job.training_end_time = None
        job.secondary_status_transitions = []
        self._start(self.train, job)

    def create_endpoint(self, endpoint: Any, config_name: str) -> None:
        endpoint.endpoint_status = "Creating"
        self._start(self.serve, endpoint, config_name)

    def update_endpoint(self, endpoint: Any, config_name: str, deployment_config: Any) -> None:
        endpoint.endpoint_status = "Updating"
        self._start(self.serve, endpoint, config_name, deployment_config)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    @staticmethod
    def _client(service: str) -> Any:
        return boto3.client(service, region_name=REGION)

    def train(self, job: Any) -> None:
        """One CreateTrainingJob, to its end; the outcome lands on moto's job record."""
        name = job.training_job_name
        folder = self.root / "jobs" / name
        started = time.monotonic()
        progress: Progress | None = None
        try:
            s3 = self._client("s3")
            channels = {}
            for channel in job.input_data_config:
                uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
                channels[channel["ChannelName"]] = dest = folder / "channels" / channel["ChannelName"]
                count = download_prefix(s3, uri, dest)
                self.notes.put(f"training job {name}: channel {channel['ChannelName']} <- {uri} ({count} files)")
            spec = JobSpec(
                name=name,
                channels=channels,
                hyperparameters=dict(job.hyper_parameters or {}),
                instance_count=int(job.resource_config.get("InstanceCount", 1)),
            )
            job.secondary_status = "Training"
            progress = _LogProgress(folder / "train.log")
            runtime = self.runtime_for(job.algorithm_specification["TrainingImage"])
            where = f"image {runtime.image}" if runtime.mode == "docker" else "process mode"
            self.notes.put(f"training job {name}: {where}, log {folder / 'train.log'}")
            result = run_training(spec, folder / "job", runtime, progress, stop_request=self.stop)
            job.secondary_status = "Uploading"
            model_uri = _model_artifacts_uri(job)
            bucket, key = split_uri(model_uri)
            assert result.model_archive is not None
            s3.upload_file(str(result.model_archive), bucket, key)
            now = datetime.now(UTC)
            metrics = final_metrics(result.history)
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in _SHOWN_METRICS) or "none logged"
            self.notes.put(f"training job {name}: Completed in {result.seconds:.1f} s; metrics: {shown}")
            self.notes.put(f"training job {name}: model {model_uri}")
            job.final_metric_data_list = [
                {"MetricName": k, "Value": v, "Timestamp": now} for k, v in sorted(metrics.items())
            ]
            job.model_artifacts = {"S3ModelArtifacts": model_uri}
            job.training_job_status = job.secondary_status = "Completed"
        except JobFailed as failed:
            status = "Stopped" if failed.exit_code == EXIT_STOPPED else "Failed"
            self.notes.put(f"training job {name}: {status}: {failed.reason}")
            job.failure_reason = failed.reason
            job.training_job_status = job.secondary_status = status
        except Exception as error:  # any harness problem is the job's FailureReason, as on SageMaker
            reason = f"{type(error).__name__}: {error}"
            self.notes.put(f"training job {name}: Failed: {reason}")
            job.failure_reason = reason
            job.training_job_status = job.secondary_status = "Failed"
        finally:
            if progress is not None:
                progress.close()
            job.training_end_time = job.last_modified_time = datetime.now(UTC)
            log.debug("training job %s ended after %.1f s", name, time.monotonic() - started)

    def serve(self, endpoint: Any, config_name: str, deployment_config: Any = None) -> None:
        """CreateEndpoint or UpdateEndpoint: the config's model from S3 behind a server, behind the endpoint's URL."""
        name = endpoint.endpoint_name
        try:
            container, archive = self._model_for(name, config_name)
            server = Endpoint(self.runtime_for(container["Image"]), archive, free_port(), container.get("Environment"))
            with self._lock:
                previous, router = self.endpoints.get(name), self.routers.get(name)
            if previous is not None and router is not None:
                self._update(endpoint, config_name, previous, server, router, deployment_config or {})
                return
            server.start()
            router = Router(free_port())
            router.route({server.url: 1.0})
            router.start()
            with self._lock:
                self.endpoints[name], self.routers[name], self.urls[name] = server, router, router.url
            self.notes.put(f"endpoint {name}: InService at {router.url} ({container['ModelDataUrl']})")
            endpoint.endpoint_config_name = config_name
            endpoint.failure_reason = None
            endpoint.endpoint_status = "InService"
        except Exception as error:  # whatever stops the server is DescribeEndpoint's FailureReason
            self.notes.put(f"endpoint {name}: Failed: {error}")
            endpoint.failure_reason = str(error)[-2000:]
            endpoint.endpoint_status = "Failed"
        finally:
            endpoint.last_modified_time = datetime.now(UTC)

    def _model_for(self, name: str, config_name: str) -> tuple[dict[str, Any], Path]:
        """The config's (first) container and its model.tar.gz, downloaded from ModelDataUrl."""
        sagemaker, s3 = self._client("sagemaker"), self._client("s3")
        config = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)
        container: dict[str, Any] = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])[
            "PrimaryContainer"
        ]
        archive = self.root / "endpoints" / name / config_name / "model.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        bucket, key = split_uri(container["ModelDataUrl"])
        s3.download_file(bucket, key, str(archive))
        return container, archive

    def _update(
        self, endpoint: Any, config_name: str, old: Endpoint, new: Endpoint, router: Router, deployment: Any
    ) -> None:
        """Blue/green, as SageMaker's DeploymentConfig asks: the new server beside the old one, the canary share of
        a smoke load to it for the baking period, the alarms evaluated from what it answered; then all traffic to
        it (the old server stops) or none (the new server stops). The URL answers throughout. One difference: the
        canary's share is of the harness's own load; requests to the URL stay on the old model until the shift
        (SageMaker sends them the canary share too)."""
        name = endpoint.endpoint_name
        policy = deployment.get("BlueGreenUpdatePolicy", {}).get("TrafficRoutingConfiguration", {})
        share = policy.get("CanarySize", {}).get("Value", 100) / 100 if policy.get("Type") == "CANARY" else 1.0
        baking = float(policy.get("WaitIntervalInSeconds", 0))
        alarms = [a["AlarmName"] for a in deployment.get("AutoRollbackConfiguration", {}).get("Alarms", [])]
        self.notes.put(f"endpoint {name}: starting {config_name} beside the serving model")
        with self._lock:
            self.canaries[name] = new  # stopped by shutdown too, whatever happens here
        try:
            new.start()
        except Exception as error:
            self._roll_back(endpoint, old, new, f"the new model's server did not start: {error}")
            return
        self.notes.put(f"endpoint {name}: canary {share:.0%} of a smoke load to {config_name} for {baking:.0f} s")
        try:
            answers, sent = self._smoke_load(old.url, new.url, share, baking)
            fired = self._evaluate_alarms(alarms, answers, sent)
        except Exception as error:
            self._roll_back(endpoint, old, new, f"the canary could not be measured: {error}")
            return
        if fired:
            self._roll_back(endpoint, old, new, f"alarm(s) {', '.join(fired)} went to ALARM while baking")
            return
        router.route({new.url: 1.0})
        old.stop()
        with self._lock:
            self.endpoints[name] = new
            self.canaries.pop(name, None)
        self.notes.put(f"endpoint {name}: all traffic to {config_name}; the old model's server stopped")
        endpoint.endpoint_config_name = config_name
        endpoint.failure_reason = None
        endpoint.endpoint_status = "InService"

    def _roll_back(self, endpoint: Any, old: Endpoint, new: Endpoint, reason: str) -> None:
        new.stop()
        with self._lock:
            self.canaries.pop(endpoint.endpoint_name, None)
        self.notes.put(f"endpoint {endpoint.endpoint_name}: rolled back, the old model serves on: {reason}")
        endpoint.failure_reason = f"Rolled back: {reason}"[-2000:]
        endpoint.endpoint_status = "InService"  # on its old config, as after SageMaker's rollback

    def _smoke_load(
        self, old_url: str, new_url: str, share: float, seconds: float
    ) -> tuple[list[tuple[int, float]], int]:
        """One training image, again and again for ``seconds``: every request the canary's share in turn goes to
        the new server, the others to the old one, until at least one reached the new. Returns the new server's
        answers (HTTP status, seconds) and how many requests were sent in all."""
        image = smoke_image(self.root.glob("jobs/*/channels/training/**/*"))
        deadline, sent = time.monotonic() + seconds, 0
        answers: list[tuple[int, float]] = []
        while not answers or time.monotonic() < deadline:
            canary = int((sent + 1) * share) > int(sent * share)
            started = time.monotonic()
            if image is None:
                status = 200 if client.ping(new_url if canary else old_url) else 503
            else:
                body, kind = image.read_bytes(), client.content_type_for(image)
                status = client.invoke(new_url if canary else old_url, body, kind).status
            if canary:
                answers.append((status, time.monotonic() - started))
            sent += 1
        return answers, sent

    def _evaluate_alarms(self, names: Sequence[str], answers: Sequence[tuple[int, float]], sent: int) -> list[str]:
        """Each alarm's metric from the new server's answers (5xx count; p99 latency of the round trip, in
        ModelLatency's microseconds) against its threshold; the state is set in CloudWatch. Returns those fired."""
        if not names:
            return []
        cloudwatch = self._client("cloudwatch")
        fired = []
        for alarm in cloudwatch.describe_alarms(AlarmNames=list(names))["MetricAlarms"]:
            if alarm["MetricName"] == ERROR_METRIC:
                value = float(sum(status >= 500 for status, _ in answers))
            else:
                latencies = sorted(seconds * 1e6 for _, seconds in answers)
                value = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
            state = "ALARM" if answers and value > alarm["Threshold"] else "OK"
            reason = f"{alarm['MetricName']} {value:.0f} over {len(answers)} of {sent} requests"
            cloudwatch.set_alarm_state(AlarmName=alarm["AlarmName"], StateValue=state, StateReason=reason)
            self.notes.put(f"alarm {alarm['AlarmName']}: {reason}, threshold {alarm['Threshold']:.0f}: {state}")
            if state == "ALARM":
                fired.append(alarm["AlarmName"])
        return fired

    def shutdown(self, keep: Sequence[str] = ()) -> None:
        """Stop running jobs and every server except ``keep``; wait for the worker threads."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)
        with self._lock:
            for canary in self.canaries.values():
                canary.stop()
            self.canaries.clear()
            for name in [n for n in self.endpoints if n not in keep]:
                self.routers.pop(name).stop()
                self.endpoints.pop(name).stop()


_SHOWN_METRICS = ("train:loss", "validation:segm_AP50", "validation:bbox_AP50")


def _model_artifacts_uri(job: Any) -> str:
    """SageMaker's place for the model: ``S3OutputPath/<job name>/output/model.tar.gz``."""
    base = job.output_data_config["S3OutputPath"].rstrip("/")
    return f"{base}/{job.training_job_name}/output/model.tar.gz"


@dataclass(frozen=True)
class WorkflowRun:
    """One execution: what ``python -m local workflow`` takes besides --mode and --output."""

    training: Path
    validation: Path | None = None
    pretrained: Path | None = None
    image: str | None = None  # a local image tag: the given-image branch
    build: bool = False  # the build branch: the build Lambda and a local CodeBuild build the image
    hyperparameters: Sequence[str] = ()  # KEY=VALUE, as `pipeline start -p` takes them
    build_context: Path | None = None  # what the Lambda ships (default: this checkout, packaged as deploy does)
    gate: str | None = None  # METRIC=MIN, as `pipeline start --gate` takes it (None: the workflow's default)
    approve: str = "auto"  # auto | manual, as `pipeline start --approve`; manual waits for `pipeline approve`
    approval_timeout_s: int = 3600  # how long a manual approval is waited for


@dataclass
class Outcome:
    """How an execution ended, and the smoke request's result."""

    name: str
    status: str
    seconds: float
    folder: Path
    endpoint_name: str
    failed_state: str | None = None
    error: str | None = None
    cause: str | None = None
    detail: str | None = None  # what failed below the state: the task's own error, the build's failing command
    endpoint_url: str | None = None
    smoke: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED" and self.smoke.get("status") == 200


class LocalWorkflow:
    """moto's AWS in this process, the interpreter adapted, SageMaker served by the harness."""

    def __init__(self, runtime: Runtime, output: Path, stream: TextIO, settings: StackSettings | None = None):
        self.runtime = runtime
        self.output = output
        self.stream = stream
        self.settings = settings or StackSettings()
        self.notes: queue.Queue[str] = queue.Queue()
        self.sagemaker = LocalSageMaker(runtime, output, self.notes)
        self.codebuild = LocalCodeBuild(output, self.notes, LocalSageMaker._client, runtime.docker)
        self.sagemaker.resolve_image = self.codebuild.local_image
        self.lambda_calls: list[dict[str, Any]] = []
        self._stack = ExitStack()
        self.state_machine_arn = ""
        self.keep: list[str] = []
        self.aws_endpoint_url: str | None = None  # the local AWS over HTTP, for commands run elsewhere

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> LocalWorkflow:
        if self.output.exists() and any(self.output.iterdir()):
            raise HarnessError(f"{self.output} is not empty; choose a new --output")
        self.output.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        from moto import mock_aws  # a heavy development dependency; only this command needs it

        # Nothing of the person's AWS set-up may reach the local account: fake keys, one region.
        env = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": REGION}
        self._stack.enter_context(mock.patch.dict(os.environ, env))
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            os.environ.pop(name, None)  # patch.dict restores them on exit
        handlers = {self.settings.function_name: self.codebuild.handler}
        # What does the work behind moto's records: SageMaker's jobs and endpoints here, CodeBuild's builds.
        sagemaker, codebuild = self.sagemaker, self.codebuild
        backing = Backing(
            training_job=sagemaker.create_training_job,
            create_endpoint=sagemaker.create_endpoint,
            update_endpoint=sagemaker.update_endpoint,
            start_build=codebuild.start,
            batch_get_builds=codebuild.batch_get_builds,
        )
        for owner, name, value in interpreter_patches(handlers, self.lambda_calls, backing):
            self._stack.enter_context(mock.patch.object(owner, name, value, create=True))
        self._stack.enter_context(mock_aws(config={"stepfunctions": {"execute_state_machine": True}}))
        # moto warns for every optimised SageMaker integration it forwards as a plain API call and logs each
        # failed task with its whole parse tree; the run reports both in its own words (-v shows moto's).
        self._stack.enter_context(_quiet(logging.getLogger("moto.stepfunctions"), logging.CRITICAL))
        self._stack.enter_context(_quiet(logging.getLogger("botocore.credentials"), logging.WARNING))
        self._stack.callback(self._shutdown)

        s3 = self.sagemaker._client("s3")
        for bucket in (DATA_BUCKET, ARTIFACT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        # The stack's AWS::SageMaker::ModelPackageGroup, which RegisterModel versions into.
        self.sagemaker._client("sagemaker").create_model_package_group(
            ModelPackageGroupName=self.settings.model_package_group_name
        )
        definition, changes = shorten_waits(deployed_definition(self.settings))
        (self.output / "statemachine.asl.json").write_text(json.dumps(definition, indent=2) + "\n")
        self.state_machine_arn = self.sagemaker._client("stepfunctions").create_state_machine(
            name=self.settings.state_machine_name,
            definition=json.dumps(definition),
            roleArn=f"arn:aws:iam::{ACCOUNT}:role/{self.settings.prefix}-states",
        )["stateMachineArn"]
        self.say(f"state machine {self.settings.state_machine_name}: the deployed definition (pipeline.workflow)")
        self.say(f"  shortened for the local run: {'; '.join(changes) or 'nothing'}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stack.close()

    def _shutdown(self) -> None:
        self.codebuild.shutdown()
        self.sagemaker.shutdown(keep=self.keep)
        self._drain()

    def _serve_aws(self) -> None:
        """The local account over HTTP (moto's server, this process's backends), so that `pipeline approve`
        run in another shell reaches it; without moto's server extras only this process can approve."""
        if self.aws_endpoint_url is not None:
            return
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as missing:  # flask-cors, which moto's server needs
            self.say(f"note: moto's server cannot start ({missing}); only this process can approve")
            return
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        self._stack.callback(server.stop)
        self.aws_endpoint_url = f"http://127.0.0.1:{port}"

    def endpoint(self, name: str) -> Endpoint | None:
        return self.sagemaker.endpoints.get(name)

    def run(self, run: WorkflowRun) -> Outcome:
        """Upload the data, start one execution, follow it to its end, send one smoke request."""
        if run.build == (run.image is not None):
            raise HarnessError("pass either --image TAG (the given-image branch) or --build (the build branch)")
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")[:-3]
        name = f"{self.settings.prefix}-{stamp}"
        folder = self.output / name
        folder.mkdir(parents=True)
        s3 = self.sagemaker._client("s3")
        uris = {}
        for channel, path in (
            ("training", run.training),
            ("validation", run.validation),
            ("pretrained", run.pretrained),
        ):
            if path is None:
                continue
            if not path.is_dir():
                raise HarnessError(f"--{channel}-data {path} is not a folder")
            uris[channel] = f"s3://{DATA_BUCKET}/{stamp}/{channel}/"
            count = upload_folder(s3, path, uris[channel])
            self.say(f"uploaded {path} -> {uris[channel]} ({count} files)")

        overrides = parse_pairs(run.hyperparameters)
        try:
            workflow_hyperparameters(overrides)
            checked = [f"{k}={v}" for k, v in overrides.items()]
        except InputError as error:
            # `pipeline start` refuses this before any AWS call; locally it goes through, so the
            # training job's own failure and the workflow's failure path can be seen.
            self.say(f"note: `pipeline start` would refuse these hyperparameters (exit 2): {error}")
            self.say("      the local run passes them to the training job unchecked")
            checked = []
        uri, sha = None, None
        if run.image is not None:
            uri = image_uri(run.image, self.settings.repository_name, self.runtime)
            self.say(f"image {run.image} ({self.runtime.mode} mode) stands as {uri}")
        else:
            sha = self._prepare_build(run.build_context)
        args = _start_args(uris, uri, checked, run)
        execution = execution_from_args(args, self.settings, ARTIFACT_BUCKET, stamp, sha)
        execution = self._localise(execution)
        document = execution.to_document()
        if not checked and overrides:
            document["Training"]["HyperParameters"] = {**PRESETS[WORKFLOW_PRESET], **overrides}
        (folder / "input.json").write_text(json.dumps(document, indent=2) + "\n")
        return self._execute(execution.job_name, document, folder)

    def _localise(self, execution: Any) -> Any:
        """The input's intervals that the definition reads from it, shortened as its Waits are; said aloud."""
        if execution.baking_seconds > LOCAL_BAKING_S:
            self.say(f"  an update bakes its canary {LOCAL_BAKING_S} s (deployed: {execution.baking_seconds} s)")
            execution = dataclasses.replace(execution, baking_seconds=LOCAL_BAKING_S)
        if execution.approval_poll_seconds > SHORT_WAIT_S:
            self.say(f"  approval polls every {SHORT_WAIT_S} s (deployed: {execution.approval_poll_seconds} s)")
            execution = dataclasses.replace(execution, approval_poll_seconds=SHORT_WAIT_S)
        gate = f"{execution.gate_metric} >= {execution.gate_min_value}"
        self.say(f"quality gate: {gate}; approval: {execution.approval}")
        if execution.approval == "manual":
            self._serve_aws()
        return execution

    def _prepare_build(self, context: Path | None) -> str:
        """The build function's context and environment; returns the commit the execution asks to build."""
        if context is None:
            context, sha = package_context(self.output / "build-function")
            self.say(f"build function: this checkout at {sha[:12]}, packaged as `pipeline deploy` does")
        else:
            marker = context / SOURCE_VERSION_FILE
            sha = marker.read_text().strip() if marker.is_file() else git_sha(REPO)
            self.say(f"build function: the context {context} ({sha[:12]})")
        self.codebuild.configure(self.settings, context, ARTIFACT_BUCKET, ACCOUNT, REGION)
        if self.runtime.mode != "docker":
            self.say("process mode: the job and the endpoint run this checkout's code, not the image built")
        return sha

    def _execute(self, name: str, document: dict[str, Any], folder: Path) -> Outcome:
        sfn = self.sagemaker._client("stepfunctions")
        started = time.monotonic()
        arn = sfn.start_execution(stateMachineArn=self.state_machine_arn, name=name, input=json.dumps(document))[
            "executionArn"
        ]
        self.say(f"execution {name} started")
        events = list(self._follow(sfn, arn))
        described = sfn.describe_execution(executionArn=arn)
        (folder / "history.json").write_text(json.dumps(json_safe(events), indent=1) + "\n")
        outcome = Outcome(
            name=name,
            status=described["status"],
            seconds=round(time.monotonic() - started, 1),
            folder=folder,
            endpoint_name=document["EndpointName"],
        )
        if outcome.status != "SUCCEEDED":
            outcome.failed_state = _failed_state(events)
            outcome.error = described.get("error")
            outcome.cause = described.get("cause")
            if outcome.failed_state == "BuildFailed":
                outcome.detail = self.codebuild.failure()
            elif outcome.error != (task := _last_task_failure(events)).partition(":")[0]:
                outcome.detail = task or None
        else:
            outcome.endpoint_url = self.sagemaker.urls.get(document["EndpointName"])
            outcome.smoke = smoke_request(outcome.endpoint_url, document, self.output)
        (folder / "execution.json").write_text(
            json.dumps(json_safe({"describe_execution": described, "outcome": asdict(outcome)}), indent=1) + "\n"
        )
        return outcome

    def _drain(self) -> None:
        while True:
            try:
                self.say(f"    {self.notes.get_nowait()}")
            except queue.Empty:
                return

    def _follow(self, sfn: Any, arn: str) -> Iterator[dict[str, Any]]:
        """Yield the execution's events as they happen, printing states entered and left."""
        seen = 0
        entered: dict[str, datetime] = {}
        done = False
        depth = 0  # inside a Map iteration: its states are the Map's detail, not printed
        while True:
            if not done:
                done = sfn.describe_execution(executionArn=arn)["status"] != "RUNNING"
            self._drain()  # what the services did comes before the states that saw it
            events = list(history(sfn, arn))
            for event in events[seen:]:
                depth += event["type"] == "MapIterationStarted"
                depth -= event["type"] in ("MapIterationSucceeded", "MapIterationFailed", "MapIterationAborted")
                if depth == 0:
                    self._report(event, entered)
                yield event
            seen = len(events)
            if done:
                return
            time.sleep(POLL_S)

    def _report(self, event: Mapping[str, Any], entered: dict[str, datetime]) -> None:
        kind = event["type"]
        if kind.endswith("StateEntered"):
            state = event["stateEnteredEventDetails"]["name"]
            entered[state] = event["timestamp"]
            self.say(f"> {state}")
        elif kind.endswith("StateExited"):
            state = event["stateExitedEventDetails"]["name"]
            took = (event["timestamp"] - entered.get(state, event["timestamp"])).total_seconds()
            self.say(f"< {state} ({took:.1f} s)")
            self._explain(state, json.loads(event["stateExitedEventDetails"].get("output") or "{}"))
        elif kind in ("TaskFailed", "LambdaFunctionFailed"):  # the execution's own failure is in the verdict
            details: Mapping[str, Any] = next((v for k, v in event.items() if k.endswith("EventDetails")), {})
            self.say(f"! {kind}: {details.get('error', '')}: {details.get('cause', '')}")

    def _explain(self, state: str, output: Mapping[str, Any]) -> None:
        """The numbers behind a decision, from the state's own output: the gate's metric, the registration."""
        if state == "ReadGateMetric":
            gate = output["Gate"]
            verdict = "passes" if gate["Value"] >= gate["MinValue"] else "is below"
            self.say(f"    quality gate: {gate['MetricName']} = {gate['Value']} {verdict} the bar {gate['MinValue']}")
        elif state == "RegisterModel":
            package = output["ModelPackage"]["Arn"]
            self.say(f"    registered {package} as {output['Registration']['Status']}")
            if output["Registration"]["Status"] != "Approved":
                command = review_command(package, self.aws_endpoint_url)
                self.say(f"    waiting for approval; approve it (or `reject`) in another shell:\n      {command}")


def review_command(package_arn: str, endpoint_url: str | None, verb: str = "approve") -> str:
    """The command a person runs to approve (or reject) a package the execution waits on, in the local account."""
    local = "AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=" + REGION
    where = f"AWS_ENDPOINT_URL={endpoint_url} {local} " if endpoint_url else ""
    return f"{where}python -m pipeline {verb} --model-package {package_arn}"


@contextmanager
def _quiet(logger: logging.Logger, level: int) -> Iterator[None]:
    previous = logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _start_args(uris: Mapping[str, str], uri: str | None, hyperparameters: list[str], run: WorkflowRun) -> Any:
    """The namespace `pipeline start` parses from the flags this run stands for (its parser: its defaults)."""
    argv = ["start", "--stack", "local", "--training-data", uris["training"], "--approve", run.approve]
    argv += ["--approval-timeout", str(run.approval_timeout_s)]
    for flag, value in (
        ("--validation-data", uris.get("validation")),
        ("--pretrained-data", uris.get("pretrained")),
        ("--image-uri", uri),
        ("--gate", run.gate),
    ):
        if value is not None:
            argv += [flag, value]
    for pair in hyperparameters:
        argv += ["-p", pair]
    return parser().parse_args(argv)


def _last_task_failure(events: Sequence[Mapping[str, Any]]) -> str:
    """``error: cause`` of the execution's last failed task (the Lambda's own error before a Catch), or ''."""
    for event in reversed(events):
        if event["type"] in ("TaskFailed", "LambdaFunctionFailed"):
            details: Mapping[str, Any] = next((v for k, v in event.items() if k.endswith("EventDetails")), {})
            return f"{details.get('error', '')}: {details.get('cause', '')}"
    return ""


def _failed_state(events: Sequence[Mapping[str, Any]]) -> str | None:
    """The state the execution failed in: the last one entered and never left."""
    open_states: list[str] = []
    for event in events:
        if event["type"].endswith("StateEntered"):
            open_states.append(event["stateEnteredEventDetails"]["name"])
        elif event["type"].endswith("StateExited"):
            name = event["stateExitedEventDetails"]["name"]
            if name in open_states:
                open_states.remove(name)
    return open_states[-1] if open_states else None


def smoke_image(paths: Iterable[Path]) -> Path | None:
    """The first (by name) of ``paths`` that is a training image the client can label with a content type."""
    return next(
        (p for p in sorted(paths) if p.suffix.lower() in IMAGE_SUFFIXES and p.suffix.lower() in client.CONTENT_TYPES),
        None,
    )


def smoke_request(url: str | None, document: Mapping[str, Any], output: Path) -> dict[str, Any]:
    """One image of the training data to the endpoint; the answer's status and detections counted."""
    if url is None:
        return {"status": None, "error": "no endpoint URL"}
    training_folder = _local_training_folder(output, document)
    image = smoke_image(training_folder.rglob("*"))
    if image is None:
        return {"status": None, "error": f"no image under {training_folder}"}
    reply = client.invoke(url, image.read_bytes(), client.content_type_for(image))
    result: dict[str, Any] = {"image": image.name, "status": reply.status}
    if reply.ok:
        result["detections"] = sum(len(p.get("instances", [])) for p in reply.json().get("predictions", []))
    else:
        result["error"] = reply.message()
    return result


def _local_training_folder(output: Path, document: Mapping[str, Any]) -> Path:
    """The training channel as the job downloaded it from S3."""
    return output / "jobs" / document["JobName"] / "channels" / "training"


def report(outcome: Outcome, stream: TextIO) -> None:
    """The verdict a person reads last."""
    if outcome.status == "SUCCEEDED":
        smoke = outcome.smoke
        if smoke.get("status") == 200:
            stream.write(
                f"smoke request: {smoke['image']} -> HTTP 200, {smoke['detections']} detection(s) "
                f"from {outcome.endpoint_url}\n"
            )
        else:
            stream.write(f"smoke request FAILED: {smoke}\n")
    else:
        stream.write(
            f"execution {outcome.name} {outcome.status} in state {outcome.failed_state}: "
            f"{outcome.error}: {outcome.cause}\n"
        )
        if outcome.detail:
            stream.write("".join(f"  {line}\n" for line in outcome.detail.splitlines()))
    stream.write(f"execution {outcome.status} in {outcome.seconds:.1f} s; history: {outcome.folder / 'history.json'}\n")
    stream.flush()

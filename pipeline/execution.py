"""The execution input of the train-and-deploy workflow, typed and validated before it is sent.

The state machine reads only this document. Fields a JSONPath cannot build conditionally (the
optional ``validation`` / ``pretrained`` channels, the spot-only ``MaxWaitTimeInSeconds``) are
rendered here into the exact SageMaker request shapes, so the definition stays branch-free::

    ExecutionInput(job_name="maskrcnn-2024-06-01", ..., image_uri=None, git_sha="0123...").to_document()

With ``image_uri`` (an ECR URI pinned by digest, ``...@sha256:<64 hex>``) the workflow skips the
build and trains that exact image; without it, ``git_sha`` selects what CodeBuild builds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskrcnn.contract import DEFAULT_BASE_DIR, SageMakerPaths
from maskrcnn.errors import ConfigError
from maskrcnn.train.config import PRESETS, Hyperparameters
from maskrcnn.train.metrics import METRIC_DEFINITIONS

from pipeline.amis import AmiError, check_training_instance, inference_ami
from pipeline.settings import StackSettings

# What the workflow trains unless `-p KEY=VALUE` overrides a key: a preset of the image's own schema
# (maskrcnn.train.config.Hyperparameters), so every name, type and default has one definition, the image's.
WORKFLOW_PRESET = "gpu-resnet50"
# The quality gate a model must pass to be registered, unless the execution input names another: a metric of
# the image's METRIC_DEFINITIONS (what FinalMetricDataList holds) and the least value it may have.
GATE_METRIC = "validation:segm_AP50"
GATE_MIN_VALUE = 0.5
APPROVAL_MODES = ("auto", "manual")  # auto: registered Approved; manual: PendingManualApproval, awaited
CHECKPOINT_LOCAL_PATH = str(SageMakerPaths(Path(DEFAULT_BASE_DIR)).checkpoints_dir)
# The job's own budget (max_runtime) is MaxRuntimeInSeconds less this: SageMaker's clock also runs while it
# pulls the image and downloads the data, before `train` starts, and while it uploads the model after it.
# A quarter of a short runtime at most. Datasets of hundreds of GB need more: pass `-p max_runtime=...`.
BUDGET_MARGIN_SECONDS = 900

_DIGEST_URI = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+@sha256:[0-9a-f]{64}$")
_GIT_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker job/model/endpoint names


class InputError(ValueError):
    """The execution input would fail in the workflow; raised before anything is started."""


def parse_pairs(pairs: Iterable[str], what: str = "-p") -> dict[str, str]:
    """``["epochs=2", "lr=0.01"]`` -> ``{"epochs": "2", "lr": "0.01"}``; the last of a repeated key wins.

    Values stay strings, as SageMaker delivers them; the job itself decodes and validates them. ``what`` names
    the flag in the message. The harness parses its own ``--hp``/``--env``/``--channel`` with this too.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"{what} takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def workflow_hyperparameters(overrides: Mapping[str, object]) -> dict[str, str]:
    """The workflow preset with ``overrides`` on top, as strings, checked by the image's own decoder.

    An unknown key or a bad value fails here with the message the training job would write to
    ``output/failure`` (naming the accepted keys), before any AWS call.
    """
    resolved = {**PRESETS[WORKFLOW_PRESET], **{k: str(v) for k, v in overrides.items()}}
    try:
        Hyperparameters.from_strings(resolved)
    except ConfigError as error:
        raise InputError(str(error)) from None
    return resolved


def _check_s3(name: str, uri: str) -> None:
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise InputError(f"{name} must be an s3:// URI, got {uri!r}")


@dataclass(frozen=True)
class ExecutionInput:
    """Everything one execution needs; ``to_document()`` is what ``StartExecution`` receives."""

    prefix: str
    job_name: str
    model_name: str
    endpoint_name: str
    training_data: str
    output_path: str
    checkpoint_s3_uri: str
    validation_data: str | None = None
    pretrained_data: str | None = None
    image_uri: str | None = None  # pinned by digest; None = build from git_sha
    git_sha: str | None = None
    release_tag: str | None = None  # promote the built digest to this tag after its tests pass
    training_instance_type: str = "ml.g5.xlarge"
    training_instance_count: int = 1
    volume_size_gb: int = 50
    inference_instance_type: str = "ml.g4dn.xlarge"  # T4: enough for one-image requests
    inference_instance_count: int = 1
    inference_ami_version: str | None = None  # GPU instances: None = pipeline.amis' choice (a driver the image runs)
    max_runtime_seconds: int = 24 * 3600
    use_spot: bool = False
    max_wait_seconds: int = 48 * 3600  # spot only: runtime plus time waiting for capacity
    hyperparameters: Mapping[str, str] = field(default_factory=dict)  # overrides of WORKFLOW_PRESET
    gate_metric: str = GATE_METRIC  # FinalMetricDataList's name of the metric the gate reads
    gate_min_value: float = GATE_MIN_VALUE  # below it: BelowQualityBar, nothing registered or deployed
    approval: str = "manual"  # APPROVAL_MODES
    approval_timeout_seconds: int = 7 * 24 * 3600  # waited for a manual approval, then ApprovalTimedOut
    approval_poll_seconds: int = 60  # between DescribeModelPackage polls while it is pending
    canary_percent: int = 10  # an update's canary: this share of the capacity takes traffic first
    baking_seconds: int = 300  # ... for this long, watched by the alarms, before all traffic shifts
    max_5xx_errors: int = 0  # alarm: more 5xx answers than this in a minute
    max_latency_ms: int = 2000  # alarm: p99 model latency above this in a minute

    def __post_init__(self) -> None:
        for label, name in (
            ("job_name", self.job_name),
            ("model_name", self.model_name),
            ("endpoint_name", self.endpoint_name),
        ):
            if not _NAME.match(name):
                raise InputError(f"{label} {name!r} is not a valid SageMaker name")
            if not name.lower().startswith(self.prefix):
                raise InputError(f"{label} {name!r} must start with {self.prefix!r}: IAM allows only those")
        for label, uri in (
            ("training_data", self.training_data),
            ("output_path", self.output_path),
            ("checkpoint_s3_uri", self.checkpoint_s3_uri),
        ):
            _check_s3(label, uri)
        for label, optional in (
            ("validation_data", self.validation_data),
            ("pretrained_data", self.pretrained_data),
        ):
            if optional is not None:
                _check_s3(label, optional)
        if self.image_uri is None:
            if self.git_sha is None or not _GIT_SHA.match(self.git_sha):
                raise InputError("without image_uri, git_sha (hex) selects the source to build")
        elif not _DIGEST_URI.match(self.image_uri):
            raise InputError(f"image_uri must be an ECR URI pinned by digest (@sha256:...), got {self.image_uri!r}")
        workflow_hyperparameters(self.hyperparameters)
        try:
            check_training_instance(self.training_instance_type)
            inference_ami(self.inference_instance_type, self.inference_ami_version)
        except AmiError as error:
            raise InputError(str(error)) from None
        if self.use_spot and self.max_wait_seconds < self.max_runtime_seconds:
            raise InputError("max_wait_seconds must be at least max_runtime_seconds for spot training")
        self._check_gate_and_approval()

    def _check_gate_and_approval(self) -> None:
        metrics = [d["Name"] for d in METRIC_DEFINITIONS]
        if self.gate_metric not in metrics:
            raise InputError(f"gate metric {self.gate_metric!r} is none the job logs; one of {', '.join(metrics)}")
        if not math.isfinite(self.gate_min_value):
            raise InputError(f"the gate's minimum must be a finite number, got {self.gate_min_value!r}")
        if self.approval not in APPROVAL_MODES:
            raise InputError(f"approval must be one of {', '.join(APPROVAL_MODES)}, got {self.approval!r}")
        if self.approval_poll_seconds < 1 or self.approval_timeout_seconds < 0:
            raise InputError("approval_poll_seconds must be at least 1 and approval_timeout_seconds at least 0")
        if not 1 <= self.canary_percent <= 50:  # SageMaker's CANARY: at most half the capacity
            raise InputError(f"canary_percent must be 1-50, got {self.canary_percent}")
        if not 0 <= self.baking_seconds <= 3600:  # WaitIntervalInSeconds
            raise InputError(f"baking_seconds must be 0-3600, got {self.baking_seconds}")
        if self.max_5xx_errors < 0 or self.max_latency_ms < 1:
            raise InputError("max_5xx_errors must be at least 0 and max_latency_ms at least 1")

    def production_variants(self) -> list[dict[str, Any]]:
        """CreateEndpointConfig's variants; a GPU instance gets the InferenceAmiVersion whose driver the image's
        CUDA reaches (the default AMIs of ml.g4dn/g5/p4d run R470, which it does not), a CPU one none."""
        variant: dict[str, Any] = {
            "VariantName": "AllTraffic",
            "ModelName": self.model_name,
            "InitialInstanceCount": self.inference_instance_count,
            "InstanceType": self.inference_instance_type,
            "ContainerStartupHealthCheckTimeoutInSeconds": 600,
        }
        ami = inference_ami(self.inference_instance_type, self.inference_ami_version)
        if ami is not None:
            variant["InferenceAmiVersion"] = ami
        return [variant]

    def resolved_hyperparameters(self) -> dict[str, str]:
        """The workflow preset overridden by the given values, every value a string as SageMaker requires.

        ``max_runtime`` defaults to the stopping condition less a margin, so the job ends with a model inside
        it instead of being stopped with a checkpoint; a given ``max_runtime`` (0: none) wins."""
        margin = min(BUDGET_MARGIN_SECONDS, self.max_runtime_seconds // 4)
        budget = {"max_runtime": str(self.max_runtime_seconds - margin)}
        return workflow_hyperparameters({**budget, **self.hyperparameters})

    def input_data_config(self) -> list[dict[str, Any]]:
        channels = [
            ("training", self.training_data),
            ("validation", self.validation_data),
            ("pretrained", self.pretrained_data),
        ]
        return [
            {
                "ChannelName": name,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
            for name, uri in channels
            if uri is not None
        ]

    def stopping_condition(self) -> dict[str, int]:
        condition = {"MaxRuntimeInSeconds": self.max_runtime_seconds}
        if self.use_spot:
            condition["MaxWaitTimeInSeconds"] = self.max_wait_seconds
        return condition

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "JobName": self.job_name,
            "ModelName": self.model_name,
            "EndpointName": self.endpoint_name,
            "OutputPath": self.output_path,
            "CheckpointS3Uri": self.checkpoint_s3_uri,
            "Training": {
                "InstanceType": self.training_instance_type,
                "InstanceCount": self.training_instance_count,
                "VolumeSizeInGB": self.volume_size_gb,
                "UseSpot": self.use_spot,
                "StoppingCondition": self.stopping_condition(),
                "HyperParameters": self.resolved_hyperparameters(),
                "InputDataConfig": self.input_data_config(),
            },
            "Inference": {
                "InstanceType": self.inference_instance_type,
                "InstanceCount": self.inference_instance_count,
                "ProductionVariants": self.production_variants(),
            },
            "QualityGate": {"MetricName": self.gate_metric, "MinValue": self.gate_min_value},
            "Approval": {
                "Mode": self.approval,
                "TimeoutSeconds": self.approval_timeout_seconds,
                "PollSeconds": self.approval_poll_seconds,
            },
            "Deployment": {
                "CanaryPercent": self.canary_percent,
                "BakingSeconds": self.baking_seconds,
                "Max5xxErrors": self.max_5xx_errors,
                "MaxModelLatencyMicroseconds": self.max_latency_ms * 1000,  # ModelLatency's unit
            },
        }
        if self.image_uri is not None:
            document["ImageUri"] = self.image_uri
        else:
            build: dict[str, str] = {"GitSha": str(self.git_sha)}
            if self.release_tag:
                build["ReleaseTag"] = self.release_tag
            document["Build"] = build
        return document


def example_input(
    prefix: str = StackSettings.prefix,
    bucket: str = "maskrcnn-example-bucket",
    image_uri: str | None = None,
    use_spot: bool = False,
    approval: str = ExecutionInput.approval,
) -> ExecutionInput:
    """A complete input, used by ``render`` (next to the definition) and by the tests."""
    stamp = "20240601-120000"
    return ExecutionInput(
        prefix=prefix,
        job_name=f"{prefix}-train-{stamp}",
        model_name=f"{prefix}-model-{stamp}",
        endpoint_name=StackSettings(prefix).endpoint_name,
        training_data=f"s3://{bucket}/data/train/",
        validation_data=f"s3://{bucket}/data/val/",
        pretrained_data=None,
        output_path=f"s3://{bucket}/output/",
        checkpoint_s3_uri=f"s3://{bucket}/checkpoints/{prefix}-train-{stamp}/",
        image_uri=image_uri,
        git_sha=None if image_uri else "0123456789abcdef0123456789abcdef01234567",
        use_spot=use_spot,
        hyperparameters={"epochs": "2", "arch": "resnet50_fpn_v2"},
        approval=approval,
    )

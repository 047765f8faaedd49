"""Batch transform as SageMaker runs it: a batch-mode server, every input POSTed, ``<name>.out`` written.

``python -m local transform --model M --input DIR --output DIR`` starts ``serve`` with
``SAGEMAKER_BATCH=true`` (plus ``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS``, ``SAGEMAKER_MAX_PAYLOAD_IN_MB``,
``SAGEMAKER_BATCH_STRATEGY`` for the values given on the command line), asks
``GET /execution-parameters`` for the rest, then sends the files with ``MaxConcurrentTransforms``
requests in flight. The output tree mirrors the input tree (an S3 prefix); each answer lands in
``<input name>.out``. A file over ``MaxPayloadInMB`` or a non-2xx answer is a failed record: it
gets no ``.out``, the others still run, and the job ends non-zero listing them (SageMaker fails the
job too). These images are not split into records (SplitType None), so SINGLE_RECORD and
MULTI_RECORD both send one file per request; the strategy only reaches the server.

:func:`transform_job_request` is the same job as SageMaker's CreateTransformJob request: on an NVIDIA GPU
instance type it sets ``TransformResources.TransformAmiVersion`` to a host image whose driver the image's CUDA
reaches (:mod:`pipeline.amis`; the default AMI of ml.g4dn/g5 transform hosts runs R470, which it does not).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local import client
from local.endpoint import Endpoint
from local.errors import HarnessError
from local.progress import Progress, each_in_pool
from local.runtime import Runtime
from pipeline.amis import transform_ami

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"MaxConcurrentTransforms": 1, "MaxPayloadInMB": 6, "BatchStrategy": "SINGLE_RECORD"}
MB = 1024 * 1024


@dataclass(frozen=True)
class TransformSettings:
    """CreateTransformJob's knobs; None means: ask the server, else SageMaker's default."""

    accept: str = "application/json"
    content_type: str | None = None
    attributes: str | None = None
    max_concurrent: int | None = None
    max_payload_mb: int | None = None
    batch_strategy: str | None = None

    def given(self) -> dict[str, Any]:
        values = {
            "MaxConcurrentTransforms": self.max_concurrent,
            "MaxPayloadInMB": self.max_payload_mb,
            "BatchStrategy": self.batch_strategy,
        }
        return {k: v for k, v in values.items() if v is not None}

    def server_env(self) -> dict[str, str]:
        names = {
            "MaxConcurrentTransforms": "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS",
            "MaxPayloadInMB": "SAGEMAKER_MAX_PAYLOAD_IN_MB",
            "BatchStrategy": "SAGEMAKER_BATCH_STRATEGY",
        }
        env = {"SAGEMAKER_BATCH": "true"}
        env.update({names[k]: str(v) for k, v in self.given().items()})
        return env


@dataclass
class TransformResult:
    total: int
    succeeded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def plan(input_dir: Path, output_dir: Path) -> list[tuple[Path, Path]]:
    """(input file, output file) for every file under ``input_dir``, hidden files excluded, sorted."""
    if not input_dir.is_dir():
        raise HarnessError(f"--input {input_dir} is not a folder")
    pairs = []
    for path in sorted(input_dir.rglob("*")):
        relative = path.relative_to(input_dir)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            pairs.append((path, output_dir / relative.parent / client.output_name(path)))
    return pairs


def resolve_parameters(settings: TransformSettings, served: dict[str, Any] | None) -> dict[str, Any]:
    """Command line first, then the server's /execution-parameters, then SageMaker's defaults."""
    resolved = dict(DEFAULTS)
    for key in DEFAULTS:
        if served and served.get(key) is not None:
            resolved[key] = served[key]
    resolved.update(settings.given())
    resolved["MaxConcurrentTransforms"] = max(1, int(resolved["MaxConcurrentTransforms"]))
    resolved["MaxPayloadInMB"] = int(resolved["MaxPayloadInMB"])
    return resolved


def transform_job_request(
    job_name: str,
    model_name: str,
    input_uri: str,
    output_uri: str,
    instance_type: str,
    settings: TransformSettings,
    instance_count: int = 1,
    ami_version: str | None = None,
) -> dict[str, Any]:
    """CreateTransformJob's request for this job on SageMaker: the given knobs, the S3 prefixes, and on a GPU
    instance the TransformAmiVersion ``ami_version`` or :func:`pipeline.amis.transform_ami`'s choice (checked
    the same way: raises ``ValueError`` for one the image would refuse)."""
    resources: dict[str, Any] = {"InstanceType": instance_type, "InstanceCount": instance_count}
    ami = transform_ami(instance_type, ami_version)
    if ami is not None:
        resources["TransformAmiVersion"] = ami
    source: dict[str, Any] = {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}}}
    if settings.content_type:
        source["ContentType"] = settings.content_type
    return {
        "TransformJobName": job_name,
        "ModelName": model_name,
        **settings.given(),
        "TransformInput": {**source, "SplitType": "None"},
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": settings.accept},
        "TransformResources": resources,
    }


def transform_files(
    url: str,
    pairs: list[tuple[Path, Path]],
    settings: TransformSettings,
    parameters: dict[str, Any],
    progress: Progress | None = None,
) -> TransformResult:
    """Send every input to a running endpoint and write the answers; failed records are listed."""
    progress = progress or Progress()
    result = TransformResult(total=len(pairs), parameters=parameters)
    limit = parameters["MaxPayloadInMB"] * MB
    started = time.monotonic()

    def one(source: Path, target: Path) -> str | None:
        if source.stat().st_size > limit:
            return f"{source.stat().st_size / MB:.1f} MB exceeds MaxPayloadInMB={parameters['MaxPayloadInMB']}"
        reply = client.invoke(
            url,
            source.read_bytes(),
            client.content_type_for(source, settings.content_type),
            settings.accept,
            settings.attributes,
            timeout=600.0,
        )
        if not reply.ok:
            return f"HTTP {reply.status}: {reply.message()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(reply.body)
        partial.replace(target)
        return None

    result.succeeded, result.failures = each_in_pool(
        pairs,
        lambda pair: one(*pair),
        lambda pair: str(pair[0]),
        parameters["MaxConcurrentTransforms"],
        progress,
        ("file", "transform"),
    )
    result.seconds = round(time.monotonic() - started, 2)
    return result


def run_transform(
    runtime: Runtime,
    model: Path,
    input_dir: Path,
    output_dir: Path,
    settings: TransformSettings,
    port: int = 0,
    progress: Progress | None = None,
) -> TransformResult:
    """The whole job: plan, start the server in batch mode, send, stop."""
    pairs = plan(input_dir, output_dir)
    if not pairs:
        raise HarnessError(f"--input {input_dir} holds no files")
    with Endpoint(runtime, model, port, settings.server_env()) as endpoint:
        parameters = resolve_parameters(settings, client.execution_parameters(endpoint.url))
        log.info("transform: %d file(s), %s", len(pairs), parameters)
        return transform_files(endpoint.url, pairs, settings, parameters, progress)

"""Asynchronous inference as SageMaker runs it, against any running endpoint: one request per input file.

    python -m local async --endpoint URL --input DIR --output DIR [--failures DIR] [--max-concurrent N]

SageMaker Asynchronous Inference queues each ``InvokeEndpointAsync`` call, reads the request's object from S3
(``InputLocation``, up to 1 GB), POSTs it whole to the container's ``/invocations``, waits up to
``InvocationTimeoutSeconds`` (default 900, at most 3600) and writes the answer to ``S3OutputPath``, or the
error to ``S3FailurePath``; ``MaxConcurrentInvocationsPerInstance`` requests are in flight at most. This plays
that part on this machine: every file under ``--input`` (an S3 prefix; hidden files left out) is one request,
at most ``--max-concurrent`` in flight; a 2xx answer becomes ``<output>/<relative path>.out``, anything else
``<failures>/<relative path>.error`` (``--failures`` defaults to ``--output``), a JSON object with the status,
the answer's Content-Type and its body (``status`` null and an ``error`` when no answer came). A server for
asynchronous bodies runs with ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` (up to 1024) and ``SAGEMAKER_MODEL_SERVER_TIMEOUT``
(up to 3600) raised: ``python -m local serve --model M --env SAGEMAKER_MAX_PAYLOAD_IN_MB=1024 ...``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from local import client
from local.errors import EndpointError, HarnessError
from local.progress import Progress, each_in_pool

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900  # InvocationTimeoutSeconds' default
MAX_TIMEOUT_S = 3600  # and its largest value
DEFAULT_MAX_CONCURRENT = 1
MAX_CONCURRENT = 1000  # MaxConcurrentInvocationsPerInstance's largest value
OUTPUT_SUFFIX = ".out"  # S3OutputPath: <inference id>.out
FAILURE_SUFFIX = ".error"


@dataclass(frozen=True)
class AsyncJob:
    """What ``python -m local async`` was asked to do."""

    endpoint: str
    input_dir: Path
    output_dir: Path
    failures_dir: Path | None = None
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    timeout_s: float = DEFAULT_TIMEOUT_S
    content_type: str | None = None
    accept: str = "application/json"

    @property
    def failure_dir(self) -> Path:
        return self.failures_dir if self.failures_dir is not None else self.output_dir

    def check(self) -> None:
        if not Path(self.input_dir).is_dir():
            raise HarnessError(f"--input {self.input_dir} is not a folder")
        if not 1 <= self.max_concurrent <= MAX_CONCURRENT:
            raise HarnessError(f"--max-concurrent must be between 1 and {MAX_CONCURRENT}, got {self.max_concurrent}")
        if not 1 <= self.timeout_s <= MAX_TIMEOUT_S:
            raise HarnessError(f"--timeout must be between 1 and {MAX_TIMEOUT_S} s, got {self.timeout_s:g}")


@dataclass
class AsyncResult:
    total: int
    succeeded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (relative input path, why)
    seconds: float = 0.0


def inputs(input_dir: Path) -> list[Path]:
    """Every file under ``input_dir`` (hidden ones and those in hidden folders left out), sorted."""
    files = [p for p in Path(input_dir).rglob("*") if p.is_file()]
    visible = [p for p in files if not any(part.startswith(".") for part in p.relative_to(input_dir).parts)]
    return sorted(visible)


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a reader of the output folder never sees half an answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def failure_record(status: int | None, content_type: str, body: bytes, error: str | None = None) -> bytes:
    """The ``.error`` file: the answer's status, Content-Type and body (text where it decodes), or why none came."""
    record: dict[str, object] = {"status": status, "content_type": content_type, "body": body.decode(errors="replace")}
    if error is not None:
        record["error"] = error
    return (json.dumps(record, indent=1) + "\n").encode()


def run_async(job: AsyncJob, progress: Progress | None = None) -> AsyncResult:
    """Send every input to ``job.endpoint``, ``max_concurrent`` in flight; write ``.out`` and ``.error`` files."""
    job.check()
    files = inputs(job.input_dir)
    if not files:
        raise HarnessError(f"--input {job.input_dir} holds no files")
    for path in files:  # an unknown suffix fails before any request, as the other verbs do
        client.content_type_for(path, job.content_type)
    if not client.ping(job.endpoint, timeout=5.0):
        raise HarnessError(f"{job.endpoint} does not answer /ping with 200; start it first (python -m local serve)")
    progress = progress or Progress()
    result = AsyncResult(total=len(files))
    started = time.monotonic()

    def one(source: Path) -> str | None:
        relative = source.relative_to(job.input_dir)
        content_type = client.content_type_for(source, job.content_type)
        try:
            reply = client.invoke(job.endpoint, source.read_bytes(), content_type, job.accept, timeout=job.timeout_s)
        except EndpointError as exc:
            _write(job.failure_dir / f"{relative}{FAILURE_SUFFIX}", failure_record(None, "", b"", str(exc)))
            return str(exc)
        if reply.ok:
            _write(job.output_dir / f"{relative}{OUTPUT_SUFFIX}", reply.body)
            return None
        _write(
            job.failure_dir / f"{relative}{FAILURE_SUFFIX}",
            failure_record(reply.status, reply.content_type, reply.body),
        )
        return f"HTTP {reply.status}: {reply.message()}"

    result.succeeded, result.failures = each_in_pool(
        files,
        one,
        lambda path: str(path.relative_to(job.input_dir)),
        job.max_concurrent,
        progress,
        ("request", "async"),
    )
    result.seconds = round(time.monotonic() - started, 2)
    return result

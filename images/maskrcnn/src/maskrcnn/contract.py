"""What both of the image's processes owe SageMaker, and nothing else: paths, exit codes, the failure file, log lines.

A leaf: it imports nothing from the package at run time, so ``train``, ``serve``, the training job and the
server workers all use it without importing each other.

* Exit codes of ``train``: 0 done, 1 failed (``output/failure`` says why), 143 stopped by SIGTERM after
  checkpointing (128 + SIGTERM, what a killed process would report).
* ``output/failure``: its first line is the reason, at most 1024 characters, which SageMaker shows as
  FailureReason; the lines after it are the detail (the innermost frames of a traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_DIR = "/opt/ml"  # SAGEMAKER_BASE_DIR moves it (the local harness and the tests do)
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_STOPPED = 143
FAILURE_LIMIT = 1024
SERVE_PORT = 8080  # where SageMaker sends /ping and /invocations (SAGEMAKER_BIND_TO_PORT may move it)


@dataclass(frozen=True)
class SageMakerPaths:
    """Every path of the container contract, derived from one base directory."""

    base: Path

    @property
    def input_config(self) -> Path:
        return self.base / "input" / "config"

    @property
    def hyperparameters_file(self) -> Path:
        return self.input_config / "hyperparameters.json"

    @property
    def inputdataconfig_file(self) -> Path:
        return self.input_config / "inputdataconfig.json"

    @property
    def resourceconfig_file(self) -> Path:
        return self.input_config / "resourceconfig.json"

    @property
    def data_dir(self) -> Path:
        return self.base / "input" / "data"

    def channel(self, name: str) -> Path:
        return self.data_dir / name

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def output_data_dir(self) -> Path:
        return self.output_dir / "data"

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def checkpoints_dir(self) -> Path:
        return self.base / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        """Where SageMaker's TensorBoardOutputConfig uploads from (its default LocalPath)."""
        return self.output_dir / "tensorboard"


def base_paths(environ: Mapping[str, str] | None = None) -> SageMakerPaths:
    environ = os.environ if environ is None else environ
    return SageMakerPaths(Path(environ.get("SAGEMAKER_BASE_DIR", DEFAULT_BASE_DIR)))


def setup_logging(rank: int | None = None) -> None:
    """One log format for every process of the image, on stdout (CloudWatch reads the container's output)."""
    where = f" [rank {rank}]" if rank is not None else ""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )


def write_failure(paths: SageMakerPaths, reason: str, detail: str = "") -> None:
    """The reason as one line, then as much of ``detail``'s END as fits: a traceback's last lines say
    where it failed, so a long one loses its outer frames, never the innermost."""
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    text = reason.strip().replace("\n", " ")[:FAILURE_LIMIT]
    room = FAILURE_LIMIT - len(text) - 1
    detail = detail.strip()
    if detail and room > 0:
        if len(detail) > room:
            tail = detail[-room:]
            # Start at a whole traceback frame ("  File ..." and its source line), else a whole line.
            start = tail.find("\n  File ")
            start = start if start >= 0 else tail.find("\n")
            detail = tail[start + 1 :] if start >= 0 else tail
        text += "\n" + detail
    paths.failure_file.write_text(text + "\n")

"""The entrypoints' one error boundary: `train` and `serve` parse, configure logging, call one function.

Training failures become the first line of ``output/failure`` (what a person should read, at most
1024 characters, which SageMaker shows as FailureReason) and exit code 1. A clean run leaves no
failure file behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from maskrcnn.config import SageMakerPaths, TrainConfig, base_paths
from maskrcnn.errors import JobError

log = logging.getLogger("maskrcnn")

FAILURE_LIMIT = 1024


def setup_logging(rank: int | None = None) -> None:
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


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train", description="Train Mask R-CNN under the SageMaker contract.")
    parser.parse_args(argv or [])
    setup_logging()
    paths = base_paths(os.environ)
    paths.failure_file.unlink(missing_ok=True)
    try:
        config = TrainConfig.from_env(os.environ)
        from maskrcnn.device import probe, require_usable_gpu

        require_usable_gpu(probe(os.environ))  # a GPU CUDA cannot use fails here, never trains on CPU
        from maskrcnn.training import run  # torch loads here, after the config is known to be valid

        return run(config)
    except JobError as exc:
        log.error("training failed: %s", exc)
        write_failure(paths, str(exc))
        return 1
    except Exception as exc:  # the boundary: anything unexpected still leaves a reason behind
        log.exception("training failed unexpectedly")
        if not paths.failure_file.exists():
            write_failure(paths, f"internal error: {type(exc).__name__}: {exc}", traceback.format_exc())
        return 1


def serve_main(argv: list[str] | None = None) -> int:
    setup_logging()
    from maskrcnn.server import main

    return main(argv or [])

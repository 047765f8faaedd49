"""The entrypoints' one error boundary: `train` and `serve` parse, configure logging, call one function.

Training failures become the first line of ``output/failure`` (what a person should read, at most
1024 characters, which SageMaker shows as FailureReason) and exit code 1. A clean run leaves no
failure file behind.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
import traceback
from typing import NoReturn

from maskrcnn.contract import EXIT_FAILED, base_paths, setup_logging, write_failure
from maskrcnn.errors import JobError
from maskrcnn.train.config import TrainConfig

log = logging.getLogger("maskrcnn")


def exit_process(code: int) -> NoReturn:
    """The entrypoint's exit. The interpreter's shutdown garbage-collects torch's and torchvision's hundreds of
    thousands of objects several times over: 1.0-1.4 s after a job ended on a Zen 5 (AVX-512), time that
    ``max_runtime``'s clock cannot see (a stopped attempt's exit is unseen by its restart's budget) and that
    every test starting ``train`` waits for. Frozen objects are skipped: 0.2 s. Explicitly closed resources
    (the model, the checkpoint, TensorBoard's files, the log) are written before this; atexit still runs."""
    gc.freeze()
    sys.exit(code)


def train_main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # max_runtime counts from here: before torch's import, which takes seconds
    parser = argparse.ArgumentParser(prog="train", description="Train Mask R-CNN under the SageMaker contract.")
    parser.parse_args(argv or [])
    setup_logging()
    paths = base_paths(os.environ)
    paths.failure_file.unlink(missing_ok=True)
    try:
        config = TrainConfig.from_env(os.environ)
        from maskrcnn.device import prepare_device

        prepare_device(os.environ)  # the CUDA route, before torch loads; a GPU no route reaches fails here
        from maskrcnn.train.job import run  # torch loads here, after the config is known to be valid

        return run(config, started)
    except JobError as exc:
        log.error("training failed: %s", exc)
        write_failure(paths, str(exc))
        return EXIT_FAILED
    except Exception as exc:  # the boundary: anything unexpected still leaves a reason behind
        log.exception("training failed unexpectedly")
        if not paths.failure_file.exists():
            write_failure(paths, f"internal error: {type(exc).__name__}: {exc}", traceback.format_exc())
        return EXIT_FAILED


def serve_main(argv: list[str] | None = None) -> int:
    setup_logging()
    from maskrcnn.serve.supervisor import main

    return main(argv or [])

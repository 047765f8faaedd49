"""The training entrypoint's error boundary: what an unexpected failure leaves in output/failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from maskrcnn import cli, contract
from maskrcnn.contract import SageMakerPaths

pytestmark = pytest.mark.unit


def innermost_failing_step() -> None:
    raise RuntimeError("the tensor shapes disagree")


def call_deep(depth: int) -> None:
    """A long stack of outer frames above the one that fails: longer than the failure file holds.
    Two functions in turn, so Python's traceback cannot fold them into "[Previous line repeated]"."""
    if depth == 0:
        innermost_failing_step()
    and_deeper(depth - 1)


def and_deeper(depth: int) -> None:
    call_deep(depth)


def test_an_internal_error_names_the_innermost_frame_within_the_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))

    def from_env(environ: object) -> None:
        call_deep(40)

    monkeypatch.setattr(cli.TrainConfig, "from_env", staticmethod(from_env))
    assert cli.train_main([]) == 1

    text = SageMakerPaths(tmp_path).failure_file.read_text()
    reason, detail = text.split("\n", 1)
    assert reason == "internal error: RuntimeError: the tensor shapes disagree"
    assert len(text.rstrip("\n")) <= contract.FAILURE_LIMIT
    assert "in innermost_failing_step" in detail
    assert 'raise RuntimeError("the tensor shapes disagree")' in detail
    assert "in train_main" not in detail  # the outermost frames are what gave way
    assert detail.startswith("  File ")  # cut at a line boundary, not mid-line


def test_a_short_traceback_is_kept_whole(tmp_path: Path) -> None:
    paths = SageMakerPaths(tmp_path)
    contract.write_failure(
        paths, "internal error: ValueError: x", "Traceback (most recent call last):\nValueError: x\n"
    )
    assert paths.failure_file.read_text() == (
        "internal error: ValueError: x\nTraceback (most recent call last):\nValueError: x\n"
    )

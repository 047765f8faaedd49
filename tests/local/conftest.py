"""Fixtures for the local harness's tests: a clean environment, a tiny dataset, one tiny trained job.

Layers: ``unit`` (pure: layout, --hp parsing, tar safety, metrics reading), ``integration`` (real
processes in process mode), ``container`` (docker mode and the SageMaker SDK's local mode; skipped,
with the reason, where no engine or image exists: build it with scripts/build-image.sh).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tinyjob import tiny_spec

from local import runtime as rt


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SageMaker or job variable leaks in from the shell running the tests (IMAGE, the tag, stays)."""
    for name in list(os.environ):
        if name.startswith(("SAGEMAKER_", "MASKRCNN_", "SM_")) or name == "TRAINING_JOB_NAME":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic 128 px images in COCO format, made once."""
    from maskrcnn.synthetic import write_coco_dataset

    out = tmp_path_factory.mktemp("dataset")
    write_coco_dataset(out, num_images=12, seed=0, size=128)
    return out


@pytest.fixture(scope="session")
def process_runtime() -> rt.Runtime:
    """Process mode with this interpreter."""
    return rt.resolve("process", environ=dict(os.environ))


@pytest.fixture(scope="session")
def trained_job(dataset: Path, process_runtime: rt.Runtime, tmp_path_factory: pytest.TempPathFactory):
    """One tiny training job in process mode (shared by the serving tests): its TrainResult."""
    from local.training import run_training

    output = tmp_path_factory.mktemp("job") / "job"
    return run_training(tiny_spec(dataset), output, process_runtime)


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The image tag for docker-mode tests, or a skip that says what is missing."""
    image = os.environ.get("IMAGE", rt.DEFAULT_IMAGE)
    usable, why = rt.docker_status(image)
    if not usable:
        pytest.skip(
            f"docker mode needs a Docker engine and image {image}: {why} "
            "(scripts/install-docker.sh, scripts/build-image.sh)"
        )
    return image


@pytest.fixture
def endpoint_factory() -> Iterator:
    """Starts Endpoints that are always stopped at teardown."""
    from local.endpoint import Endpoint

    started: list[Endpoint] = []

    def start(*args, **kwargs) -> Endpoint:
        endpoint = Endpoint(*args, **kwargs)
        started.append(endpoint)
        endpoint.start()
        return endpoint

    yield start
    for endpoint in started:
        endpoint.stop()

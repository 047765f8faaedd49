"""Fixtures for the local harness's tests: a clean environment, a tiny dataset, one tiny trained job.

Layers: ``unit`` (pure: layout, --hp parsing, tar safety, metrics reading), ``integration`` (real
processes in process mode), ``container`` (docker mode and the SageMaker SDK's local mode; skipped,
with the reason, where no engine or image exists: build it with scripts/build-image.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import build_image, image_tag
from tinyjob import tiny_spec

from local import runtime as rt


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic 128 px images in COCO format, made once."""
    from maskrcnn.train.synthetic import write_coco_dataset

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
    """The image tag for docker-mode tests, built incrementally from this checkout once per session
    (as tests/image does: a stale image would compare old model code with new), or a skip that
    says what is missing. ``MASKRCNN_SKIP_BUILD=1`` tests the tag as it is."""
    image = image_tag()
    engine = subprocess.run(["docker", "info"], capture_output=True, check=False) if shutil.which("docker") else None
    if engine is None or engine.returncode != 0:
        pytest.skip("docker mode needs a Docker engine: scripts/install-docker.sh starts one")
    if os.environ.get("MASKRCNN_SKIP_BUILD") != "1":
        failed = build_image(image)
        if failed:
            pytest.fail(failed, pytrace=False)
    usable, why = rt.docker_status(image)
    if not usable:
        pytest.skip(f"docker mode needs image {image}: {why} (scripts/build-image.sh)")
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

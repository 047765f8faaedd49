"""Fixtures for the image area's container and gpu tests: a Docker engine, the image built once, an /opt/ml tree.

The image is (re)built once per session with scripts/build-image.sh, which is incremental: with nothing
changed it takes seconds; a source change rebuilds only the small package layer. Environment:

* ``IMAGE``: the tag to build and test (default ``maskrcnn-sagemaker:latest``, as ``make build``);
* ``BASE_IMAGE``: the base to build on; unset, the base the existing tag was built from (its
  ``org.opencontainers.image.base.name`` label) is reused, else the Dockerfile's CUDA default;
* ``MASKRCNN_SKIP_BUILD=1``: test the tag as it is (it must exist).

No reachable Docker engine skips the layer, saying so; a failed build fails it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import build_image, image_tag, write_job_tree
from tiny import TINY_HP

# The tiny job, four steps, with the image's own loader-worker default: shared memory inside a container is
# what those processes need, and SageMaker runs them.
SMOKE_HYPERPARAMETERS = {**{k: v for k, v in TINY_HP.items() if k != "num_workers"}, "max_steps": "4"}


@pytest.fixture(scope="session")
def docker_client():
    """A client of the local Docker engine, or a skip that says why there is none."""
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception as exc:  # DockerException, connection refused, permission denied ...
        pytest.skip(f"no Docker engine reachable ({type(exc).__name__}: {exc}); scripts/install-docker.sh starts one")
    yield client
    client.close()


@pytest.fixture(scope="session")
def image(docker_client) -> str:
    """The image tag under test, built (incrementally) once per session."""
    tag = image_tag()
    if os.environ.get("MASKRCNN_SKIP_BUILD") == "1":
        if not docker_client.images.list(name=tag):
            pytest.fail(f"MASKRCNN_SKIP_BUILD=1 but image {tag} does not exist")
        return tag
    failed = build_image(tag)
    if failed:
        pytest.fail(failed, pytrace=False)
    return tag


@pytest.fixture(scope="session")
def dataset(synthetic_dir: Path) -> Path:
    """The session's small synthetic COCO dataset (tests/conftest.py), hard-linked into each /opt/ml tree."""
    return synthetic_dir


@pytest.fixture
def opt_ml_factory(tmp_path: Path, dataset: Path):
    """Builds fresh /opt/ml trees (``support.write_job_tree``) under the test's tmp dir: ``opt_ml_factory(hp)``."""
    count = 0

    def make(hyperparameters: dict[str, str]) -> Path:
        nonlocal count
        count += 1
        return write_job_tree(tmp_path / f"opt_ml_{count}", hyperparameters, {"training": dataset})

    return make


@pytest.fixture(scope="session")
def smoke_hyperparameters() -> dict[str, str]:
    """A few CPU steps of the lite model on small images, as SageMaker writes them (all strings)."""
    return dict(SMOKE_HYPERPARAMETERS)


def _run_to_completion(client, image: str, command, opt_ml: Path, timeout: int, **kwargs) -> tuple[int, str]:
    container = client.containers.run(
        image, command, detach=True, volumes={str(opt_ml): {"bind": "/opt/ml", "mode": "rw"}}, **kwargs
    )
    try:
        code = container.wait(timeout=timeout)["StatusCode"]
        return code, container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


@pytest.fixture(scope="session")
def run_to_completion(docker_client, image: str):
    """``run_to_completion(command, opt_ml, timeout, **run_kwargs) -> (exit code, logs)``: docker run
    IMAGE command with opt_ml mounted at /opt/ml, waited for and removed."""

    def run(command, opt_ml: Path, timeout: int = 900, **kwargs) -> tuple[int, str]:
        return _run_to_completion(docker_client, image, command, opt_ml, timeout, **kwargs)

    return run


@pytest.fixture(scope="session")
def trained_model(image: str, docker_client, dataset: Path, tmp_path_factory) -> Path:
    """/opt/ml after one smoke training run in the image (shared by the serving tests)."""
    root = write_job_tree(tmp_path_factory.mktemp("trained") / "opt_ml", SMOKE_HYPERPARAMETERS, {"training": dataset})
    code, logs = _run_to_completion(docker_client, image, "train", root, timeout=900)
    assert code == 0, f"train exited {code}:\n{logs[-4000:]}"
    return root


@pytest.fixture
def containers(docker_client) -> Iterator[list]:
    """Containers a test starts; each is force-removed at teardown, passed or failed."""
    started: list = []
    yield started
    for container in started:
        with contextlib.suppress(Exception):  # already gone
            container.remove(force=True)


@pytest.fixture(scope="session")
def nvidia_runtime(docker_client) -> None:
    """Skips unless the engine has the NVIDIA runtime (``docker info`` Runtimes)."""
    runtimes = docker_client.info().get("Runtimes", {})
    if "nvidia" not in runtimes:
        pytest.skip(f"the Docker engine has no nvidia runtime (runtimes: {', '.join(sorted(runtimes))})")

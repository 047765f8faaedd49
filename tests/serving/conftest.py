"""Fixtures for the serving tests: a tiny saved model, sample images, and real `serve` processes.

Unit tests (``-m unit``) use the model through an in-process Predictor or a fake one and the Flask
test client. Integration tests (``-m integration``) start ``images/maskrcnn/serve`` as SageMaker
would (environment + base directory), on a free port, and talk HTTP to it. The model is a lite
Mask R-CNN with random weights at 128-256 px: its answers are meaningless but cost what real ones
do, and it is built in a second instead of trained.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from serving_support import (
    Server,
    build_tiny_model,
    encode,
    require_or_skip,
    start_serve,
    stop_serve,
    wait_until_ready,
)


@pytest.fixture(scope="session")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SageMaker base directory whose model/ holds a tiny lite model (built once per session)."""
    base = tmp_path_factory.mktemp("serve-base")
    build_tiny_model(base / "model")
    return base


@pytest.fixture(scope="session")
def predictor(model_base: Path):  # type: ignore[no-untyped-def]
    """A real Predictor on the tiny model, in this process."""
    from maskrcnn.serve.predictor import Predictor

    return Predictor.load(model_base / "model", "cpu", threads=1)


@pytest.fixture(scope="session")
def sample_rgb() -> np.ndarray:
    """A 96 x 128 synthetic scene (shapes on texture) as uint8 RGB."""
    from maskrcnn.train.synthetic import make_sample

    image, _ = make_sample(np.random.default_rng(1), 128)
    return np.asarray(image)[16:112]


@pytest.fixture(scope="session")
def sample_jpeg(sample_rgb: np.ndarray) -> bytes:
    return encode(sample_rgb, "JPEG", quality=90)


# ---------------------------------------------------------------------------------------------
# Real servers


@pytest.fixture(scope="session")
def nginx_path() -> str:
    path = shutil.which("nginx")
    if path is None:
        require_or_skip("integration", "nginx is not installed (apt-get install nginx-light)")
    return str(path)


@pytest.fixture(scope="session")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Start `serve` processes (stopped at the end of the session): launch(base, **env) -> Server."""
    started: list[Server] = []

    def run(base: Path, wait: bool = True, **extra: str) -> Server:
        log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
        server = start_serve(base, log_path, **extra)
        started.append(server)
        if wait:
            wait_until_ready(server)
        return server

    yield run
    for server in started:
        stop_serve(server)


@pytest.fixture(scope="session")
def server(launch: Callable[..., Server], model_base: Path, nginx_path: str) -> Server:
    """One `serve` (nginx + 2 gevent workers) shared by the integration tests."""
    return launch(model_base)

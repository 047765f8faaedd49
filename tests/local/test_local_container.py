"""Docker mode and a real client: same artifacts as process mode; the SDK's local mode runs the image.

Skipped, with the reason, where no Docker engine or image exists (scripts/install-docker.sh,
scripts/build-image.sh), and the SDK test also where ``.venv-sdk`` or docker compose is missing
(``python3.11 -m venv .venv-sdk && .venv-sdk/bin/pip install "sagemaker==2.257.7"``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile

import pytest
from tinyjob import REPO, tiny_spec

from local import client
from local import runtime as rt
from local.runtime import free_port, port_is_free
from local.training import run_training

pytestmark = pytest.mark.container

SDK_PYTHON = REPO / ".venv-sdk" / "bin" / "python"


def _model_files(archive):
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_docker_and_process_mode_make_the_same_model(docker_image, dataset, process_runtime, tmp_path):
    docker = rt.resolve("docker", docker_image, environ=dict(os.environ))
    in_docker = run_training(tiny_spec(dataset, "same-job"), tmp_path / "docker", docker)
    in_process = run_training(tiny_spec(dataset, "same-job"), tmp_path / "process", process_runtime)
    a, b = _model_files(in_docker.model_archive), _model_files(in_process.model_archive)
    assert sorted(a) == sorted(b) == ["model.json", "model.safetensors"]
    spec_a, spec_b = json.loads(a["model.json"]), json.loads(b["model.json"])
    for spec in (spec_a, spec_b):
        spec["training"].pop("train_seconds")
    assert spec_a == spec_b  # same architecture, classes, hyperparameters, job name, metrics

    from safetensors.torch import load

    weights_a, weights_b = load(a["model.safetensors"]), load(b["model.safetensors"])
    assert weights_a.keys() == weights_b.keys(), "the image holds other model code than this checkout"
    # Same code, same seed, same data; the image's torch build may order float sums differently.
    worst = max((weights_a[k].float() - weights_b[k].float()).abs().max().item() for k in weights_a)
    assert worst < 1e-3, f"largest weight difference {worst}"


def test_docker_mode_serves_the_model(docker_image, dataset, tmp_path, endpoint_factory):
    docker = rt.resolve("docker", docker_image, environ=dict(os.environ))
    trained = run_training(tiny_spec(dataset, "serve-job"), tmp_path / "job", docker)
    endpoint = endpoint_factory(docker, trained.model_archive, port=free_port())
    image = sorted((dataset / "images").glob("*.png"))[0]
    reply = client.invoke(endpoint.url, image.read_bytes(), "image/png")
    assert reply.ok, reply.message()
    assert reply.json()["predictions"][0]["image_size"] == [128, 128]


def test_sagemaker_sdk_local_mode_runs_the_image_unchanged(docker_image, dataset, tmp_path):
    if not SDK_PYTHON.exists():
        pytest.skip(
            f"no {SDK_PYTHON}: python3.11 -m venv .venv-sdk && .venv-sdk/bin/pip install 'sagemaker==2.257.7'"
        )
    has_compose = (
        subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    )
    if not has_compose and shutil.which("docker-compose") is None:
        pytest.skip(
            "the SDK's local mode needs `docker compose` or `docker-compose` (Debian: docker-compose)"
        )
    if not port_is_free(8080):
        pytest.skip("the SDK's local endpoint needs port 8080, which is in use")
    env = {
        **os.environ,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "fake",  # local mode calls no AWS API; boto3 still wants a value
        "AWS_SECRET_ACCESS_KEY": "fake",
        "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
    }
    image_file = sorted((dataset / "images").glob("*.png"))[0]
    result = subprocess.run(
        [
            str(SDK_PYTHON),
            str(REPO / "tests/local/sdk_local_mode.py"),
            "--image",
            docker_image,
            "--data",
            str(dataset),
            "--image-file",
            str(image_file),
            "--work",
            str(tmp_path / "sdk"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    answer = json.loads(line.removeprefix("RESULT "))
    assert answer["predictions"][0]["image_size"] == [128, 128]
    archive = answer["model_data"].removeprefix("file://")
    files = _model_files(archive)
    assert sorted(files) == ["model.json", "model.safetensors"]
    # the SDK wrote str(False) = "False" into hyperparameters.json; the image decoded it
    trained_with = json.loads(files["model.json"])["training"]["hyperparameters"]
    assert trained_with["amp"] is False and trained_with["max_steps"] == 2

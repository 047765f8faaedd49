"""Docker mode: same artifacts as process mode, and it serves them (real SDK clients: test_sdk_clients.py).

Skipped, with the reason, where no Docker engine or image exists (scripts/install-docker.sh,
scripts/build-image.sh).
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest
from support import free_port
from tinyjob import tiny_spec

from local import client
from local import runtime as rt
from local.training import run_training

pytestmark = pytest.mark.container


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

"""Real SageMaker clients run the image unchanged: the Python SDK v2's and v3's local modes.

Each SDK lives in its own venv (its pins clash with the project's) and is driven by a script here that
pytest does not collect: ``sdk_local_mode.py`` (v2, ``make sdk-venv``) and ``sdk3_local_mode.py`` (v3,
``make sdk3-venv``). Skipped, with the reason, where the venv, docker compose, the engine or the image is
missing (CI sets MASKRCNN_REQUIRE_LAYERS, so there a skip fails the run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from support import REPO, free_port

pytestmark = pytest.mark.container

SDK2_PYTHON = REPO / ".venv-sdk" / "bin" / "python"
SDK3_PYTHON = REPO / ".venv-sdk3" / "bin" / "python"


def _model_files(archive: str | Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _require(python: Path, make_target: str) -> None:
    if not python.exists():
        pytest.skip(f"no {python}: `make {make_target}` installs that SDK in its own venv")
    has_compose = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    if not has_compose and shutil.which("docker-compose") is None:
        pytest.skip("the SDK's local mode needs `docker compose` or `docker-compose` (Debian: docker-compose)")


def _containers(image: str) -> set[str]:
    """Every container (running or not) made from ``image``."""
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"ancestor={image}"], capture_output=True, text=True, check=False
    )
    return set(listed.stdout.split())


def _drive(
    python: Path, script: str, image: str, data: Path, image_file: Path, work: Path, *extra: str
) -> tuple[dict, str]:
    """Runs a driver script; returns its RESULT object and its whole output (the containers' logs).
    The endpoint gets a free port (the SDKs' ``local.serving_port``), not the default 8080."""
    args = ["--image", image, "--data", str(data), "--image-file", str(image_file), "--work", str(work)]
    env = {
        **os.environ,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "fake",  # local mode calls no AWS API; boto3 still wants a value
        "AWS_SECRET_ACCESS_KEY": "fake",
        "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
    }
    before = _containers(image)
    try:
        result = subprocess.run(
            [str(python), str(REPO / "tests/local" / script), *args, "--port", str(free_port()), *extra],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            check=False,
            cwd=work.parent,
        )
    finally:
        # Both SDKs' local modes leave their training jobs' compose containers behind, exited (seen after every
        # run): the clients' own behaviour, not the image's. Removed here so a CI machine does not collect them.
        left = sorted(_containers(image) - before)
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), output


def _assert_model(archive: str | Path) -> dict:
    """The archive holds the model and nothing else; returns its model.json."""
    files = _model_files(archive)
    assert sorted(files) == ["model.json", "model.safetensors"]
    return json.loads(files["model.json"])


def test_sdk_v2_trains_deploys_and_predicts(docker_image, dataset, tmp_path):
    _require(SDK2_PYTHON, "sdk-venv")
    image_file = sorted((dataset / "images").glob("*.png"))[0]
    answer, _ = _drive(SDK2_PYTHON, "sdk_local_mode.py", docker_image, dataset, image_file, tmp_path / "sdk")
    assert answer["predictions"][0]["image_size"] == [128, 128]
    spec = _assert_model(answer["model_data"].removeprefix("file://"))
    # the SDK wrote str(False) = "False" into hyperparameters.json; the image decoded it
    assert spec["training"]["hyperparameters"]["amp"] is False
    assert spec["training"]["hyperparameters"]["max_steps"] == 2


def test_sdk_v2_two_hosts_then_endpoint_and_batch_transform(docker_image, dataset, tmp_path):
    _require(SDK2_PYTHON, "sdk-venv")
    images = sorted((dataset / "images").glob("*.png"))[:3]
    batch = tmp_path / "batch"
    batch.mkdir()
    for image in images:
        shutil.copy(image, batch / image.name)
    answer, output = _drive(
        SDK2_PYTHON,
        "sdk_local_mode.py",
        docker_image,
        dataset,
        images[0],
        tmp_path / "sdk",
        "--instance-count",
        "2",
        "--transform",
        str(batch),
    )
    # two containers joined one process group; docker-compose's --abort-on-container-exit stops the
    # job when the first one exits, so rank 0 must have written the whole model before that
    assert "rank 1 of 2" in output, output[-6000:]
    _assert_model(answer["model_data"].removeprefix("file://"))
    assert answer["predictions"][0]["image_size"] == [128, 128]
    assert answer["transform_status"] == "Completed"
    out = Path(answer["transform_output"])
    assert sorted(p.name for p in out.glob("*.out")) == sorted(f"{p.name}.out" for p in images)
    for image in images:
        reply = json.loads((out / f"{image.name}.out").read_bytes())
        assert [p["image_size"] for p in reply["predictions"]] == [[128, 128]]


def test_sdk_v3_model_trainer_and_local_session(docker_image, dataset, tmp_path):
    _require(SDK3_PYTHON, "sdk3-venv")
    image_file = sorted((dataset / "images").glob("*.png"))[0]
    answer, output = _drive(
        SDK3_PYTHON,
        "sdk3_local_mode.py",
        docker_image,
        dataset,
        image_file,
        tmp_path / "sdk3",
        "--instance-counts",
        "1,2",
    )
    # v3 starts the training containers with no command: the jobs ran on the image's default CMD
    assert answer["compose_commands"] == {"1": [None], "2": [None, None]}
    # both hosts joined one process group; v3 mounts one host folder as every host's /opt/ml/model,
    # so only rank 0 may write there
    assert "rank 1 of 2" in output, output[-6000:]
    for count in ("1", "2"):
        spec = _assert_model(answer["model_data"][count])
        # v3 writes non-string hyperparameters as JSON (false, 2); the image decoded them
        assert spec["training"]["hyperparameters"]["amp"] is False
        assert spec["training"]["hyperparameters"]["max_steps"] == 2
    plain, attributed = answer["predictions"], answer["predictions_with_attributes"]
    assert plain[0]["image_size"] == attributed[0]["image_size"] == [128, 128]
    # CustomAttributes reached the image: threshold 0 and max_detections=1 give exactly one box of
    # this barely trained model, mask_format=none leaves its mask out; an unknown option is a 400
    assert len(attributed[0]["instances"]) == 1
    assert "mask" not in attributed[0]["instances"][0]
    assert answer["bad_attribute_status"] == 400

"""The image against the SageMaker container contract, on a real Docker engine.

    make test-container            # or: pytest -m container tests/image -rs

Builds the image once per session (see conftest.py), trains a few CPU steps on synthetic data with an
/opt/ml tree mounted as SageMaker mounts it, serves that model through nginx on 8080, and checks the
two stop paths: SIGTERM to a server, `docker stop -t 120` to a training job (checkpoint, then resume).
Each test names its layer: the container layer, but the GPU variant is in the gpu layer only, so CI that
requires the container layer does not fail for want of a GPU.
"""

from __future__ import annotations

import io
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from maskrcnn.device import torch_build
from support import REPO

DOCKERFILE = REPO / "images" / "maskrcnn" / "Dockerfile"
SERVE_PORT = 8080
PING_DEADLINE_S = 180  # SageMaker allows minutes; a cold start here loads torch on 2 busy cores


def _png(size: int = 128) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((30, 30, 90, 90), fill=(230, 200, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _wait_for_log(container, needle: str, timeout: float) -> str:
    """Polls the container's logs until ``needle`` shows up; fails with the logs otherwise."""
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        container.reload()
        logs = container.logs().decode(errors="replace")
        if needle in logs:
            return logs
        if container.status == "exited":
            break
        time.sleep(1)
    pytest.fail(f"{needle!r} not logged within {timeout:.0f} s (status {container.status}):\n{logs[-4000:]}")


def _start_server(docker_client, image: str, opt_ml: Path, containers: list, **run_kwargs):
    """``docker run IMAGE serve`` (``run_kwargs``: more of docker's options), once /ping answers 200."""
    run_kwargs.setdefault("volumes", {str(opt_ml / "model"): {"bind": "/opt/ml/model", "mode": "ro"}})
    container = docker_client.containers.run(
        image, "serve", detach=True, ports={f"{SERVE_PORT}/tcp": ("127.0.0.1", None)}, **run_kwargs
    )
    containers.append(container)
    container.reload()
    port = container.attrs["NetworkSettings"]["Ports"][f"{SERVE_PORT}/tcp"][0]["HostPort"]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + PING_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return container, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        container.reload()
        if container.status == "exited":
            break
        time.sleep(1)
    logs = container.logs().decode(errors="replace")
    pytest.fail(f"/ping not healthy within {PING_DEADLINE_S} s:\n{logs[-4000:]}")


@pytest.mark.container
def test_image_metadata(docker_client, image: str) -> None:
    """Label, entrypoint, environment, and what must not be in the image (/opt/ml, compilers)."""
    attrs = docker_client.images.get(image).attrs["Config"]
    assert attrs["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert attrs["Labels"]["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"  # SAGEMAKER_MULTI_MODEL
    assert attrs["Entrypoint"] == ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint"]
    assert attrs["Cmd"] == ["train"]  # SDK v3's local mode starts training containers with no argument
    env = dict(item.split("=", 1) for item in attrs["Env"])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["NVIDIA_DISABLE_REQUIRE"] == "true"  # the CUDA base's NVIDIA_REQUIRE_CUDA must not refuse old drivers
    assert env["PATH"].startswith("/opt/venv/bin:")
    probe = (
        "test ! -e /opt/ml && ! command -v gcc && ! command -v cc && command -v train && command -v serve"
        " && command -v nginx"
        " && python3 -c 'import sys, maskrcnn, torch; assert sys.version_info[:2] == (3, 11)'"
    )
    out = docker_client.containers.run(image, ["-c", probe + " && echo probe-ok"], entrypoint="bash", remove=True)
    assert b"probe-ok" in out


@pytest.mark.unit
def test_the_compat_package_follows_torchs_cuda() -> None:
    """The Dockerfile installs the forward-compatibility package of the CUDA the pinned torch is built for."""
    cuda, _ = torch_build()
    assert cuda is not None, "the pinned torch is a CUDA build"
    default = re.search(r"^ARG CUDA_COMPAT_PACKAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert default is not None and default.group(1) == "cuda-compat-" + cuda.replace(".", "-")
    assert re.search(r"^\s+NVIDIA_DISABLE_REQUIRE=true \\$", DOCKERFILE.read_text(), re.MULTILINE)


@pytest.mark.container
def test_the_image_takes_its_route_on_a_driver_535_host(docker_client, image: str) -> None:
    """`serve` in the image on a faked R535 host: forward-compat where the image has the compat libraries (the
    CUDA base), else the refusal that says the image has none (the offline Debian base); never the CPU."""
    import docker

    script = (
        "mkdir -p /tmp/nv && echo 'NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Release Build'"
        " > /tmp/nv/version && if test -e /usr/local/cuda/compat/libcuda.so.1; then echo compat=yes >&2; fi"
        " && MASKRCNN_NVIDIA_PROC=/tmp/nv exec /usr/local/bin/entrypoint serve 1>&2"  # ContainerError keeps stderr
    )
    with pytest.raises(docker.errors.ContainerError) as caught:
        docker_client.containers.run(image, ["-c", script], entrypoint="sh", remove=True)
    exited = caught.value
    logs = (exited.stderr or b"").decode(errors="replace")
    assert exited.exit_status == 2, logs
    if "compat=yes" in logs:
        assert "route forward-compat" in logs and "CUDA cannot start (route forward-compat" in logs
    else:
        assert "/usr/local/cuda/compat has none" in logs and "route refused" in logs


@pytest.mark.container
def test_train_writes_model(trained_model: Path) -> None:
    """`docker run IMAGE train` with /opt/ml mounted writes the model where SageMaker collects it."""
    model = trained_model / "model"
    assert (model / "model.safetensors").stat().st_size > 0
    json.loads((model / "model.json").read_text())
    assert not (trained_model / "output" / "failure").exists()


@pytest.mark.container
def test_no_argument_trains_and_anything_else_is_refused(
    opt_ml_factory, run_to_completion, smoke_hyperparameters: dict[str, str]
) -> None:
    """SDK v3's local mode starts the image with no command: that trains. A stray argument is refused."""
    opt_ml = opt_ml_factory(smoke_hyperparameters)
    code, logs = run_to_completion(None, opt_ml, timeout=600)
    assert code == 0, f"no-argument start exited {code}:\n{logs[-4000:]}"
    assert (opt_ml / "model" / "model.safetensors").is_file()
    code, logs = run_to_completion("bash", opt_ml_factory(smoke_hyperparameters), timeout=60)
    assert code == 2
    assert "usage: docker run IMAGE [train|serve]" in logs and "'bash'" in logs


@pytest.mark.container
def test_serve_ping_and_invocations(docker_client, image: str, trained_model: Path, containers: list) -> None:
    """`docker run IMAGE serve` answers /ping and a PNG on /invocations through nginx on 8080."""
    _, url = _start_server(docker_client, image, trained_model, containers)
    request = urllib.request.Request(
        f"{url}/invocations",
        data=_png(),
        method="POST",
        headers={"Content-Type": "image/png", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        body = json.loads(response.read())
    # one prediction per image in the request (see maskrcnn.serve.codec.encode_json)
    (prediction,) = body["predictions"]
    assert prediction["image_size"] == [128, 128]
    assert isinstance(prediction["instances"], list)


@pytest.mark.container
def test_serve_exits_cleanly_on_sigterm(docker_client, image: str, trained_model: Path, containers: list) -> None:
    """SageMaker stops an endpoint with SIGTERM and kills 30 s later: the server must be gone by then."""
    container, _ = _start_server(docker_client, image, trained_model, containers)
    started = time.monotonic()
    container.kill(signal="SIGTERM")
    code = container.wait(timeout=30)["StatusCode"]
    elapsed = time.monotonic() - started
    logs = container.logs().decode(errors="replace")
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert code == 0, f"exit code {code} after SIGTERM:\n{logs[-4000:]}"


@pytest.mark.container
@pytest.mark.timeout(900)
def test_docker_stop_checkpoints_and_resumes(
    docker_client, image: str, opt_ml_factory, containers: list, smoke_hyperparameters: dict[str, str]
) -> None:
    """`docker stop -t 120` (StopTrainingJob) leaves a checkpoint that the next run resumes from."""
    # Long enough that the job is still training when stopped; checkpoints only on stop (and epoch ends).
    hyperparameters = dict(
        smoke_hyperparameters, max_steps="100000", epochs="1000", log_every="1", checkpoint_every="0"
    )
    opt_ml = opt_ml_factory(hyperparameters)
    volumes = {str(opt_ml): {"bind": "/opt/ml", "mode": "rw"}}

    first = docker_client.containers.run(image, "train", detach=True, volumes=volumes)
    containers.append(first)
    _wait_for_log(first, "phase=train", timeout=600)  # a metrics line: the loop is running
    first.stop(timeout=120)
    code = first.wait(timeout=10)["StatusCode"]
    logs = first.logs().decode(errors="replace")
    assert code != 137, f"SIGKILLed: SIGTERM was not handled within 120 s:\n{logs[-4000:]}"
    assert code == 143, f"a stopped job exits 143 (128 + SIGTERM), got {code}:\n{logs[-4000:]}"
    assert list((opt_ml / "checkpoints").iterdir()), f"no checkpoint after docker stop:\n{logs[-4000:]}"
    assert not (opt_ml / "model" / "model.safetensors").exists(), "a stopped job must not look finished"

    second = docker_client.containers.run(image, "train", detach=True, volumes=volumes)
    containers.append(second)
    _wait_for_log(second, "resum", timeout=600)
    second.stop(timeout=120)


@pytest.mark.gpu  # not `container`: this layer needs the NVIDIA runtime, which container CI lacks
@pytest.mark.timeout(900)
def test_train_on_gpu(
    docker_client, nvidia_runtime, image: str, opt_ml_factory, run_to_completion, smoke_hyperparameters
) -> None:
    """With `--gpus all`, torch sees CUDA in the image and a smoke training run completes."""
    import docker

    gpus = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    probe = "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))"
    out = docker_client.containers.run(image, ["-c", probe], entrypoint="python3", remove=True, device_requests=gpus)
    assert out.strip()
    opt_ml = opt_ml_factory(smoke_hyperparameters)
    code, logs = run_to_completion("train", opt_ml, timeout=900, device_requests=gpus)
    assert code == 0, f"train on GPU exited {code}:\n{logs[-4000:]}"
    assert (opt_ml / "model" / "model.safetensors").is_file()

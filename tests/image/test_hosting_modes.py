"""The image in SageMaker's other hosting modes, on a real Docker engine: serverless, asynchronous, multi-model.

    IMAGE=maskrcnn-sagemaker:latest MASKRCNN_SKIP_BUILD=1 pytest tests/image/test_hosting_modes.py -rs

Serverless Inference runs the container with the root file system read-only but /tmp and a memory cap of
1-6 GB; asynchronous inference posts a whole S3 object (up to 1 GB) to /invocations; a multi-model endpoint
starts with no model and loads each through its API. Three servers of the session's trained model, about a
minute on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_image import _png, _start_server

from local.check import large_body

pytestmark = pytest.mark.container

ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
SERVERLESS = {"read_only": True, "tmpfs": {"/tmp": ""}, "mem_limit": "3g", "memswap_limit": "3g"}


def _post(
    url: str, body: bytes, content_type: str = "image/png", headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, method="POST", headers={"Content-Type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 20-MB PNG of noise (2,650 x 2,650 pixels, under the 36-M pixel cap)."""
    body = large_body("image/png")
    assert body is not None and len(body) >= 20 * 1024 * 1024
    return body


def test_serverless_read_only_root_and_3g(
    docker_client, image: str, trained_model: Path, containers: list, big_png: bytes
) -> None:
    """`docker run --read-only --tmpfs /tmp --memory 3g IMAGE serve` answers /ping and /invocations with one
    worker, writes nothing outside /tmp, and refuses a 20-MB body with a typed 413 (the default 6 MiB)."""
    container, url = _start_server(docker_client, image, trained_model, containers, **SERVERLESS)
    status, content_type, body = _post(url, _png())
    assert status == 200 and content_type.startswith("application/json"), body[:300]
    assert json.loads(body)["predictions"][0]["image_size"] == [128, 128]

    # The other code paths too (the PNG overlay, polygons through contourpy): none needs a writable root.
    for headers, expected in (({"Accept": "image/png"}, "image/png"), ({ATTRIBUTES: "mask_format=polygon"}, "json")):
        status, content_type, body = _post(url, _png(), headers=headers)
        assert status == 200 and expected in content_type, (status, body[:300])

    status, content_type, body = _post(url, big_png)
    assert status == 413 and content_type.startswith("application/json"), (status, body[:300])
    assert "larger than" in json.loads(body)["error"]
    assert _post(url, _png())[0] == 200  # still serving

    logs = container.logs().decode(errors="replace")
    assert "1 worker(s)" in logs and "memory cap 3.0 GiB" in logs, logs[-3000:]
    for complaint in ("Read-only file system", "not writable", "Traceback"):
        assert complaint not in logs, logs[-3000:]
    container.reload()
    assert container.status == "running" and container.attrs["RestartCount"] == 0


def test_asynchronous_20_mb_body_with_the_limit_raised(
    docker_client, image: str, trained_model: Path, containers: list, big_png: bytes
) -> None:
    """SAGEMAKER_MAX_PAYLOAD_IN_MB=64 and SAGEMAKER_MODEL_SERVER_TIMEOUT=3600: a 20-MB image is answered; an image
    over the pixel cap is a typed 413 before it is decoded, and the server keeps serving."""
    from PIL import Image

    env = {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "64", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3600"}
    container, url = _start_server(docker_client, image, trained_model, containers, environment=env)
    status, content_type, body = _post(url, big_png)
    assert status == 200 and content_type.startswith("application/json"), (status, body[:300])
    with Image.open(io.BytesIO(big_png)) as decoded:
        assert json.loads(body)["predictions"][0]["image_size"] == [decoded.height, decoded.width]

    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # 64 M pixels in a few kB: over the 36-M cap
    status, content_type, body = _post(url, bomb.getvalue())
    assert status == 413 and "pixels" in json.loads(body)["error"], (status, body[:300])
    assert _post(url, _png())[0] == 200

    logs = container.logs().decode(errors="replace")
    assert "timeout 3600 s, payload 64 MiB" in logs, logs[-3000:]
    container.reload()
    assert container.status == "running" and container.attrs["RestartCount"] == 0


def _call(url: str, method: str, path: str, payload: dict | None = None, body: bytes | None = None):
    headers = {"Content-Type": "application/json"} if payload is not None else {"Content-Type": "image/png"}
    data = json.dumps(payload).encode() if payload is not None else body
    request = urllib.request.Request(f"{url}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_multi_model_api(docker_client, image: str, trained_model: Path, containers: list, tmp_path: Path) -> None:
    """SAGEMAKER_MULTI_MODEL=true and no /opt/ml/model: /ping 200 with nothing loaded; two models loaded, 409 on a
    second load, both invoked (through both workers), listed; one unloaded, then 404 for it; bad loads typed."""
    import shutil

    assert docker_client.images.get(image).labels.get("com.amazonaws.sagemaker.capabilities.multi-models") == "true"
    models = tmp_path / "models"
    for name in ("m1", "m2"):
        shutil.copytree(trained_model / "model", models / name / "model")
    (models / "broken" / "model").mkdir(parents=True)
    volumes = {str(models): {"bind": "/opt/ml/models", "mode": "ro"}}
    env = {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    container, url = _start_server(docker_client, image, trained_model, containers, volumes=volumes, environment=env)

    for name in ("m1", "m2"):
        assert _call(url, "POST", "/models", {"model_name": name, "url": f"/opt/ml/models/{name}/model"})[0] == 200
    assert _call(url, "POST", "/models", {"model_name": "m1", "url": "/opt/ml/models/m1/model"})[0] == 409
    status, missing = _call(url, "POST", "/models", {"model_name": "x", "url": "/opt/ml/models/x/model"})
    assert status == 404 and "no such folder" in missing["error"]
    status, broken = _call(url, "POST", "/models", {"model_name": "b", "url": "/opt/ml/models/broken/model"})
    assert status == 400 and "holds no saved model" in broken["error"]
    status, listed = _call(url, "GET", "/models")
    assert status == 200 and [m["modelName"] for m in listed["models"]] == ["m1", "m2"]
    for name in ("m1", "m2", "m2", "m2"):  # two workers: the second loads m2 on its first invocation of it
        status, answer = _call(url, "POST", f"/models/{name}/invoke", body=_png())
        assert status == 200 and answer["predictions"][0]["image_size"] == [128, 128], answer
    assert _call(url, "DELETE", "/models/m1")[0] == 200
    assert _call(url, "GET", "/models/m1")[0] == 404
    assert _call(url, "POST", "/models/m1/invoke", body=_png())[0] == 404
    assert _call(url, "GET", "/models/m2") == (200, {"modelName": "m2", "modelUrl": "/opt/ml/models/m2/model"})

    logs = container.logs().decode(errors="replace")
    assert "in this worker" in logs and "Traceback" not in logs, logs[-3000:]
    container.reload()
    assert container.status == "running" and container.attrs["RestartCount"] == 0

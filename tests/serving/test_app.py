"""The Flask app through its test client: a fake predictor for the HTTP contract, the real one for output."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import torch
from maskrcnn.model.architectures import ModelSpec
from maskrcnn.serve.app import create_app
from maskrcnn.serve.predictor import Detections
from maskrcnn.serve.settings import ServeSettings
from PIL import Image
from pycocotools import mask as mask_utils
from serving_support import CLASS_NAMES, DETECT

pytestmark = pytest.mark.unit

SETTINGS = ServeSettings(max_payload_mb=1, max_images=3)


class FakePredictor:
    """Answers every image with one box covering its top-left quarter; counts its calls."""

    def __init__(self, ready: bool = True):
        self.ready = ready
        self.spec = ModelSpec("lite", ("cat", "dog"), 128, 256, score_threshold=0.5, max_detections=10)
        self.calls: list[tuple[float | None, int | None]] = []

    def __call__(
        self, image: np.ndarray, score_threshold: float | None = None, max_detections: int | None = None
    ) -> Detections:
        self.calls.append((score_threshold, max_detections))
        height, width = image.shape[:2]
        boxes = np.array([[0, 0, width / 2, height / 2]], np.float32)
        return Detections(
            boxes, np.array([0.9], np.float32), np.array([2]), torch.ones((1, 1, 28, 28)), (height, width)
        )


@pytest.fixture
def fake() -> FakePredictor:
    return FakePredictor()


@pytest.fixture
def client(fake: FakePredictor):  # type: ignore[no-untyped-def]
    """A test client over the app with the fake predictor."""
    return create_app(fake, SETTINGS).test_client()


def post(client, body: bytes, content_type: str = "image/jpeg", **headers: str):  # type: ignore[no-untyped-def]
    return client.post("/invocations", data=body, headers={"Content-Type": content_type, **headers})


def test_ping(fake: FakePredictor) -> None:
    assert create_app(fake, SETTINGS).test_client().get("/ping").status_code == 200
    unready = create_app(FakePredictor(ready=False), SETTINGS).test_client()
    assert unready.get("/ping").status_code == 503
    assert post(unready, b"x").status_code == 503


def test_execution_parameters(client) -> None:  # type: ignore[no-untyped-def]
    answer = client.get("/execution-parameters")
    assert answer.status_code == 200
    assert answer.get_json() == {
        "MaxConcurrentTransforms": 1,
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": 1,
    }


def test_json_answer(client, fake: FakePredictor, sample_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    answer = post(client, sample_jpeg, Accept="application/json")
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    item = answer.get_json()["predictions"][0]["instances"][0]
    assert item["label"] == 2 and item["label_name"] == "dog" and item["score"] == 0.9
    assert set(item["mask"]) == {"size", "counts"}
    assert fake.calls == [(0.5, 10)]  # model.json's defaults


def test_server_timing_splits_the_time(fake: FakePredictor, sample_jpeg: bytes) -> None:
    """Server-Timing tells the model's milliseconds from decode and encode (here a 60 ms model)."""

    def slow(image: np.ndarray, *options: object) -> Detections:
        time.sleep(0.06)
        return FakePredictor.__call__(fake, image, *options)  # type: ignore[arg-type]

    slow.ready, slow.spec = True, fake.spec  # type: ignore[attr-defined]
    answer = post(create_app(slow, SETTINGS).test_client(), sample_jpeg)  # type: ignore[arg-type]
    parts = dict(item.strip().split(";dur=") for item in answer.headers["Server-Timing"].split(","))
    assert set(parts) == {"decode", "inference", "encode"}
    assert float(parts["inference"]) >= 60 and 0 < float(parts["decode"]) < 60 and 0 < float(parts["encode"]) < 60


def test_attributes_reach_the_predictor(client, fake: FakePredictor, sample_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    answer = post(
        client,
        sample_jpeg,
        **{"X-Amzn-SageMaker-Custom-Attributes": "score_threshold=0.25,max_detections=3,mask_format=none"},
    )
    assert answer.status_code == 200
    assert fake.calls == [(0.25, 3)]
    assert "mask" not in answer.get_json()["predictions"][0]["instances"][0]


def test_instances_list(client, sample_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"instances": [{"image": base64.b64encode(sample_jpeg).decode()}] * 2}).encode()
    answer = post(client, body, "application/json")
    assert answer.status_code == 200 and len(answer.get_json()["predictions"]) == 2
    assert post(client, body, "application/json", Accept="image/png").status_code == 406


def test_content_type_parameters_and_case_do_not_matter(client, sample_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"image": base64.b64encode(sample_jpeg).decode()}).encode()
    assert post(client, body, "Application/JSON; charset=utf-8").status_code == 200
    assert post(client, sample_jpeg, "IMAGE/JPEG; q=1").status_code == 200
    assert post(client, sample_jpeg, "text/plain; charset=utf-8").status_code == 415


def test_png_answer(client, sample_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    answer = post(client, sample_jpeg, "application/x-image", Accept="image/png")
    assert answer.status_code == 200 and answer.mimetype == "image/png"
    assert Image.open(io.BytesIO(answer.data)).format == "PNG"


@pytest.mark.parametrize(
    ("body", "content_type", "headers", "status"),
    [
        (b"", "image/jpeg", {}, 400),
        (b"garbage", "image/png", {}, 400),
        (b"{", "application/json", {}, 400),
        (b"x", "text/csv", {}, 415),
        (b"x", "image/jpeg", {"Accept": "text/html"}, 406),
        (b"x", "image/jpeg", {"X-Amzn-SageMaker-Custom-Attributes": "max_detections=11"}, 400),
        (b"x" * (1024 * 1024 + 1), "image/jpeg", {}, 413),
    ],
)
def test_errors_are_typed_json(
    client,
    body: bytes,
    content_type: str,
    headers: dict[str, str],  # type: ignore[no-untyped-def]
    status: int,
) -> None:
    answer = post(client, body, content_type, **headers)
    assert answer.status_code == status
    assert "error" in answer.get_json()


def test_unknown_paths_and_methods(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/nope").status_code == 404
    assert client.get("/invocations").status_code == 405
    assert client.get("/nope").get_json()["error"]


def test_a_predictor_crash_is_a_logged_500(sample_jpeg: bytes, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakePredictor):
        def __call__(self, *args: object, **kwargs: object) -> Detections:
            raise RuntimeError("boom")

    answer = post(create_app(Broken(), SETTINGS).test_client(), sample_jpeg)
    assert answer.status_code == 500 and "RuntimeError" in answer.get_json()["error"]
    assert "failed unexpectedly" in caplog.text


def test_real_predictor_end_to_end(predictor, sample_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    client = create_app(predictor, ServeSettings()).test_client()
    answer = post(client, sample_jpeg, **{"X-Amzn-SageMaker-Custom-Attributes": DETECT})
    assert answer.status_code == 200
    prediction = answer.get_json()["predictions"][0]
    assert prediction["image_size"] == [96, 128]
    assert 1 <= len(prediction["instances"]) <= 5
    for item in prediction["instances"]:
        assert item["label_name"] in CLASS_NAMES and 0 <= item["score"] <= 1
        mask = mask_utils.decode({"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode()})
        assert mask.shape == (96, 128)
    scores = [i["score"] for i in prediction["instances"]]
    assert scores == sorted(scores, reverse=True)


def test_autocast_context_gives_float32_detections(predictor, sample_rgb: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """The GPU's autocast branch of the forward, driven on the CPU (bfloat16 there too): float32 out."""
    from maskrcnn.serve.predictor import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), "bfloat16") is None  # never on the CPU by default
    assert predictor.autocast is None
    predictor.autocast = torch.bfloat16
    try:
        found = predictor(sample_rgb, score_threshold=0.0, max_detections=5)
    finally:
        predictor.autocast = None
    assert found.boxes.dtype == np.float32 and found.mask_probs.dtype == torch.float32
    assert len(found.rle_masks()) == len(found)

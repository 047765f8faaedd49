"""The multi-model API through Flask's test client: two workers' apps over one registry, a fake predictor."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from maskrcnn.serve import multimodel
from maskrcnn.serve.multimodel import ModelPool, ModelRegistry, create_multi_model_app, fits, memory_available_bytes
from maskrcnn.serve.settings import ServeSettings
from PIL import Image
from serving_support import build_tiny_model
from test_app import FakePredictor

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def base(tmp_path: Path, saved_model: Path) -> Path:
    """A base directory with two models where SageMaker copies them: models/<name>/model."""
    for name in ("m1", "m2"):
        shutil.copytree(saved_model, tmp_path / "models" / name / "model")
    (tmp_path / "models" / "empty" / "model").mkdir(parents=True)
    return tmp_path


class Worker:
    """One worker's app and the folders its loader was asked for."""

    def __init__(self, base: Path, registry: Path, **settings: int) -> None:
        self.loads: list[Path] = []
        self.pool = ModelPool(ModelRegistry(registry), self.load)
        self.client = create_multi_model_app(self.pool, ServeSettings(base_dir=base, **settings)).test_client()

    def load(self, folder: Path) -> FakePredictor:
        self.loads.append(folder)
        return FakePredictor()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _load(worker: Worker, name: str, base: Path):  # type: ignore[no-untyped-def]
    return worker.client.post("/models", json={"model_name": name, "url": str(base / "models" / name / "model")})


def test_load_two_invoke_both_list_unload_one_and_404(base: Path, tmp_path: Path) -> None:
    worker = Worker(base, tmp_path / "registry")
    assert worker.client.get("/ping").status_code == 200  # healthy with no model loaded
    assert _load(worker, "m1", base).status_code == 200
    assert _load(worker, "m2", base).status_code == 200
    again = _load(worker, "m1", base)
    assert again.status_code == 409 and "already loaded" in again.get_json()["error"]
    listed = worker.client.get("/models").get_json()
    assert listed == {
        "models": [
            {"modelName": "m1", "modelUrl": str(base / "models/m1/model")},
            {"modelName": "m2", "modelUrl": str(base / "models/m2/model")},
        ]
    }
    assert worker.client.get("/models/m2").get_json()["modelName"] == "m2"
    for name in ("m1", "m2"):
        reply = worker.client.post(
            f"/models/{name}/invoke",
            data=_png(),
            content_type="image/png",
            headers={"X-Amzn-SageMaker-Target-Model": f"{name}.tar.gz"},
        )
        assert reply.status_code == 200, reply.get_json()
        assert reply.get_json()["predictions"][0]["instances"][0]["label_name"] == "dog"
    assert worker.client.delete("/models/m1").status_code == 200
    assert worker.client.get("/models/m1").status_code == 404
    assert worker.client.post("/models/m1/invoke", data=_png(), content_type="image/png").status_code == 404
    assert worker.client.delete("/models/m1").status_code == 404
    assert [m["modelName"] for m in worker.client.get("/models").get_json()["models"]] == ["m2"]
    assert len(worker.loads) == 2 and set(worker.pool.loaded) == {"m2"}


def test_bad_loads_are_typed_4xx_with_the_reason(base: Path, tmp_path: Path) -> None:
    worker = Worker(base, tmp_path / "registry")
    missing = worker.client.post("/models", json={"model_name": "x", "url": str(base / "models/x/model")})
    assert missing.status_code == 404 and "no such folder" in missing.get_json()["error"]
    unusable = _load(worker, "empty", base)
    assert unusable.status_code == 400 and "holds no saved model" in unusable.get_json()["error"]
    outside = worker.client.post("/models", json={"model_name": "x", "url": str(tmp_path)})
    assert outside.status_code == 400 and "not under" in outside.get_json()["error"]
    for body in ({"model_name": "x"}, {"model_name": "", "url": "/a"}, ["m1"]):
        assert worker.client.post("/models", json=body).status_code == 400
    assert worker.client.post("/models", data=b"{", content_type="application/json").status_code == 400
    assert worker.client.post("/invocations", data=_png(), content_type="image/png").status_code == 400
    assert worker.client.get("/models?next_page_token=abc").status_code == 400
    assert worker.client.get("/models").get_json() == {"models": []} and worker.loads == []


def test_507_when_the_models_would_not_fit(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(base, tmp_path / "registry", max_models=1)
    assert _load(worker, "m1", base).status_code == 200
    full = _load(worker, "m2", base)
    assert full.status_code == 507 and "MASKRCNN_MAX_MODELS=1" in full.get_json()["error"]
    monkeypatch.setattr(multimodel, "memory_available_bytes", lambda: 1024)
    other = Worker(base, tmp_path / "other")
    short = _load(other, "m2", base)
    assert short.status_code == 507 and "MiB are free" in short.get_json()["error"]
    assert other.client.get("/models/m2").status_code == 404  # nothing half-registered
    assert fits(100, 2, 400) and not fits(100, 3, 400) and fits(10**12, 4, 0)


def test_workers_share_the_registry(base: Path, tmp_path: Path) -> None:
    """A model one worker loaded is loaded by another on its first invocation; an unload reaches both."""
    first, second = Worker(base, tmp_path / "registry"), Worker(base, tmp_path / "registry")
    assert _load(first, "m1", base).status_code == 200
    assert _load(second, "m1", base).status_code == 409
    assert second.client.post("/models/m1/invoke", data=_png(), content_type="image/png").status_code == 200
    assert second.loads == [base / "models/m1/model"]
    assert second.client.delete("/models/m1").status_code == 200
    first.pool.drop_unloaded()
    assert first.pool.loaded == {} and second.pool.loaded == {}


def test_list_pages(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multimodel, "PAGE_SIZE", 1)
    worker = Worker(base, tmp_path / "registry")
    for name in ("m1", "m2"):
        assert _load(worker, name, base).status_code == 200
    page = worker.client.get("/models").get_json()
    assert [m["modelName"] for m in page["models"]] == ["m1"] and page["nextPageToken"] == "1"
    last = worker.client.get(f"/models?next_page_token={page['nextPageToken']}").get_json()
    assert [m["modelName"] for m in last["models"]] == ["m2"] and "nextPageToken" not in last


def test_registry_names_are_opaque(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    assert registry.add("site/a b.tar.gz", "/opt/ml/models/x/model")
    assert not registry.add("site/a b.tar.gz", "/elsewhere")
    assert registry.entries() == [{"modelName": "site/a b.tar.gz", "modelUrl": "/opt/ml/models/x/model"}]
    assert registry.remove("site/a b.tar.gz") and not registry.remove("site/a b.tar.gz")


def test_memory_available_from_the_cgroup_else_meminfo(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("3221225472\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert memory_available_bytes(tmp_path) == 2 * 1024**3
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:     2048 kB\n")
    assert memory_available_bytes(tmp_path / "none", meminfo) == 2048 * 1024
    assert memory_available_bytes(tmp_path / "none", tmp_path / "none") == 0

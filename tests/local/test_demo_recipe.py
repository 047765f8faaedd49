"""The demo trains the "demo" preset of maskrcnn/train/config.py on the training set sized there: one home."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from maskrcnn.train.config import DEMO_TRAIN_IMAGES, PRESETS

from local import demo
from local.runtime import Runtime

pytestmark = pytest.mark.unit


class _Started(Exception):
    """Raised in place of the training job: what the demo asked for is all these tests need."""


@pytest.fixture
def started_job(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records the datasets the demo writes and the job it starts, then stops the demo there."""
    seen: dict[str, Any] = {}

    def write_datasets(data: Path, train_images: int, heldout_images: int) -> None:
        seen["train_images"], seen["heldout_images"] = train_images, heldout_images

    def run_training(spec: Any, *args: Any, **kwargs: Any) -> None:
        seen["hyperparameters"] = spec.hyperparameters
        raise _Started

    monkeypatch.setattr(demo, "write_datasets", write_datasets)
    monkeypatch.setattr(demo, "run_training", run_training)
    return seen


def test_the_demo_trains_the_demo_preset_on_its_training_set(tmp_path: Path, started_job: dict[str, Any]) -> None:
    with pytest.raises(_Started):
        demo.run_demo(tmp_path, Runtime(mode="process"))

    assert started_job["hyperparameters"] == PRESETS["demo"]
    assert started_job["train_images"] == DEMO_TRAIN_IMAGES
    assert started_job["heldout_images"] == demo.HELDOUT_IMAGES


def test_hp_overrides_go_on_top_of_the_demo_preset(tmp_path: Path, started_job: dict[str, Any]) -> None:
    with pytest.raises(_Started):
        demo.run_demo(tmp_path, Runtime(mode="process"), hp_overrides={"seed": "3", "epochs": "2"})

    assert started_job["hyperparameters"] == {**PRESETS["demo"], "seed": "3", "epochs": "2"}

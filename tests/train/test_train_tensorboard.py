"""A training job's TensorBoard event files, read back with tensorboard's own reader."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import REPO

pytestmark = pytest.mark.integration

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard (dev dependency) reads the files"
)

TRAIN = [sys.executable, str(REPO / "images" / "maskrcnn" / "train")]


def test_event_files_hold_losses_lr_speed_every_map_and_predicted_overlays(make_job) -> None:
    base = make_job({"max_steps": "4", "epochs": "1"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update(SAGEMAKER_BASE_DIR=str(base), PYTHONUNBUFFERED="1")
    result = subprocess.run(TRAIN, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr

    events = event_accumulator.EventAccumulator(
        str(base / "output" / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0}
    )
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/loss_mask"} <= scalars
    assert {"validation/bbox_mAP", "validation/segm_mAP", "validation/bbox_AP50", "validation/segm_AP50"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("validation/segm_AP50")] == [4]
    images = events.Tags()["images"]
    assert "predictions/0" in images
    shot = events.Images("predictions/0")[-1]
    assert shot.step == 4 and shot.width == 128 and shot.encoded_image_string[:4] == b"\x89PNG"

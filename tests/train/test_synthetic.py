"""The built-in dataset is deterministic and its masks are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from maskrcnn.train.synthetic import CLASSES, write_coco_dataset
from pycocotools import mask as mask_utils

pytestmark = pytest.mark.unit


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a = write_coco_dataset(tmp_path / "a", num_images=4, seed=1, size=64)
    b = write_coco_dataset(tmp_path / "b", num_images=4, seed=1, size=64)
    c = write_coco_dataset(tmp_path / "c", num_images=4, seed=2, size=64)
    assert a.read_bytes() == b.read_bytes()
    images = sorted((tmp_path / "a" / "images").iterdir())
    assert [p.read_bytes() for p in images] == [p.read_bytes() for p in sorted((tmp_path / "b" / "images").iterdir())]
    assert a.read_text() != c.read_text()


def test_instances_of_an_image_do_not_overlap_and_cover_every_class(tmp_path: Path) -> None:
    coco = json.loads(write_coco_dataset(tmp_path, num_images=30, seed=0, size=96).read_text())
    assert {c["name"] for c in coco["categories"]} == set(CLASSES)
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(mask_utils.decode(ann["segmentation"]))
    overlapping = any(int(np.sum(np.stack(m), axis=0).max()) > 1 for m in by_image.values())
    assert not overlapping

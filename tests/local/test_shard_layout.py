"""--distribution sharded deals a dataset's files by the job's own layout rules (maskrcnn.dataset_layout).

Each case is a folder the training job reads one way; the harness must find the same files in it, or refuse
it for the same reason, and every host's part must load as a dataset of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from maskrcnn.errors import DataError
from maskrcnn.train.data import load_index
from PIL import Image
from support import REPO

from local import layout
from local.errors import HarnessError

pytestmark = pytest.mark.unit


def coco(root: Path, names: list[str], annotation_file: str = "annotations.json", in_images: bool = True) -> Path:
    folder = root / "images" if in_images else root
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, name in enumerate(names, start=1):
        Image.new("RGB", (32, 24), (10 * i, 20, 30)).save(folder / name)
        images.append({"id": i, "file_name": name, "width": 32, "height": 24})
        anns.append({"id": i, "image_id": i, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20]], "iscrowd": 0})
    document = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    (root / annotation_file).write_text(json.dumps(document))
    return root


def pennfudan(root: Path, names: list[str]) -> Path:
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for name in names:
        Image.new("RGB", (32, 24)).save(root / "PNGImages" / name)
        mask = np.zeros((24, 32), np.uint8)
        mask[4:12, 4:12] = 1
        Image.fromarray(mask).save(root / "PedMasks" / f"{Path(name).stem}_mask.png")
    return root


def parts(src: Path, dest: Path, count: int = 2) -> list[list[str]]:
    """Shard ``src`` to ``count`` hosts; each part's image file names, as the job loads them."""
    out = []
    for shard in range(count):
        layout.shard_tree(src, dest / f"algo-{shard + 1}", shard, count)
        out.append(sorted(im["file_name"] for im in load_index(dest / f"algo-{shard + 1}").images))
    return out


def test_coco_images_beside_or_under_images_are_dealt_without_overlap(tmp_path: Path) -> None:
    src = coco(tmp_path / "beside", ["a.png", "b.png", "c.png"], in_images=False)
    assert parts(src, tmp_path / "out1") == [["a.png", "c.png"], ["b.png"]]
    src = coco(tmp_path / "under", ["a.png", "b.png", "c.png", "d.png"])
    assert parts(src, tmp_path / "out2") == [["a.png", "c.png"], ["b.png", "d.png"]]


def test_the_preferred_annotation_file_wins_on_both_sides(tmp_path: Path) -> None:
    src = coco(tmp_path / "data", ["a.png", "b.png"], annotation_file="instances.json")
    (src / "notes.json").write_text("{}")  # another JSON: the job reads instances.json, so must the harness
    assert parts(src, tmp_path / "out") == [["a.png"], ["b.png"]]
    assert sorted(p.name for p in (tmp_path / "out" / "algo-1").glob("*.json")) == ["instances.json"]


def test_several_annotation_files_without_a_preferred_one_are_refused_as_the_job_refuses_them(tmp_path: Path) -> None:
    src = coco(tmp_path / "data", ["a.png", "b.png"], annotation_file="train.json")
    (src / "val.json").write_text("{}")
    with pytest.raises(DataError, match="several annotation files") as refused_by_job:
        load_index(src)
    with pytest.raises(HarnessError, match="several annotation files") as refused_by_harness:
        layout.shard_tree(src, tmp_path / "out", 0, 2)
    assert str(refused_by_job.value) in str(refused_by_harness.value)


def test_pennfudan_images_of_every_suffix_the_job_reads_are_dealt(tmp_path: Path) -> None:
    src = pennfudan(tmp_path / "data", ["FudanPed1.png", "FudanPed2.jpg", "FudanPed3.PNG"])
    assert parts(src, tmp_path / "out") == [["FudanPed1.png", "FudanPed3.PNG"], ["FudanPed2.jpg"]]


def test_a_folder_of_neither_layout_is_refused_with_the_jobs_reason(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(HarnessError, match="cannot tell the dataset format"):
        layout.shard_tree(tmp_path / "data", tmp_path / "out", 0, 2)


def test_the_rules_the_harness_shares_with_the_job_import_no_torch() -> None:
    # The harness lays out jobs and serve decodes requests without the training stack's start-up cost.
    code = "import sys, local.layout, maskrcnn.dataset_layout, maskrcnn.imagefile; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0

"""Dataset loading, formats, augmentation and the errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from maskrcnn.data import InstanceDataset, detect_format, load_index, split_index, train_transforms
from maskrcnn.errors import DataError
from maskrcnn.synthetic import write_coco_dataset
from PIL import Image
from pycocotools import mask as mask_utils


def write_coco(root: Path, annotations: list[dict], categories=None, images=None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "images" / "a.png")
    coco = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": annotations,
        "categories": categories or [{"id": 7, "name": "thing"}, {"id": 9, "name": "other"}],
    }
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def square_rle(x0: int, y0: int, size: int, h: int = 30, w: int = 40) -> dict:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y0 + size, x0:x0 + size] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [h, w], "counts": rle["counts"].decode()}


def test_polygon_rle_and_uncompressed_masks_all_decode(tmp_path: Path) -> None:
    uncompressed = mask_utils.frPyObjects(
        {"size": [30, 40], "counts": [30 * 5 + 2, 4, 26, 4, 26, 4, 26, 4, 954]}, 30, 40
    )
    assert uncompressed is not None
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "segmentation": square_rle(20, 5, 6), "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 9,
         "segmentation": {"size": [30, 40], "counts": [30 * 5 + 2, 4, 26, 4, 26, 4, 26, 4, 954]}, "iscrowd": 1},
    ]
    index = load_index(write_coco(tmp_path, anns))
    assert index.class_names == ["thing", "other"] and index.num_classes == 3
    _, target = InstanceDataset(index, None)[0]
    # the crowd region is not a training target ...
    assert target["labels"].tolist() == [1, 2]
    assert target["masks"].shape == (2, 30, 40)
    assert target["boxes"][1].tolist() == [20.0, 5.0, 26.0, 11.0]
    assert int(target["masks"][1].sum()) == 36
    # ... but it is part of the evaluation ground truth
    gt = index.to_coco()
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1]
    assert gt["annotations"][2]["area"] == 16.0


def test_horizontal_flip_moves_boxes_and_masks_together(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": square_rle(2, 3, 5), "iscrowd": 0}]
    index = load_index(write_coco(tmp_path, anns))
    image, target = InstanceDataset(index, train_transforms(hflip=1.0, photometric=False))[0]
    assert image.shape == (3, 30, 40)
    assert image.dtype == torch.float32 and float(image.max()) <= 1.0
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert target["boxes"][0].tolist() == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    assert target["boxes"][0].tolist() == [33.0, 3.0, 38.0, 8.0]


def test_augmentation_is_reproducible_per_sample_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    write_coco_dataset(tmp_path, num_images=3, seed=0, size=64)
    dataset = InstanceDataset(load_index(tmp_path), train_transforms(0.5, True), seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = [dataset[i][0] for i in range(3)]
    assert torch.equal(before, torch.get_rng_state())
    again = [dataset[i][0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_pennfudan_layout_one_grey_level_per_instance(tmp_path: Path) -> None:
    (tmp_path / "PNGImages").mkdir()
    (tmp_path / "PedMasks").mkdir()
    for name in ("FudanPed00001", "PennPed00002"):
        Image.new("RGB", (50, 40), "white").save(tmp_path / "PNGImages" / f"{name}.png")
        mask = np.zeros((40, 50), dtype=np.uint8)
        mask[5:20, 5:15] = 1
        mask[10:35, 30:45] = 2
        Image.fromarray(mask).save(tmp_path / "PedMasks" / f"{name}_mask.png")
    assert detect_format(tmp_path) == "pennfudan"
    index = load_index(tmp_path)
    assert index.class_names == ["pedestrian"]
    _, target = InstanceDataset(index, None)[1]
    assert target["labels"].tolist() == [1, 1]
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 20.0], [30.0, 10.0, 45.0, 35.0]]


def test_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    write_coco_dataset(tmp_path, num_images=10, seed=0, size=48)
    index = load_index(tmp_path)
    train, val = split_index(index, 0.2, seed=1)
    _, val2 = split_index(index, 0.2, seed=1)
    assert [i["id"] for i in val.images] == [i["id"] for i in val2.images]
    assert len(val.images) == 2 and len(train.images) == 8
    assert not {i["id"] for i in train.images} & {i["id"] for i in val.images}


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing_file", "names 'gone.png', which is not in"),
        ("bad_category", "has category_id 3, not among the categories [7, 9]"),
        ("unreadable", "cannot read image"),
        ("empty", "has no images"),
        ("no_instances", "has no annotated instances"),
        ("no_json", "cannot tell the dataset format"),
        ("missing_dir", "does not exist"),
    ],
)
def test_bad_data_fails_fast_with_an_actionable_reason(tmp_path: Path, case: str, fragment: str) -> None:
    good = [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": square_rle(1, 1, 4), "iscrowd": 0}]
    root = tmp_path / "data"
    if case == "missing_file":
        write_coco(root, good, images=[{"id": 1, "file_name": "gone.png", "width": 40, "height": 30}])
    elif case == "bad_category":
        write_coco(root, [{**good[0], "category_id": 3}])
    elif case == "unreadable":
        write_coco(root, good)
        (root / "images" / "a.png").write_bytes(b"this is not a png")
    elif case == "empty":
        write_coco(root, [], images=[])
        (root / "annotations.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [
            {"id": 1, "name": "x"}]}))
    elif case == "no_instances":
        write_coco(root, [])
    elif case == "no_json":
        root.mkdir()
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_index(root)


def test_a_cached_dataset_decodes_each_file_once_and_serves_the_same_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import maskrcnn.data

    write_coco_dataset(tmp_path, num_images=4, seed=0, size=64)
    index = load_index(tmp_path)
    plain = InstanceDataset(index, train_transforms(0.5, True), seed=3)
    cached = InstanceDataset(index, train_transforms(0.5, True), seed=3, cache=True)
    reads: list[Path] = []
    real_load = maskrcnn.data.load_rgb
    monkeypatch.setattr(maskrcnn.data, "load_rgb", lambda path: reads.append(path) or real_load(path))
    for epoch in range(3):
        for dataset in (plain, cached):
            dataset.set_epoch(epoch)
        for i in range(4):
            (image_a, target_a), (image_b, target_b) = plain[i], cached[i]
            assert torch.equal(image_a, image_b)
            assert all(torch.equal(target_a[k], target_b[k]) for k in ("boxes", "masks", "labels"))
            target_b["masks"].zero_()  # what a consumer does to its sample does not reach the cache
    assert len(reads) == 3 * 4 + 4  # the plain set reads every epoch, the cached one once
    expected = sum(64 * 64 * (3 + len(index.annotations.get(im["id"], []))) for im in index.images)
    assert index.decoded_bytes() == expected

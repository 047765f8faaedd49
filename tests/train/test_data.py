"""Dataset loading, formats, augmentation and the errors a person can act on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from maskrcnn.dataset_layout import detect_format
from maskrcnn.errors import DataError
from maskrcnn.train.data import DatasetIndex, InstanceDataset, load_index, split_index, train_transforms
from maskrcnn.train.synthetic import write_coco_dataset
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils

pytestmark = pytest.mark.unit


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
    mask[y0 : y0 + size, x0 : x0 + size] = 1
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
        {
            "id": 3,
            "image_id": 1,
            "category_id": 9,
            "segmentation": {"size": [30, 40], "counts": [30 * 5 + 2, 4, 26, 4, 26, 4, 26, 4, 954]},
            "iscrowd": 1,
        },
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
        (root / "annotations.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]})
        )
    elif case == "no_instances":
        write_coco(root, [])
    elif case == "no_json":
        root.mkdir()
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_index(root)


def test_a_cached_dataset_decodes_each_file_once_and_serves_the_same_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import maskrcnn.train.data

    write_coco_dataset(tmp_path, num_images=4, seed=0, size=64)
    index = load_index(tmp_path)
    plain = InstanceDataset(index, train_transforms(0.5, True), seed=3)
    cached = InstanceDataset(index, train_transforms(0.5, True), seed=3, cache=True)
    reads: list[Path] = []
    real_load = maskrcnn.train.data.load_rgb
    monkeypatch.setattr(maskrcnn.train.data, "load_rgb", lambda path: reads.append(path) or real_load(path))
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


POLY = [[2, 2, 12, 2, 12, 12, 2, 12]]


def ann(ann_id: int, segmentation, **extra) -> dict:
    return {"id": ann_id, "image_id": 1, "category_id": 7, "segmentation": segmentation, "iscrowd": 0, **extra}


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (ann(17, [[10, 10, 60, 80]]), "polygon has 2 points, needs at least 3"),
        (ann(17, [[10, 10, 60]]), "polygon has 3 coordinates, an odd count"),
        (ann(17, [[10, 10, 20, 10, float("nan"), 20]]), "polygon has a coordinate that is not a finite number"),
        (ann(17, [[10, 10, 20, 10, "x", 20]]), "polygon has a coordinate that is not a number"),
        (ann(17, [10, 10, 20, 10, 20, 20]), "segmentation must be a list of polygons"),
        (ann(17, []), "segmentation is an empty list of polygons"),
        (
            ann(17, {"size": [40, 30], "counts": square_rle(1, 1, 4)["counts"]}),
            "RLE size [40, 30] is not the image's [height, width] [30, 40]",
        ),
        (ann(17, {"size": [30, 40], "counts": [5, 4, 6]}), "RLE counts cover 15 pixels, the 40x30 image has 1200"),
        (ann(17, {"size": [30, 40], "counts": [1000, -4, 204]}), "uncompressed RLE counts must be non-negative"),
        (
            ann(17, {"size": [30, 40], "counts": square_rle(1, 1, 4, h=20)["counts"]}),
            "RLE counts cover 800 pixels, the 40x30 image has 1200",
        ),
        (ann(17, {"size": [30, 40], "counts": "a b"}), "compressed RLE counts are malformed"),
        (ann(17, POLY, bbox=[1, 1, float("inf"), 3]), "bbox must be 4 finite numbers"),
        (ann(17, POLY, bbox=[5, 5, -2, 3]), "has a negative width or height"),
        (ann(17, POLY, bbox=[50, 5, 2, 3]), "lies outside the 40x30 image"),
        (ann(17, POLY, category_id=8), "has category_id 8, not among the categories [7, 9]"),
        (ann(17, POLY, iscrowd=2), "iscrowd is 2, expected 0 or 1"),
    ],
)
def test_a_bad_annotation_is_refused_naming_file_annotation_and_problem(
    tmp_path: Path, bad: dict, problem: str
) -> None:
    good = ann(1, POLY)
    root = write_coco(tmp_path / "data", [good, bad])
    with pytest.raises(DataError) as caught:
        load_index(root)
    assert str(caught.value).startswith("data/annotations.json: annotation 17 (image 'a.png')")
    assert problem in str(caught.value)


def test_an_annotation_naming_an_unknown_image_is_refused(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "data", [ann(1, POLY), {**ann(5, POLY), "image_id": 42}])
    with pytest.raises(DataError, match=r"^data/annotations.json: annotation 5 names unknown image id 42$"):
        load_index(root)


def test_an_image_whose_entry_disagrees_with_its_file_header_is_refused(tmp_path: Path) -> None:
    root = write_coco(
        tmp_path / "data", [ann(1, POLY)], images=[{"id": 1, "file_name": "a.png", "width": 30, "height": 40}]
    )
    with pytest.raises(DataError, match=r"image 1 \(a.png\) is 40x30 but its entry says 30x40"):
        load_index(root)


def test_repairs_are_counted_in_one_warning_line_and_the_sample_is_served_clean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    anns = [
        ann(1, [[2, 2, 12, 2, 12, 12, 2, 12], [30, 20, 31, 21]]),  # a 2-point part beside a good one
        ann(2, [[20, 5, 26, 5, 26, 11, 20, 11], [1, 1]]),
        ann(3, [[2, 2, 12, 2, 12, 12, 2, 12], [30, 20, 31, 21]]),  # ann 1 again under another id
        ann(4, square_rle(30, 20, 5), bbox=[30, 20, 0, 5]),  # zero-area box
        ann(5, square_rle(33, 20, 7), bbox=[33, 20, 9, 7]),  # box reaches past the 40 px width
    ]
    root = write_coco(tmp_path / "data", anns)
    with caplog.at_level("WARNING", logger="maskrcnn.train.data"):
        index = load_index(root)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [
        "data/annotations.json: repaired on load: 2 polygon parts with fewer than 3 points dropped from otherwise "
        "good annotations; 1 duplicate annotations (same image, category and mask as an earlier one) dropped; "
        "1 annotations with a zero-area bbox dropped; 1 bboxes clipped to their image"
    ]
    assert [a["id"] for a in index.annotations[1]] == [1, 2, 5]
    assert index.annotations[1][2]["bbox"] == [33, 20, 7, 7]
    _, target = InstanceDataset(index, train_transforms(hflip=0.0, photometric=False))[0]
    assert target["boxes"].tolist() == [[2.0, 2.0, 12.0, 12.0], [20.0, 5.0, 26.0, 11.0], [33.0, 20.0, 40.0, 27.0]]
    assert target["masks"].sum(dim=(1, 2)).tolist() == [100, 36, 49]
    assert len(index.to_coco()["annotations"]) == 3


def test_a_clean_dataset_logs_no_repair(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="maskrcnn.train.data"):
        load_index(write_coco(tmp_path, [ann(1, POLY), ann(2, square_rle(20, 5, 6), bbox=[20, 5, 6, 6])]))
    assert not caplog.records


def test_an_image_entry_pasted_twice_is_read_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entry = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}
    root = write_coco(tmp_path / "data", [ann(1, POLY), ann(1, POLY)], images=[entry, entry])
    with caplog.at_level("WARNING", logger="maskrcnn.train.data"):
        index = load_index(root)
    assert len(index.images) == 1 and len(InstanceDataset(index, None)) == 1
    assert len(index.annotations[1]) == 1
    assert "1 duplicate image entries dropped; 1 duplicate annotations" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("images", "problem"),
    [
        (
            [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}],
            "images 1 and 2 are the same file 'a.png'; list each image once",
        ),
        (
            [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "images/a.png"}],
            "images 1 and 2 are the same file 'images/a.png'",
        ),
        (
            [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
            "image id 1 is listed twice with different entries ('a.png' and 'b.png')",
        ),
    ],
)
def test_one_image_under_two_entries_is_refused(tmp_path: Path, images: list[dict], problem: str) -> None:
    root = write_coco(tmp_path / "data", [ann(1, POLY)], images=images)
    Image.new("RGB", (40, 30)).save(root / "images" / "b.png")
    with pytest.raises(DataError, match="^data/annotations.json: " + problem.replace("(", r"\(").replace(")", r"\)")):
        load_index(root)


def test_a_split_never_puts_one_file_on_both_sides(tmp_path: Path) -> None:
    write_coco_dataset(tmp_path, num_images=6, seed=0, size=48)
    index = load_index(tmp_path)
    # an index holding one file under several ids (load_index refuses that; a hand-built one may not)
    twice = [{**im, "id": im["id"] + 100} for im in index.images[:3]]
    doubled = DatasetIndex(
        index.root,
        index.images + twice,
        {**index.annotations, **{im["id"]: index.annotations[im["id"] - 100] for im in twice}},
        index.class_names,
    )
    for seed in range(20):
        train, val = split_index(doubled, 0.3, seed)
        assert len(train.images) + len(val.images) == 9
        assert not {im["path"] for im in train.images} & {im["path"] for im in val.images}


def test_pennfudan_image_and_mask_of_different_sizes_fail_on_load(tmp_path: Path) -> None:
    (tmp_path / "PNGImages").mkdir()
    (tmp_path / "PedMasks").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "PNGImages" / "FudanPed00001.png")
    Image.fromarray(np.ones((40, 60), dtype=np.uint8)).save(tmp_path / "PedMasks" / "FudanPed00001_mask.png")
    with pytest.raises(DataError, match=r"FudanPed00001\.png is 50x40 but its mask FudanPed00001_mask\.png is 60x40"):
        load_index(tmp_path)


def test_checking_thousands_of_annotations_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images").mkdir()
    images, anns = [], []
    for i in range(1, 101):
        Image.new("RGB", (64, 48)).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
        for k in range(30):
            poly = [float(v) for v in np.random.default_rng(i * 100 + k).uniform(0, 40, 40)]
            anns.append(
                {
                    "id": i * 100 + k,
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": [poly],
                    "bbox": [0, 0, 40, 40],
                    "iscrowd": 0,
                }
            )
    (tmp_path / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]})
    )

    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"pixels of {self.filename} decoded while loading the index")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    started = time.perf_counter()
    index = load_index(tmp_path)
    elapsed = time.perf_counter() - started
    assert sum(len(v) for v in index.annotations.values()) == 3000
    assert elapsed < 5.0, f"checking 100 images and 3000 annotations took {elapsed:.1f} s"

"""A user's image files train as the endpoint serves them: one decoder (maskrcnn.imagefile) for both.

The files are the ones that used to differ between the two paths: a phone photo stored sideways with EXIF
orientation 6 and annotated upright, a 12-bit PNG in 16 bits, a palette PNG with transparency, a CMYK JPEG,
plus grey, RGBA and full-range 16-bit. The unit tests compare the training sample's pixels with what
``codec.decode_image`` makes of the same bytes; the integration test runs a real job on the phone photos.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from maskrcnn import imagefile
from maskrcnn.errors import DataError
from maskrcnn.serve import codec
from maskrcnn.train.data import InstanceDataset, load_index
from PIL import Image, ImageFile
from support import REPO

TRAIN = [sys.executable, str(REPO / "images" / "maskrcnn" / "train")]
ORIENTATION = 0x0112


def upright_scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB picture: gradients and a bright rectangle in its top-left quarter, so a turn shows."""
    ys, xs = np.mgrid[0:height, 0:width]
    array = np.stack([xs * 60 // width, ys * 60 // height, np.full_like(xs, 10 * seed % 80)], axis=2).astype(np.uint8)
    array[height // 8 : height // 2, width // 8 : width // 2] = (230, 200, 40)
    return array


def phone_photo(path: Path, width: int = 96, height: int = 128, seed: int = 0) -> np.ndarray:
    """A JPEG (or PNG) stored sideways (``height`` x ``width`` on disk turned a quarter) with EXIF orientation 6.

    Returns the upright picture, as a browser shows the file. Orientation 6 says "turn 90 degrees clockwise
    to display", so the stored pixels are the upright ones turned 90 degrees counter-clockwise."""
    upright = upright_scene(width, height, seed)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))
    exif = stored.getexif()
    exif[ORIENTATION] = 6
    stored.save(path, exif=exif, quality=95)  # the suffix picks the format: a PNG stores it in an eXIf chunk
    return upright


def twelve_bit_png(path: Path) -> None:
    values = np.linspace(0, 4095, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(values).save(path)  # mode I;16, a 16-bit greyscale PNG


def sixteen_bit_png(path: Path) -> None:
    values = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(values).save(path)


def palette_with_transparency(path: Path) -> None:
    rgb = upright_scene(40, 30)
    image = Image.fromarray(rgb).quantize(colors=16)
    image.save(path, transparency=int(np.asarray(image)[0, 0]))  # the colour at the corner is see-through


def cmyk_jpeg(path: Path) -> None:
    Image.fromarray(upright_scene(40, 30)).convert("CMYK").save(path, format="JPEG", quality=95)


def grey_png(path: Path) -> None:
    Image.fromarray(upright_scene(40, 30)).convert("L").save(path)


def rgba_png(path: Path) -> None:
    rgba = np.dstack([upright_scene(40, 30), np.linspace(0, 255, 40 * 30).reshape(30, 40).astype(np.uint8)])
    Image.fromarray(rgba).save(path)


FILES: dict[str, Callable[[Path], object]] = {
    "phone.jpg": phone_photo,
    "phone.png": phone_photo,
    "twelve_bit.png": twelve_bit_png,
    "sixteen_bit.png": sixteen_bit_png,
    "palette.png": palette_with_transparency,
    "cmyk.jpg": cmyk_jpeg,
    "grey.png": grey_png,
    "rgba.png": rgba_png,
}


def write_dataset(root: Path, files: dict[str, Callable[[Path], object]], width_height: str = "upright") -> Path:
    """A COCO dataset of ``files``, one box-shaped polygon each; entries give the upright size unless told."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (name, make) in enumerate(files.items(), start=1):
        make(root / "images" / name)
        with Image.open(root / "images" / name) as handle:
            width, height = imagefile.upright_size(handle) if width_height == "upright" else handle.size
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        x0, y0, x1, y1 = width / 8, height / 8, width / 2, height / 2
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
            }
        )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "patch"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.mark.unit
def test_training_and_serving_see_the_same_pixels_of_every_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data", FILES)
    dataset = InstanceDataset(load_index(root), transforms=None)
    for i, entry in enumerate(dataset.index.images):
        trained, target = dataset[i]
        served = codec.decode_image((root / "images" / entry["file_name"]).read_bytes(), max_pixels=10**7)
        assert served.shape == (entry["height"], entry["width"], 3), entry["file_name"]
        assert np.array_equal(trained.permute(1, 2, 0).numpy(), served), entry["file_name"]
        assert target["masks"].shape[-2:] == trained.shape[-2:], entry["file_name"]


@pytest.mark.unit
@pytest.mark.parametrize("name", ["phone.jpg", "phone.png"])
def test_a_phone_photo_comes_out_upright_under_its_upright_annotation(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upright = phone_photo(tmp_path / name)
    with monkeypatch.context() as patch, Image.open(tmp_path / name) as handle:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded to read the size"))
        assert handle.size == (128, 96)  # stored sideways
        assert imagefile.upright_size(handle) == (96, 128)  # from the header alone
    root = write_dataset(tmp_path / "data", {name: phone_photo})
    image, target = InstanceDataset(load_index(root), transforms=None)[0]
    pixels = image.permute(1, 2, 0).numpy().astype(int)
    assert pixels.shape == upright.shape
    assert np.abs(pixels - upright).mean() < 4  # JPEG's loss only, not a turned picture
    # the annotated patch (top-left quarter, upright) lies on the bright rectangle
    x0, y0, x1, y1 = target["boxes"][0].int().tolist()
    assert pixels[y0:y1, x0:x1].mean() > 120 > pixels[y1:, x1:].mean()


@pytest.mark.unit
def test_a_phone_photo_annotated_as_stored_is_refused_with_the_reason(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data", {"phone.jpg": phone_photo}, width_height="stored")
    with pytest.raises(DataError, match=r"is 96x128 but its entry says 128x96 \(sizes are of the image upright"):
        load_index(root)


@pytest.mark.unit
def test_sixteen_bit_is_scaled_by_its_range_on_both_paths(tmp_path: Path) -> None:
    twelve_bit_png(tmp_path / "twelve.png")
    sixteen_bit_png(tmp_path / "sixteen.png")
    twelve = codec.decode_image((tmp_path / "twelve.png").read_bytes(), max_pixels=10**7)
    sixteen = codec.decode_image((tmp_path / "sixteen.png").read_bytes(), max_pixels=10**7)
    assert twelve.max() == round(4095 * 255 / 65535) == 16  # dark: 12 of 16 bits used, as the docs say
    assert (sixteen.min(), sixteen.max()) == (0, 255)


@pytest.mark.unit
def test_decoding_costs_no_more_than_pillows_own_conversion() -> None:
    """The request path's share: an upright RGB JPEG is not copied on the way (exif_transpose copies it)."""
    buffer = io.BytesIO()
    Image.fromarray(upright_scene(1024, 768)).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()

    def pillow_only() -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert("RGB"))

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(9):  # interleaved, best of each: a busy machine slows both alike
        for name, call in (("ours", lambda: codec.decode_image(data, max_pixels=10**7)), ("reference", pillow_only)):
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    ours, reference = min(times["ours"]), min(times["reference"])
    assert ours < reference * 1.5 + 0.002, f"decode {ours * 1e3:.2f} ms, Pillow alone {reference * 1e3:.2f} ms"


@pytest.mark.integration
def test_a_job_trains_on_phone_photos_annotated_upright(make_job, tmp_path: Path) -> None:
    files = {f"{n:04d}.jpg": (lambda path, n=n: phone_photo(path, seed=n)) for n in range(4)}
    data = write_dataset(tmp_path / "phones", files)
    base = make_job({"max_steps": "2", "val_fraction": "0.25"}, channels={"training": data})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MASKRCNN_"))}
    env.update({"SAGEMAKER_BASE_DIR": str(base), "TRAINING_JOB_NAME": "phones", "PYTHONUNBUFFERED": "1"})
    result = subprocess.run(TRAIN, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (base / "model" / "model.safetensors").is_file()
    assert not (base / "output" / "failure").exists()

"""codec: request bytes -> images, detections -> response bytes. Pure functions, no server."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision
from maskrcnn.errors import NotAcceptable, RequestError, UnsupportedMediaType
from maskrcnn.serve import codec
from maskrcnn.serve.codec import RequestOptions
from maskrcnn.serve.predictor import Detections, paste_binary_masks, rle_encode
from PIL import Image
from pycocotools import mask as mask_utils
from serving_support import encode

pytestmark = pytest.mark.unit

MAX_PIXELS = 4_000_000
DEFAULTS = RequestOptions(0.5, 100, "rle")


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return codec.decode_image(data, max_pixels)


def image_bytes(mode: str, size: tuple[int, int] = (40, 30), fmt: str = "PNG", **save: object) -> bytes:
    image = Image.new(mode, size)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "JPEG"),
        ("RGB", "PNG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("L", "JPEG"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
        ("RGB", "TIFF"),
        ("F", "TIFF"),
        ("RGB", "GIF"),
    ],
)
def test_every_pixel_format_becomes_rgb_uint8(mode: str, fmt: str) -> None:
    array = decode(image_bytes(mode, fmt=fmt))
    assert array.shape == (30, 40, 3)
    assert array.dtype == np.uint8


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    array = decode(buffer.getvalue())
    assert array[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_transparency_and_rgba_keep_colour() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0
    assert decode(encode(rgba, "PNG"))[0, 0].tolist() == [200, 0, 0]
    palette = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    assert decode(buffer.getvalue()).shape == (8, 8, 3)


def test_exif_orientation_is_applied() -> None:
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = decode(buffer.getvalue())
    assert upright.shape == (40, 20, 3)
    assert upright[:20].mean() > 200 > upright[20:].mean()  # the white half is now on top


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A 1-bit PNG that claims 8000 x 8000 pixels in a few kilobytes: over our cap, under Pillow's.
    data = image_bytes("1", size=(8000, 8000))
    assert len(data) < 100_000
    with pytest.raises(RequestError, match="the limit is") as refused:
        decode(data)
    assert refused.value.status == 413  # too large, as a body over the limit is
    # Far beyond: Pillow's own guard answers, still as a 400.
    with pytest.raises(RequestError):
        decode(image_bytes("1", size=(30000, 30000)), max_pixels=10**10)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, b"\xff\xd8\xff\xe0" + b"\0" * 50],
    ids=["empty", "text", "png-signature-only", "jpeg-header-only"],
)
def test_garbage_is_a_400(data: bytes) -> None:
    with pytest.raises(RequestError) as raised:
        decode(data)
    assert raised.value.status == 400


def test_truncated_images_are_a_400(sample_jpeg: bytes, sample_rgb: np.ndarray) -> None:
    png = encode(sample_rgb, "PNG")
    for data in (sample_jpeg[: len(sample_jpeg) // 2], png[: len(png) // 2]):
        with pytest.raises(RequestError):
            decode(data)


def test_png_with_bad_crc_is_a_400() -> None:
    data = bytearray(image_bytes("RGB"))
    data[-20] ^= 0xFF  # inside IDAT/IEND: breaks the checksum
    with pytest.raises(RequestError):
        decode(bytes(data))


def test_zero_width_png_is_a_400() -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(RequestError):
        decode(data)


def test_json_forms(sample_jpeg: bytes) -> None:
    b64 = base64.b64encode(sample_jpeg).decode()
    one = codec.decode_request(
        json.dumps({"image": b64}).encode(),
        "application/json",
        max_pixels=MAX_PIXELS,
        max_images=4,
    )
    many = codec.decode_request(
        json.dumps({"instances": [{"image": b64}] * 3}).encode(),
        "application/json",
        max_pixels=MAX_PIXELS,
        max_images=4,
    )
    assert len(one) == 1 and len(many) == 3


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"image": 5}',
        b'{"image": "!!!not base64!!!"}',
        b'{"instances": []}',
        b'{"instances": [{"img": "x"}]}',
        b'{"instances": "x"}',
        b'"just a string"',
        b"\xff\xfe",
        json.dumps({"instances": [{"image": "aGk="}] * 5}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_bad_json_bodies_are_400(body: bytes) -> None:
    with pytest.raises(RequestError) as raised:
        codec.decode_request(body, "application/json", max_pixels=MAX_PIXELS, max_images=4)
    assert raised.value.status == 400


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "image/gif", "multipart/form-data"])
def test_unsupported_content_types_are_415(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaType):
        codec.decode_request(b"x", content_type, max_pixels=MAX_PIXELS, max_images=4)


def test_attributes() -> None:
    parsed = codec.parse_attributes(" score_threshold=0.7, max_detections=10 ,mask_format=Polygon", DEFAULTS, 100)
    assert parsed == RequestOptions(0.7, 10, "polygon")
    assert codec.parse_attributes(None, DEFAULTS, 100) == DEFAULTS
    assert codec.parse_attributes("", DEFAULTS, 100) == DEFAULTS
    assert codec.parse_attributes("mask_format=none", DEFAULTS, 100).mask_format == "none"


@pytest.mark.parametrize(
    "text",
    [
        "score_threshold=2",
        "score_threshold=nan",
        "score_threshold=abc",
        "max_detections=0",
        "max_detections=101",
        "max_detections=1.5",
        "mask_format=bitmap",
        "threshold=0.5",
        "score_threshold",
        "=5",
        "x" * 1025,
    ],
)
def test_bad_attributes_are_400(text: str) -> None:
    with pytest.raises(RequestError) as raised:
        codec.parse_attributes(text, DEFAULTS, 100)
    assert raised.value.status == 400


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("", "application/json"),  # an empty header is no preference, as the OpenAPI document says
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("image/png", "image/png"),
        ("image/*", "image/png"),
        ("image/png;q=0.5, application/json", "application/json"),
        ("text/html, image/png", "image/png"),
        ("application/json;q=0, image/png", "image/png"),
        ("image/png, application/json", "application/json"),  # a tie: the server's order, JSON first
        ("image/*;q=0.9, application/json;q=0.8", "image/png"),
    ],
)
def test_accept_negotiation(accept: str | None, expected: str) -> None:
    assert codec.negotiate(accept) == expected


def test_unacceptable_accept_is_406() -> None:
    with pytest.raises(NotAcceptable):
        codec.negotiate("text/html")


def fake_detections(height: int = 60, width: int = 80) -> Detections:
    boxes = np.array([[10, 10, 40, 50], [30, 5, 70, 30]], np.float32)
    probs = torch.zeros((2, 1, 28, 28))
    probs[:, :, 4:24, 4:24] = 0.9
    return Detections(boxes, np.array([0.9, 0.6], np.float32), np.array([1, 3]), probs, (height, width))


def test_rle_round_trips_and_matches_the_pasted_masks() -> None:
    detections = fake_detections()
    body = json.loads(codec.encode_json([detections], ("circle", "rectangle", "triangle"), "rle"))
    found = body["predictions"][0]["instances"]
    assert [i["label_name"] for i in found] == ["circle", "triangle"]
    assert body["predictions"][0]["image_size"] == [60, 80]
    for i, item in enumerate(found):
        decoded = mask_utils.decode({"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), detections.mask(i))
        assert decoded.sum() > 0
        x1, y1, x2, y2 = item["box"]
        ys, xs = np.nonzero(decoded)
        assert x1 - 2 <= xs.min() and xs.max() <= x2 + 2 and y1 - 2 <= ys.min() and ys.max() <= y2 + 2


def test_small_chunks_give_the_same_masks() -> None:
    detections = fake_detections()
    whole = np.concatenate(list(detections.mask_chunks()), axis=2)
    one_by_one = np.concatenate(list(detections.mask_chunks(pixel_budget=1)), axis=2)
    assert np.array_equal(whole, one_by_one)


def test_chunks_equal_torchvision_pasting_for_any_box() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, generator=generator) * 120
    sizes = torch.rand(40, 2, generator=generator) * 90
    sizes[:3] = 0.2  # degenerate, sub-pixel boxes
    boxes = torch.cat([corners, corners + sizes], dim=1)
    # clipped to the image as the model's boxes are; pasting still spills a pixel past the edges
    boxes = torchvision.ops.clip_boxes_to_image(boxes, (90, 120)).numpy().astype(np.float32)
    probs = torch.rand(40, 1, 28, 28, generator=generator)
    detections = Detections(boxes, np.linspace(1, 0.1, 40, dtype=np.float32), np.ones(40, np.int64), probs, (90, 120))
    chunks = np.concatenate(list(detections.mask_chunks(pixel_budget=90 * 120 * 7)), axis=2)
    expected = np.stack([detections.mask(i) for i in range(40)], axis=2)
    assert chunks.flags.f_contiguous and chunks.shape == (90, 120, 40)
    assert np.array_equal(chunks.astype(bool), expected)


def random_detections(count: int, height: int, width: int, seed: int = 0) -> Detections:
    """Boxes anywhere (sub-pixel, past the edges after expansion), smooth-ish random probabilities."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    sizes = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.8
    sizes[:3] = 0.2
    boxes = torch.cat([corners, corners + sizes], dim=1)
    boxes = torchvision.ops.clip_boxes_to_image(boxes, (height, width)).numpy().astype(np.float32)
    probs = torch.nn.functional.avg_pool2d(torch.rand(count, 1, 32, 32, generator=generator), 5, 1)  # 28 x 28
    scores = np.linspace(1, 0.1, count, dtype=np.float32)
    return Detections(boxes, scores, np.ones(count, np.int64), probs, (height, width))


@pytest.mark.parametrize(("height", "width", "budget"), [(90, 120, 16_000_000), (77, 51, 77 * 51 * 3), (200, 37, 1)])
def test_batched_pasting_gives_the_box_by_box_masks(height: int, width: int, budget: int) -> None:
    """The GPU path (all masks in a few gathers) against the CPU path, run here on CPU tensors."""
    detections = random_detections(40, height, width)
    expected = np.concatenate(list(detections.mask_chunks()), axis=2)
    batched = paste_binary_masks(
        detections.mask_probs, torch.from_numpy(detections.boxes), (height, width), 0.5, pixel_budget=budget
    )
    got = np.concatenate([m.to(torch.uint8).numpy().transpose(2, 1, 0) for m in batched], axis=2)
    assert got.shape == expected.shape == (height, width, 40)
    assert np.array_equal(got, expected)


def test_device_rle_gives_pycocotools_bytes() -> None:
    detections = random_detections(30, 64, 96, seed=1)
    chunks = np.concatenate(list(detections.mask_chunks()), axis=2)
    chunks[:, :, 0] = 1  # a mask that starts with a run of ones, and one that is all ones
    chunks[:, :, 1] = 0
    chunks[0, 0, 1] = 1
    chunks[:, :, 2] = 0  # and an empty one
    expected = mask_utils.encode(np.asfortranarray(chunks))
    masks = torch.from_numpy(np.ascontiguousarray(chunks.transpose(2, 1, 0))).bool()
    assert rle_encode(masks, (64, 96)) == expected
    assert rle_encode(masks[:0], (64, 96)) == []


def test_rle_masks_on_the_cpu_are_the_chunks_encoded() -> None:
    detections = random_detections(12, 50, 70, seed=2)
    chunks = np.concatenate(list(detections.mask_chunks()), axis=2)
    assert detections.rle_masks() == mask_utils.encode(np.asfortranarray(chunks))


def test_polygon_and_none_formats() -> None:
    detections = fake_detections()
    polygons = json.loads(codec.encode_json([detections], ("a", "b", "c"), "polygon"))
    item = polygons["predictions"][0]["instances"][0]
    outline = np.array(item["mask"]["polygons"][0]).reshape(-1, 2)
    assert len(outline) >= 4
    assert outline[:, 0].min() >= 9 and outline[:, 0].max() <= 41  # within the box, in x
    bare = json.loads(codec.encode_json([detections], ("a", "b", "c"), "none"))
    assert "mask" not in bare["predictions"][0]["instances"][0]


def test_png_rendering(sample_rgb: np.ndarray) -> None:
    detections = fake_detections(*sample_rgb.shape[:2])
    rendered = Image.open(io.BytesIO(codec.encode_png(sample_rgb, detections, ("a", "b", "c"))))
    assert rendered.format == "PNG" and rendered.size == (sample_rgb.shape[1], sample_rgb.shape[0])
    assert not np.array_equal(np.asarray(rendered), sample_rgb)  # something was drawn


def test_empty_detections_encode() -> None:
    empty = Detections.empty((10, 20))
    assert json.loads(codec.encode_json([empty], ("a",), "rle"))["predictions"][0]["instances"] == []


def test_the_gpu_branches_run_on_cpu_tensors() -> None:
    """What a GPU's Detections do (batched paste, copy back, device RLE), driven here on CPU tensors."""
    detections = random_detections(25, 70, 90, seed=3)
    expected = np.concatenate(list(detections.mask_chunks()), axis=2)
    device_chunks = np.concatenate(list(detections._device_chunks()), axis=2)
    assert device_chunks.flags.f_contiguous and np.array_equal(device_chunks, expected)
    device_rle = [e for masks in detections._device_masks() for e in rle_encode(masks, detections.image_size)]
    assert device_rle == detections.rle_masks()

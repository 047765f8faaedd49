"""Request bytes -> images, detections -> response bytes. Pure functions; no server, no model.

Requests (``POST /invocations``):

* ``image/jpeg``, ``image/png``, ``application/x-image``: the body is one image file. Any format
  Pillow reads is accepted under these types (the bytes decide, not the label).
* ``application/json``: ``{"image": "<base64>"}`` for one image, or
  ``{"instances": [{"image": "<base64>"}, ...]}`` for up to ``max_images``.

Every image becomes H x W x 3 uint8 RGB by :mod:`maskrcnn.imagefile`, the decoder training uses too: EXIF
orientation applied; palette, RGBA, LA, CMYK, greyscale, 1-bit and 16-bit images converted (alpha dropped,
16-bit scaled by 255/65535). An image whose header promises more than ``max_pixels`` is refused before it is
decoded (decompression bombs).

Options come from ``X-Amzn-SageMaker-Custom-Attributes`` as comma-separated ``key=value`` pairs:
``score_threshold`` (0..1), ``max_detections`` (1..the model's), ``mask_format`` (rle, polygon,
none). Unknown keys are refused so that a typo does not silently change nothing.

Responses (``Accept``): ``application/json`` (also ``*/*`` or none) is
``{"predictions": [{"image_size": [h, w], "instances": [{"box": [x1, y1, x2, y2], "label": 1,
"label_name": "circle", "score": 0.97, "mask": {"size": [h, w], "counts": "<COCO RLE>"}}]}]}``,
one prediction per input image; ``image/png`` (one image only) is the input with masks, boxes and
labels drawn. Every problem raises a :class:`maskrcnn.errors.RequestError` subclass.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from maskrcnn import imagefile
from maskrcnn.errors import NotAcceptable, RequestError, UnsupportedMediaType
from maskrcnn.serve.content_types import JSON_TYPE, RESPONSE_TYPES, SUPPORTED_TYPES
from maskrcnn.serve.content_types import PNG_TYPE as PNG_TYPE  # serve/app.py reads codec.PNG_TYPE

if TYPE_CHECKING:
    from maskrcnn.serve.predictor import Detections

MASK_FORMATS = ("rle", "polygon", "none")
ATTRIBUTES_LIMIT = 1024  # SageMaker passes at most 1024 characters of custom attributes


@dataclass(frozen=True)
class RequestOptions:
    """Per-request knobs; defaults come from model.json."""

    score_threshold: float = 0.5
    max_detections: int = 100
    mask_format: str = "rle"


def parse_attributes(text: str | None, defaults: RequestOptions, max_detections_cap: int) -> RequestOptions:
    """Read ``score_threshold=0.7,max_detections=10,mask_format=polygon`` over ``defaults``."""
    if not text or not text.strip():
        return defaults
    if len(text) > ATTRIBUTES_LIMIT:
        raise RequestError(f"custom attributes are longer than {ATTRIBUTES_LIMIT} characters")
    options = defaults
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key:
            raise RequestError(f"custom attribute {item!r} is not key=value")
        if key == "score_threshold":
            try:
                threshold = float(value)
            except ValueError:
                threshold = math.nan
            if not 0.0 <= threshold <= 1.0:  # also rejects nan
                raise RequestError(f"score_threshold must be a number within [0, 1], got {value!r}")
            options = replace(options, score_threshold=threshold)
        elif key == "max_detections":
            try:
                count = int(value)
            except ValueError:
                count = 0
            if not 1 <= count <= max_detections_cap:
                raise RequestError(f"max_detections must be an integer within [1, {max_detections_cap}], got {value!r}")
            options = replace(options, max_detections=count)
        elif key == "mask_format":
            if value.lower() not in MASK_FORMATS:
                raise RequestError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {value!r}")
            options = replace(options, mask_format=value.lower())
        else:
            raise RequestError(
                f"unknown custom attribute {key!r}; accepted: score_threshold, max_detections, mask_format"
            )
    return options


def negotiate(accept: str | None) -> str:
    """The response type for an ``Accept`` header: JSON unless PNG is strictly preferred; 406 if neither fits.

    werkzeug parses the header (q-values, wildcards, specificity); on a tie the server's order decides,
    and JSON comes first. An absent or empty header is no preference: JSON.
    """
    if not accept or not accept.strip():
        return JSON_TYPE
    best = parse_accept_header(accept, MIMEAccept).best_match(list(RESPONSE_TYPES))
    if best is None:
        raise NotAcceptable(f"cannot answer with {accept!r}; offered: {', '.join(RESPONSE_TYPES)}")
    return best


def check_content_type(kind: str | None) -> str:
    """``kind``, the request's media type without parameters (Flask's ``request.mimetype``), if we accept it;
    415 otherwise."""
    kind = kind or ""
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedMediaType(
            f"unsupported content type {kind or '(none)'!r}; send one of {', '.join(SUPPORTED_TYPES)}"
        )
    return kind


def decode_request(body: bytes, mimetype: str | None, *, max_pixels: int, max_images: int) -> list[np.ndarray]:
    """The images in a request body of media type ``mimetype`` (no parameters), each H x W x 3 uint8 RGB."""
    if check_content_type(mimetype) == JSON_TYPE:
        return [decode_image(data, max_pixels) for data in _json_images(body, max_images)]
    return [decode_image(body, max_pixels)]


def _json_images(body: bytes, max_images: int) -> list[bytes]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply") from None
    if isinstance(document, dict) and "image" in document:
        encoded = [document["image"]]
    elif isinstance(document, dict) and isinstance(document.get("instances"), list):
        instances = document["instances"]
        if not instances:
            raise RequestError('"instances" is empty')
        if len(instances) > max_images:
            raise RequestError(f'"instances" holds {len(instances)} images; at most {max_images} per request')
        if not all(isinstance(item, dict) and "image" in item for item in instances):
            raise RequestError('every item of "instances" must be an object with an "image" key')
        encoded = [item["image"] for item in instances]
    else:
        raise RequestError('JSON body must be {"image": "<base64>"} or {"instances": [{"image": "<base64>"}, ...]}')
    images = []
    for index, text in enumerate(encoded):
        if not isinstance(text, str):
            raise RequestError(f"image {index} must be a base64 string")
        try:
            images.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(f"image {index} is not valid base64") from None
    return images


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """One image file's bytes -> H x W x 3 uint8 RGB, upright (:func:`maskrcnn.imagefile.decode`)."""
    if not data:
        raise RequestError("the image is empty")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning would only repeat what our cap already decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise RequestError(f"the image has no pixels ({width} x {height})")
            if width * height > max_pixels:  # 413: too large, like a body over the limit (asynchronous bodies)
                raise RequestError(
                    f"the image is {width} x {height} = {width * height} pixels; the limit is {max_pixels}",
                    status=413,
                )
            return imagefile.decode(image)  # truncated or corrupt data fails here, not later
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError("the body is not an image this server can read") from None
    except Image.DecompressionBombError as exc:
        raise RequestError(f"the image is too large to decode: {exc}") from None
    except imagefile.PixelFormatError as exc:
        raise RequestError(str(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        # Pillow reports corrupt or truncated files through all of these.
        raise RequestError(f"the image could not be decoded: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Responses


def instances(detections: Detections, class_names: Sequence[str], mask_format: str) -> list[dict[str, Any]]:
    """One JSON-ready dict per detection."""
    out = []
    for i in range(len(detections)):
        label = int(detections.labels[i])
        out.append(
            {
                "box": [round(float(v), 2) for v in detections.boxes[i]],
                "label": label,
                "label_name": _name(label, class_names),
                "score": round(float(detections.scores[i]), 4),
            }
        )
    if mask_format == "none" or not out:
        return out
    masks: list[dict[str, Any]] = []
    if mask_format == "rle":
        masks.extend(_rle_dict(encoded) for encoded in detections.rle_masks())
    else:
        for chunk in detections.mask_chunks():
            masks.extend({"polygons": polygons(chunk[:, :, j])} for j in range(chunk.shape[2]))
    for item, mask in zip(out, masks, strict=True):
        item["mask"] = mask
    return out


def encode_json(results: Sequence[Detections], class_names: Sequence[str], mask_format: str) -> bytes:
    predictions = [
        {"image_size": list(d.image_size), "instances": instances(d, class_names, mask_format)} for d in results
    ]
    return json.dumps({"predictions": predictions}, separators=(",", ":")).encode()


def _rle_dict(encoded: dict[str, Any]) -> dict[str, Any]:
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat ``[x1, y1, x2, y2, ...]`` lists, pixel-centre coordinates) of a mask's outlines."""
    import contourpy  # matplotlib's contouring engine; only the polygon format needs it

    # A zero border closes every outline, including those touching the image edge.
    padded = np.pad(mask.astype(np.float32), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    out = []
    for line in map(np.asarray, lines):
        if len(line) < 3:
            continue
        points = np.round(line - 1.0, 2)  # undo the padding offset
        out.append([float(v) for v in points.reshape(-1)])
    return out


def encode_png(image: np.ndarray, detections: Detections, class_names: Sequence[str]) -> bytes:
    """The image with every detection's mask, box and "name score" label drawn."""
    import torch
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    canvas = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
    colors = [palette[int(label) % len(palette)] for label in detections.labels]
    for i in range(len(detections)):
        # One mask at a time: N full-size masks at once could be gigabytes on a large image.
        mask = torch.from_numpy(detections.mask(i))[None]
        canvas = draw_segmentation_masks(canvas, mask, alpha=0.45, colors=colors[i])
    if len(detections):
        labels = [
            f"{_name(int(label), class_names)} {score:.2f}"
            for label, score in zip(detections.labels, detections.scores, strict=True)
        ]
        canvas = draw_bounding_boxes(canvas, torch.from_numpy(detections.boxes), labels=labels, colors=colors, width=2)
    buffer = io.BytesIO()
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _name(label: int, class_names: Sequence[str]) -> str:
    """Label 1 is class_names[0]; an id outside the list keeps its number."""
    return class_names[label - 1] if 1 <= label <= len(class_names) else str(label)

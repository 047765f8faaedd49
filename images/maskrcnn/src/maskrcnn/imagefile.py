"""Image file -> upright H x W x 3 uint8 RGB pixels: the one decoder training, evaluation and serving share.

The model sees what a person sees in a browser or a labeling tool, whichever process reads the file:

* **Orientation.** The EXIF orientation (1-8, or XMP's ``tiff:Orientation``) is applied, so a phone photo
  stored sideways with orientation 6 comes out upright, and :func:`upright_size` is the (width, height) an
  annotation of it must state. A PNG's orientation counts where its metadata stands before the pixels (an
  ``eXIf`` chunk after the image data is not looked for: finding it would decode the pixels just to read the
  size); a broken EXIF block counts as no orientation.
* **Modes**, each converted by one rule:

  - 16-bit greyscale (``I;16``, ``I;16B``, ...) is scaled by the bit depth's range, ``v * 255 / 65535``,
    rounded. A 12-bit image stored in 16 bits (values up to 4095) therefore comes out dark (at most 16): the
    file does not say how many of its bits are used, and guessing from the pixels would make the same value a
    different grey in two images. Rescale such data to the full 16 bits, or to 8, before training.
  - 32-bit integer and float greyscale (``I``, ``F``): the same scale as 16-bit where any value is above 255,
    else taken as 8-bit values; clipped to 0-255.
  - Palette with transparency: converted through RGBA, so every entry keeps its colour; alpha is dropped.
  - RGBA, LA, PA: alpha dropped (not blended onto a background). CMYK (JPEG, TIFF; Adobe's inverted CMYK
    too), greyscale, 1-bit, palette and every other mode Pillow converts: Pillow's ``convert("RGB")``.

Multi-frame files (GIF, TIFF) give their first frame. PIL and NumPy only, no torch: ``serve`` imports this
at start-up, and an orientation costs one ``transpose`` only where a file has one.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image

# EXIF orientation -> the transpose that makes the image upright (ImageOps.exif_transpose's table; that
# function copies the whole image even when nothing is to be turned, a cost on every request).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_PNG_METADATA = ("exif", "Raw profile type exif", "XML:com.adobe.xmp")  # what a PNG may state before its pixels
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_TOP = 65535.0


class PixelFormatError(ValueError):
    """The image's mode has no RGB conversion."""


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image, read before its pixels are; 1 where none is stated."""
    if image.format == "PNG" and not any(key in image.info for key in _PNG_METADATA):
        return 1  # Pillow would decode the whole PNG to look for an eXIf chunk behind the pixels
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block should not cost the image; Pillow raises many kinds here
        return 1
    return value if value in _UPRIGHT else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once it is upright; reads the header only, no pixels."""
    width, height = image.size
    return (height, width) if orientation(image) in _SWAPS_SIDES else (width, height)


def decode(image: Image.Image) -> np.ndarray:
    """An opened image's pixels, upright, as H x W x 3 uint8 RGB (the module docstring's rules).

    Decoding errors are Pillow's (``OSError``, ``ValueError``, ...); a mode with no RGB conversion raises
    :class:`PixelFormatError`. The caller opens the file, so it can check the header before any pixel is read.
    """
    turn = orientation(image)  # before load(): a PNG's trailing chunks are read by it
    image.load()
    if turn in _UPRIGHT:
        image = image.transpose(_UPRIGHT[turn])
    return to_rgb(image)


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded image's pixels as H x W x 3 uint8 RGB, orientation untouched."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = SIXTEEN_BIT_TOP if mode in SIXTEEN_BIT_MODES or array.max(initial=0) > 255 else 255.0
        grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency converts cleanly only via RGBA
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise PixelFormatError(f"unsupported pixel format {mode!r}")
    return array

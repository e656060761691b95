"""Image input at the edges: paths, PIL images and arrays become ``H x W x 3`` RGB arrays.

Arrays are ``uint8`` or ``float32`` on the 0-255 scale. Grayscale, palette and other PIL
modes are converted to RGB; 16- and 32-bit integer grayscale (PNG's 16-bit) is scaled from
0-65535 to 0-255; transparent images (RGBA, LA, palette with transparency) are composited
on white first.

Image files (paths here, PNG/JPEG over the wire) are opened by :func:`decode_image_bytes`
or :func:`load_image`: the pixel count is read from the header and an image over
``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) is refused before it is decoded; the
EXIF orientation is applied, so the model sees a photo upright as a viewer shows it.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from blackbox_vqa.errors import ImageError, ImageTooLargeError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageInput",
    "decode_image_bytes",
    "load_image",
    "to_rgb_array",
]

ImageInput = str | os.PathLike[str] | Image.Image | NDArray[np.generic]
_A = TypeVar("_A", bound=NDArray[np.generic])

MIN_SIDE = 2
# 8192 x 8192 (67 megapixels): above a 48-megapixel phone photo, below Pillow's own
# decompression-bomb warning (~89 megapixels). Every model shrinks its input far below this;
# a larger image only costs minutes and gigabytes in the perturbations.
MAX_IMAGE_PIXELS = 8192 * 8192
_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _gray16_to_rgb(img: Image.Image) -> NDArray[np.uint8]:
    """16/32-bit integer grayscale: values clipped to 0-65535, scaled to 0-255."""
    values = np.asarray(img).astype(np.float64)
    gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _pil_to_rgb(img: Image.Image) -> NDArray[np.uint8]:
    if img.mode in _WIDE_GRAY:
        return _gray16_to_rgb(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _too_large(name: str, width: int, height: int, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"{name} is {width}x{height} = {width * height} pixels; the "
                              f"limit is {max_pixels} pixels")


def _decode(file: IO[bytes], *, max_pixels: int, name: str,
            formats: Sequence[str] | None) -> NDArray[np.uint8]:
    """Open ``file``, check its header's pixel count, then decode and orient it."""
    try:
        with warnings.catch_warnings():
            # Our own limit is checked below; Pillow's warning would only reach stderr raw.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(file, formats=None if formats is None else list(formats))
    except Image.DecompressionBombError as exc:
        # Pillow refuses past twice its own MAX_IMAGE_PIXELS before telling the size.
        cap = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = min(max_pixels, cap) if cap else max_pixels
        source = "" if limit == max_pixels else " (Pillow's own cap)"
        raise ImageTooLargeError(f"{name} has more than {limit} pixels; the limit is "
                                 f"{limit} pixels{source}") from exc
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise _too_large(name, width, height, max_pixels)
        img.load()
        upright = ImageOps.exif_transpose(img)
        return _pil_to_rgb(upright)


def decode_image_bytes(data: bytes | memoryview, *, max_pixels: int = MAX_IMAGE_PIXELS,
                       name: str = "image", formats: Sequence[str] | None = None) \
        -> NDArray[np.uint8]:
    """Decode an image file held in memory to an ``H x W x 3`` ``uint8`` RGB array.

    ``formats`` limits the Pillow formats tried (e.g. ``["PNG", "JPEG"]``). Raises
    :class:`ImageTooLargeError` for more than ``max_pixels`` pixels (from the header, before
    decoding) and :class:`ImageError` for anything unreadable or too small.
    """
    try:
        array = _decode(io.BytesIO(data), max_pixels=max_pixels, name=name, formats=formats)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name} cannot be decoded: {exc}") from exc
    return _check_size(array, name)


def _check_regular_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ImageError(f"image file not found: {path}") from exc
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise ImageError(f"image {path} is a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise ImageError(f"image {path} is not a regular file (a device, pipe or socket); "
                         "save the image to a file first")


def load_image(source: str | os.PathLike[str], *,
               max_pixels: int = MAX_IMAGE_PIXELS,
               content: bytes | None = None) -> NDArray[np.uint8]:
    """Read an image file as an ``H x W x 3`` ``uint8`` RGB array, upright (EXIF orientation
    applied).

    ``content``: the file's bytes, read elsewhere (on another machine); ``source`` then
    only names the file in messages, which are the same as for the file. Raises
    :class:`ImageTooLargeError` for more than ``max_pixels`` pixels (read from the header,
    before decoding), and :class:`ImageError` for a missing or unreadable file, a
    directory or device, or an image under 2x2 pixels.
    """
    path = Path(source)
    if content is None:
        _check_regular_file(path)
    try:
        with (path.open("rb") if content is None else io.BytesIO(content)) as file:
            array = _decode(file, max_pixels=max_pixels, name=f"image {path}", formats=None)
    except UnidentifiedImageError as exc:  # (its text names a file object, not the file)
        raise ImageError(f"cannot read image {path}: not an image file Pillow can "
                         "decode (PNG, JPEG, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"cannot read image {path}: {exc}") from exc
    return _check_size(array, str(path))


def _check_size(array: _A, name: str) -> _A:
    h, w = array.shape[:2]
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"image {name} is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} needed")
    return array


def to_rgb_array(image: ImageInput) -> NDArray[np.uint8] | NDArray[np.float32]:
    """Convert a path, PIL image or array to an ``H x W x 3`` RGB array.

    ``uint8`` arrays are returned as they are; other numeric arrays become ``float32``
    on the 0-255 scale (values are not rescaled). A 2-D array is taken as grayscale and
    an ``H x W x 4`` array as RGBA with its alpha dropped.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _check_size(_pil_to_rgb(image), "given")
    if not isinstance(image, np.ndarray):
        raise ImageError(
            f"image must be a path, a PIL image or an H x W x 3 array, got {type(image).__name__}"
        )
    array = image
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"image array must have shape H x W x 3, got {image.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ImageError(f"image array must be numeric, got dtype {array.dtype}")
    _check_size(array, f"array {image.shape}")
    if array.dtype == np.uint8:
        return array  # type: ignore[return-value]
    out = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise ImageError("image array contains NaN or infinite values")
    return out  # type: ignore[return-value]

"""Image input at the edges: paths, PIL images and arrays become ``H x W x 3`` RGB arrays.

Arrays are ``uint8`` or ``float32`` on the 0-255 scale. Grayscale, palette and other PIL
modes are converted to RGB; transparent images (RGBA, LA, palette with transparency) are
composited on white first.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from blackbox_vqa.errors import ImageError

__all__ = ["ImageInput", "load_image", "to_rgb_array"]

ImageInput = str | os.PathLike[str] | Image.Image | NDArray[np.generic]
_A = TypeVar("_A", bound=NDArray[np.generic])

MIN_SIDE = 2


def _pil_to_rgb(img: Image.Image) -> NDArray[np.uint8]:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(
    source: str | os.PathLike[str], *, content: bytes | None = None
) -> NDArray[np.uint8]:
    """Read an image file as an ``H x W x 3`` ``uint8`` RGB array.

    ``content``: the file's bytes, read elsewhere (on another machine); ``source`` then
    only names the file in messages. Raises :class:`ImageError` for a missing, unreadable
    or too small image.
    """
    path = Path(source)
    if content is None and not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path if content is None else io.BytesIO(content)) as img:
            img.load()
            array = _pil_to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
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

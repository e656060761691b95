"""The wire protocol ``blackbox_vqa.http/1``: paths, image encodings and answer digests.

Images travel as base64 text of one of three files, told apart by their first bytes:

- PNG (lossless; decoded to ``uint8``),
- JPEG (lossy; decoded to ``uint8``),
- NumPy ``.npy`` of an ``H x W x 3`` array of ``uint8`` or ``float32`` on the 0-255 scale
  (decoded to exactly that array, so perturbed float images cross the wire bit for bit).

This module needs neither FastAPI nor httpx: the server and the HTTP adapter share it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from blackbox_vqa.errors import ImageError
from blackbox_vqa.images import to_rgb_array

__all__ = [
    "ANSWER_PROBS_PATH",
    "HEALTH_PATH",
    "IMAGE_ENCODINGS",
    "INFO_PATH",
    "NPY_DTYPES",
    "PROTOCOL",
    "ImageTooLargeError",
    "answers_digest",
    "decode_image",
    "encode_image",
    "npy_bytes",
    "png_bytes",
]

PROTOCOL = "blackbox_vqa.http/1"
INFO_PATH = "/v1/info"
HEALTH_PATH = "/v1/health"
ANSWER_PROBS_PATH = "/v1/answer_probs"
IMAGE_ENCODINGS = ("png", "jpeg", "npy")
NPY_DTYPES = ("uint8", "float32")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 4096


class ImageTooLargeError(ImageError):
    """An image has more pixels than the server accepts."""


def answers_digest(answers: Sequence[str]) -> str:
    """SHA-256 (hex) of the answers joined by ``"\\n"`` and encoded as UTF-8."""
    return hashlib.sha256("\n".join(answers).encode("utf-8")).hexdigest()


def png_bytes(image: NDArray[Any]) -> bytes:
    """A PNG file of an ``H x W x 3`` image; float pixels are rounded and clipped to 0-255."""
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(
        buffer, format="PNG", compress_level=1
    )
    return buffer.getvalue()


def npy_bytes(image: NDArray[Any]) -> bytes:
    """A ``.npy`` file holding ``image`` exactly (C order, no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()


def encode_image(image: NDArray[Any], *, npy: bool = True) -> str:
    """Base64 text of an RGB array: PNG for ``uint8``, ``.npy`` for anything else.

    With ``npy=False`` (a server that does not read ``.npy``) every image goes as PNG, float
    pixels rounded to the nearest integer.
    """
    data = npy_bytes(image) if npy and image.dtype != np.uint8 else png_bytes(image)
    return base64.b64encode(data).decode("ascii")


def _check_pixels(height: int, width: int, max_pixels: int, name: str) -> None:
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _decode_pil(data: bytes, max_pixels: int, name: str) -> NDArray[Any]:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as img:
            _check_pixels(img.height, img.width, max_pixels, name)
            img.load()
            return to_rgb_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name} cannot be decoded: {exc}") from exc


def _decode_npy(data: bytes, max_pixels: int, name: str) -> NDArray[Any]:
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(buffer, max_header_size=_NPY_MAX_HEADER)
        else:
            header = np.lib.format.read_array_header_2_0(buffer, max_header_size=_NPY_MAX_HEADER)
    except (ValueError, OSError, SyntaxError) as exc:
        raise ImageError(f"{name} is not a readable .npy file: {exc}") from exc
    shape, fortran, dtype = header
    if dtype.kind not in "uf" or dtype.name not in NPY_DTYPES:
        raise ImageError(f"{name} has dtype {dtype}; .npy images must be uint8 or float32")
    if len(shape) != 3 or shape[2] != 3:
        raise ImageError(f"{name} has shape {shape}; .npy images must be H x W x 3")
    _check_pixels(int(shape[0]), int(shape[1]), max_pixels, name)
    count = int(np.prod(shape))
    body = data[buffer.tell():]
    if len(body) != count * dtype.itemsize:
        raise ImageError(
            f"{name} holds {len(body)} bytes of pixels; shape {shape} of {dtype} needs "
            f"{count * dtype.itemsize}"
        )
    flat = np.frombuffer(body, dtype=dtype, count=count)
    array = flat.reshape(shape, order="F" if fortran else "C")
    native = np.array(array, dtype=dtype.newbyteorder("="), order="C")
    return to_rgb_array(native)


def decode_image(text: str, *, max_pixels: int, name: str = "image") -> NDArray[Any]:
    """Decode base64 PNG/JPEG (to ``uint8``) or ``.npy`` (to its own dtype), ``H x W x 3``.

    A ``data:...;base64,`` prefix is allowed. Raises :class:`ImageTooLargeError` when the
    image has more than ``max_pixels`` pixels (checked before the pixels are decoded) and
    :class:`ImageError` for anything unreadable.
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{name} is not valid base64: {exc}") from exc
    if data.startswith(_NPY_MAGIC):
        return _decode_npy(data, max_pixels, name)
    if data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        return _decode_pil(data, max_pixels, name)
    raise ImageError(f"{name} is neither PNG, JPEG nor .npy (first bytes {data[:8]!r})")

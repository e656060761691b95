"""The wire protocol ``blackbox_vqa.http/1``: paths, image files, batches, answer digests.

An image travels as one of three files, told apart by their first bytes:

- PNG (lossless; decoded to ``uint8``),
- JPEG (lossy; decoded to ``uint8``),
- NumPy ``.npy`` of an ``H x W x 3`` array of ``uint8`` or ``float32`` on the 0-255 scale
  (decoded to exactly that array, so perturbed float images cross the wire bit for bit).

A batch is JSON with each file as base64 text, or (when the server lists ``binary`` in
its request formats) a binary batch: one line of JSON naming each question and its file's
length, a newline, then the files back to back -- no base64 to encode or decode.

This module needs neither FastAPI nor httpx: the server and the HTTP adapter share it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from blackbox_vqa.errors import ImageError, ImageTooLargeError, InputError
from blackbox_vqa.images import MIN_SIDE, decode_image_bytes

__all__ = [
    "ANSWER_PROBS_PATH",
    "BINARY_CONTENT_TYPE",
    "HEALTH_PATH",
    "IMAGE_ENCODINGS",
    "INFO_PATH",
    "NPY_DTYPES",
    "PROTOCOL",
    "REQUEST_FORMATS",
    "BatchFormatError",
    "ImageTooLargeError",
    "answers_digest",
    "decode_image",
    "decode_image_file",
    "encode_binary_batch",
    "encode_image",
    "image_file",
    "npy_bytes",
    "png_bytes",
    "split_binary_batch",
]

PROTOCOL = "blackbox_vqa.http/1"
INFO_PATH = "/v1/info"
HEALTH_PATH = "/v1/health"
ANSWER_PROBS_PATH = "/v1/answer_probs"
IMAGE_ENCODINGS = ("png", "jpeg", "npy")
REQUEST_FORMATS = ("json", "binary")
BINARY_CONTENT_TYPE = "application/vnd.blackbox-vqa.batch"
NPY_DTYPES = ("uint8", "float32")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 4096

Buffer = bytes | memoryview


class BatchFormatError(InputError):
    """A binary batch body that does not follow the format."""


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


def image_file(image: NDArray[Any], *, npy: bool = True) -> bytes:
    """The file an RGB array travels as: PNG for ``uint8``, ``.npy`` for anything else.

    With ``npy=False`` (a server that does not read ``.npy``) every image goes as PNG, float
    pixels rounded to the nearest integer.
    """
    return npy_bytes(image) if npy and image.dtype != np.uint8 else png_bytes(image)


def encode_image(image: NDArray[Any], *, npy: bool = True) -> str:
    """Base64 text of :func:`image_file`."""
    return base64.b64encode(image_file(image, npy=npy)).decode("ascii")


def encode_binary_batch(files: Sequence[bytes], questions: Sequence[str]) -> bytes:
    """A binary batch body: a one-line JSON header, ``\n``, then the image files in order.

    The header is ``{"items": [{"question": ..., "image_bytes": <file length>}, ...]}``.
    """
    header = {"items": [{"question": q, "image_bytes": len(f)}
                        for f, q in zip(files, questions, strict=True)]}
    return b"".join([json.dumps(header).encode("utf-8"), b"\n", *files])


def split_binary_batch(body: bytes) -> tuple[bytes, list[memoryview]]:
    """Split a binary batch body into its JSON header and its files (no copies).

    The lengths come from the header's ``image_bytes``; raises :class:`BatchFormatError`
    when the body does not add up.
    """
    newline = body.find(b"\n")
    if newline < 0:
        raise BatchFormatError("binary batch has no header line (JSON, then a newline)")
    header = body[:newline]
    try:
        data = json.loads(header)
        lengths = [item["image_bytes"] for item in data["items"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BatchFormatError(f"binary batch header is not the expected JSON: {exc}") from exc
    except RecursionError as exc:
        raise BatchFormatError("binary batch header is JSON nested too deeply") from exc
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise BatchFormatError("binary batch header: every image_bytes must be an integer >= 0")
    view = memoryview(body)[newline + 1:]
    if sum(lengths) != len(view):
        raise BatchFormatError(f"binary batch header announces {sum(lengths)} bytes of images; "
                               f"the body holds {len(view)}")
    files = []
    offset = 0
    for length in lengths:
        files.append(view[offset:offset + length])
        offset += length
    return header, files


def _check_pixels(height: int, width: int, max_pixels: int, name: str) -> None:
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _decode_pil(data: Buffer, max_pixels: int, name: str) -> NDArray[Any]:
    return decode_image_bytes(data, max_pixels=max_pixels, name=name, formats=["PNG", "JPEG"])


@functools.lru_cache(maxsize=64)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Shape, Fortran order, dtype and data offset of a ``.npy`` file starting ``prefix``.

    Cached: a run sends many images of one shape, and the header is parsed by ``ast``.
    """
    buffer = io.BytesIO(prefix)
    version = np.lib.format.read_magic(buffer)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(buffer, max_header_size=_NPY_MAX_HEADER)
    else:
        header = np.lib.format.read_array_header_2_0(buffer, max_header_size=_NPY_MAX_HEADER)
    shape, fortran, dtype = header
    return tuple(int(v) for v in shape), bool(fortran), dtype, buffer.tell()


def _header_prefix(data: Buffer) -> bytes:
    """The magic, length field and header of a ``.npy`` file (version 1 or 2)."""
    if len(data) < 10:
        return bytes(data)
    if data[6] == 1:
        return bytes(data[: 10 + int.from_bytes(data[8:10], "little")])
    return bytes(data[: 12 + int.from_bytes(data[8:12], "little")])


def _decode_npy(data: Buffer, max_pixels: int, name: str) -> NDArray[Any]:
    try:
        shape, fortran, dtype, offset = _npy_header(_header_prefix(data))
    except (ValueError, OSError, SyntaxError, EOFError, RecursionError, MemoryError) as exc:
        raise ImageError(f"{name} is not a readable .npy file: {exc}") from exc
    if dtype.kind not in "uf" or dtype.name not in NPY_DTYPES:
        raise ImageError(f"{name} has dtype {dtype}; .npy images must be uint8 or float32")
    if len(shape) != 3 or shape[2] != 3 or min(shape) < 0:
        raise ImageError(f"{name} has shape {shape}; .npy images must be H x W x 3")
    _check_pixels(shape[0], shape[1], max_pixels, name)
    count = shape[0] * shape[1] * 3
    if len(data) - offset != count * dtype.itemsize:
        raise ImageError(
            f"{name} holds {len(data) - offset} bytes of pixels; shape {shape} of {dtype} "
            f"needs {count * dtype.itemsize}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = np.array(flat.reshape(shape, order="F" if fortran else "C"),
                     dtype=dtype.newbyteorder("="), order="C")
    if min(shape[0], shape[1]) < MIN_SIDE:
        raise ImageError(f"{name} is {shape[1]}x{shape[0]} pixels; at least "
                         f"{MIN_SIDE}x{MIN_SIDE} needed")
    if array.dtype == np.float32 and not np.isfinite(array).all():
        raise ImageError(f"{name} contains NaN or infinite values")
    return array


def decode_image_file(data: Buffer, *, max_pixels: int, name: str = "image") \
        -> NDArray[Any]:
    """Decode a PNG/JPEG (to ``uint8``) or ``.npy`` file (to its own dtype), ``H x W x 3``.

    Raises :class:`ImageTooLargeError` when the image has more than ``max_pixels`` pixels
    (checked before the pixels are decoded) and :class:`ImageError` for anything unreadable.
    """
    magic = bytes(data[:8])
    if magic.startswith(_NPY_MAGIC):
        return _decode_npy(data, max_pixels, name)
    if magic.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        return _decode_pil(data, max_pixels, name)
    raise ImageError(f"{name} is neither PNG, JPEG nor .npy (first bytes {magic!r})")


def decode_image(text: str, *, max_pixels: int, name: str = "image") -> NDArray[Any]:
    """Decode base64 text of an image file (see :func:`decode_image_file`).

    A ``data:...;base64,`` prefix is allowed.
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{name} is not valid base64: {exc}") from exc
    return decode_image_file(data, max_pixels=max_pixels, name=name)

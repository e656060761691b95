"""Heat maps blended over an image, colour bars, and PNG data URIs for the HTML report.

Pure image arithmetic with Matplotlib's colour maps (no figures, no pyplot): a map is
expanded to the image's pixels (:func:`blackbox_vqa.report.figures.pixel_map`), coloured
on a given scale ``[vmin, vmax]`` and blended over the image; the result is resized for
display (nearest neighbour when enlarging, so cells stay sharp).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from numpy.typing import NDArray
from PIL import Image

from blackbox_vqa.errors import InputError
from blackbox_vqa.report.figures import pixel_map

__all__ = [
    "ColourScale",
    "colour_bar_png",
    "display_size",
    "heatmap_png",
    "image_png",
    "png_data_uri",
    "shared_scale",
]

MIN_SIDE = 160
MAX_SIDE = 320


@dataclass(frozen=True)
class ColourScale:
    """A colour scale shared by several maps: values ``vmin..vmax`` through ``cmap``."""

    vmin: float
    vmax: float
    cmap: str

    def colours(self, values: NDArray[np.floating[Any]]) -> NDArray[np.uint8]:
        """RGB ``uint8`` colours ``[..., 3]`` of ``values`` (clipped to the scale)."""
        span = self.vmax - self.vmin
        unit = (np.asarray(values, dtype=np.float64) - self.vmin) / (span if span > 0 else 1.0)
        rgba = colormaps[self.cmap](np.clip(unit, 0.0, 1.0))
        return np.round(np.asarray(rgba)[..., :3] * 255.0).astype(np.uint8)


def shared_scale(maps: Sequence[NDArray[np.floating[Any]]], *, signed: bool) -> ColourScale:
    """One scale for all ``maps``: ``±max|v|`` on a diverging map when ``signed``, else
    ``0..max`` on a white-to-red map (a zero or empty set gets a tiny positive bound)."""
    bound = max((float(np.max(np.abs(m))) for m in maps if np.asarray(m).size), default=0.0)
    bound = bound if bound > 0 else 1e-12
    if signed:
        return ColourScale(-bound, bound, "RdBu_r")
    return ColourScale(0.0, bound, "Reds")


def display_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` to show an image at: small ones enlarged by a whole factor to at
    least ``MIN_SIDE`` on their long side, large ones shrunk to ``MAX_SIDE``."""
    side = max(height, width)
    if side < MIN_SIDE:
        factor = -(-MIN_SIDE // side)
        return height * factor, width * factor
    if side > MAX_SIDE:
        scale = MAX_SIDE / side
        return max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


def _rgb(image: NDArray[Any]) -> NDArray[np.uint8]:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"image must be an H x W x 3 array, got shape {array.shape}")
    return np.clip(np.round(array.astype(np.float64)), 0, 255).astype(np.uint8)


def _resized(pixels: NDArray[np.uint8]) -> Image.Image:
    picture = Image.fromarray(pixels)
    height, width = display_size(pixels.shape[0], pixels.shape[1])
    if (height, width) == pixels.shape[:2]:
        return picture
    enlarging = height > pixels.shape[0]
    resample = Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS
    return picture.resize((width, height), resample=resample)


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def image_png(image: NDArray[Any]) -> bytes:
    """The image ``H x W x 3`` (0-255) as a PNG at display size."""
    return _png(_resized(_rgb(image)))


def heatmap_png(
    image: NDArray[Any],
    image_map: NDArray[np.floating[Any]],
    scale: ColourScale,
    *,
    alpha: float = 0.6,
) -> bytes:
    """The map coloured on ``scale`` and blended over the image (``alpha`` = map's weight),
    as a PNG at display size. The map may be a ``grid x grid`` lattice or any 2-D map."""
    pixels = _rgb(image)
    values = np.asarray(image_map, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise InputError(f"image map must be a non-empty 2-D array, got shape {values.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha!r}")
    spread = pixel_map(values, pixels.shape[0], pixels.shape[1])
    blended = (1.0 - alpha) * pixels + alpha * scale.colours(spread)
    return _png(_resized(np.round(blended).astype(np.uint8)))


def colour_bar_png(scale: ColourScale, *, width: int = 256, height: int = 14) -> bytes:
    """A horizontal gradient from ``scale.vmin`` (left) to ``scale.vmax`` (right)."""
    row = scale.colours(np.linspace(scale.vmin, scale.vmax, width))
    return _png(Image.fromarray(np.repeat(row[None, :, :], height, axis=0)))


def png_data_uri(data: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

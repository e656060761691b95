"""Pure functions that build occlusion patches and perturbed images.

A *box* is ``(top, bottom, left, right)`` with exclusive ends, in pixels of the image as
given. Nothing here calls a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter

from blackbox_vqa.errors import InputError

__all__ = [
    "BASELINES",
    "IMAGENET_MEAN_RGB",
    "Box",
    "baseline_image",
    "cell_edges",
    "cell_index_map",
    "gaussian_blur",
    "grid_boxes",
    "occluded_batch",
    "occlusion_evaluations",
    "parse_baseline",
    "window_boxes",
    "window_map",
]

Box = tuple[int, int, int, int]

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
BASELINES = ("imagenet-mean", "black", "blur")


def cell_edges(size: int, grid: int) -> NDArray[np.int64]:
    """Edges ``floor(k * size / grid)`` for ``k = 0..grid``: cell ``k`` is ``[e[k], e[k+1])``."""
    if grid < 1:
        raise InputError(f"grid must be >= 1, got {grid}")
    if size < grid:
        raise InputError(f"an image side of {size} px cannot be split into a {grid}-cell grid")
    return (np.arange(grid + 1, dtype=np.int64) * size) // grid


def grid_boxes(height: int, width: int, grid: int) -> list[Box]:
    """The ``grid x grid`` cells as boxes, row-major, top row first."""
    rows, cols = cell_edges(height, grid), cell_edges(width, grid)
    return [
        (int(rows[r]), int(rows[r + 1]), int(cols[c]), int(cols[c + 1]))
        for r in range(grid)
        for c in range(grid)
    ]


def cell_index_map(height: int, width: int, grid: int) -> NDArray[np.int64]:
    """``H x W`` array giving each pixel's row-major cell index in the grid."""
    rows = np.searchsorted(cell_edges(height, grid), np.arange(height), side="right") - 1
    cols = np.searchsorted(cell_edges(width, grid), np.arange(width), side="right") - 1
    return rows[:, None] * grid + cols[None, :]


def _starts(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def window_boxes(
    height: int, width: int, window: tuple[int, int], stride: tuple[int, int]
) -> list[Box]:
    """Sliding ``window`` (h, w) boxes moved by ``stride`` (h, w), row-major.

    When the stride leaves the last rows or columns uncovered, one more window flush with
    that edge is added, so every pixel is covered at least once.
    """
    wh, ww = window
    sh, sw = stride
    if min(wh, ww, sh, sw) < 1:
        raise InputError(f"window and stride must be >= 1, got window={window} stride={stride}")
    if wh > height or ww > width:
        raise InputError(f"window {wh}x{ww} is larger than the image ({height}x{width})")
    return [
        (top, top + wh, left, left + ww)
        for top in _starts(height, wh, sh)
        for left in _starts(width, ww, sw)
    ]


def window_map(
    scores: NDArray[np.floating[Any]], boxes: Sequence[Box], height: int, width: int
) -> NDArray[np.float64]:
    """Per-pixel importance: the mean of the scores of the windows covering each pixel."""
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for score, (top, bottom, left, right) in zip(scores, boxes, strict=True):
        total[top:bottom, left:right] += score
        count[top:bottom, left:right] += 1.0
    return total / np.maximum(count, 1.0)


def occlusion_evaluations(
    height: int,
    width: int,
    words: int,
    *,
    grid: int = 16,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    image: bool = True,
) -> int:
    """How many inputs an occlusion explanation scores: the original, one per patch, one
    per word (``1 + 16*16 + words`` on the default grid, whatever the image size).

    With ``window`` (and ``stride``, default ``window``) the patches are the sliding windows
    of :func:`window_boxes` on an ``height x width`` image; ``image=False`` occludes words
    only. For an endpoint taking one input per request (``hf``, ``answer-only``,
    ``openai``) this is the number of requests at most: an input already answered (a cell
    that already has the fill colour) is not sent again.
    """
    if isinstance(words, bool) or not isinstance(words, int) or words < 0:
        raise InputError(f"words must be an integer >= 0, got {words!r}")
    patches = 0
    if image and window is not None:
        patches = len(window_boxes(height, width, window, stride or window))
    elif image:
        cell_edges(height, grid)
        cell_edges(width, grid)
        patches = grid * grid
    return 1 + patches + words


def parse_baseline(spec: str) -> str | tuple[float, float, float]:
    """``imagenet-mean``, ``black``, ``blur`` or ``"R,G,B"`` (0-255) -> name or RGB triple."""
    text = spec.strip().lower()
    if text in BASELINES:
        return text
    parts = text.split(",")
    try:
        rgb = tuple(float(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0.0 <= v <= 255.0 for v in rgb):
        raise InputError(
            f"baseline must be one of {', '.join(BASELINES)} or 'R,G,B' with values in 0-255, "
            f"got {spec!r}"
        )
    return rgb  # type: ignore[return-value]


def _blur_radius(sigma: float) -> int:
    """Kernel half-width in pixels: ``ceil(3 * sigma)``, at least 1."""
    return max(1, int(np.ceil(3.0 * sigma)))


def gaussian_blur(image: NDArray[Any], sigma: float) -> NDArray[np.float32]:
    """Gaussian blur of an ``H x W x C`` image, each channel alone; ``float32`` out.

    The kernel reaches ``ceil(3 * sigma)`` pixels (at least 1) each way and the edges are
    reflected with the edge pixel repeated (``d c b a | a b c d``), as scipy's ``reflect``.
    """
    if sigma <= 0:
        raise InputError(f"blur sigma must be > 0, got {sigma}")
    values = np.asarray(image, dtype=np.float64)
    spatial = min(values.ndim, 2)
    sigmas = (sigma,) * spatial + (0.0,) * (values.ndim - spatial)
    radii = (_blur_radius(sigma),) * spatial + (0,) * (values.ndim - spatial)
    blurred = gaussian_filter(values, sigma=sigmas, mode="reflect", radius=radii)
    return blurred.astype(np.float32)


def baseline_image(
    image: NDArray[Any], baseline: str | tuple[float, float, float], *, blur_sigma: float
) -> NDArray[np.float32]:
    """The ``H x W x 3`` ``float32`` image that patches are copied from."""
    if baseline == "blur":
        return gaussian_blur(image, blur_sigma)
    if baseline == "imagenet-mean":
        rgb: Sequence[float] = IMAGENET_MEAN_RGB
    elif baseline == "black":
        rgb = (0.0, 0.0, 0.0)
    elif isinstance(baseline, tuple):
        rgb = baseline
    else:
        raise InputError(f"unknown baseline {baseline!r}")
    return np.broadcast_to(np.asarray(rgb, dtype=np.float32), image.shape)


def occluded_batch(
    image: NDArray[Any], fill: NDArray[np.float32], boxes: Sequence[Box]
) -> NDArray[np.float32]:
    """One ``float32`` copy of ``image`` per box, the box's pixels taken from ``fill``."""
    batch = np.empty((len(boxes), *image.shape), dtype=np.float32)
    batch[...] = image
    for k, (top, bottom, left, right) in enumerate(boxes):
        batch[k, top:bottom, left:right] = fill[top:bottom, left:right]
    return batch

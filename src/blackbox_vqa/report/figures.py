"""PNG figures: a heat map over the image and a bar chart of word importances.

Figures are drawn with Matplotlib's object API (no pyplot state) and saved atomically.
Importances can be negative (occluding a patch can raise the answer's score), so maps use
a diverging colour scale centred on zero unless ``vmin``/``vmax`` are given.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray

from blackbox_vqa.explainers.masks import cell_index_map
from blackbox_vqa.outputs import atomic_write

__all__ = ["figure_png", "heatmap_figure", "pixel_map", "save_figure", "words_figure"]


def pixel_map(image_map: NDArray[np.floating[Any]], height: int, width: int) -> NDArray[np.float64]:
    """Expand a ``grid x grid`` map to ``height x width`` with the exact cell boundaries.

    A map already ``height x width`` is returned as it is; any other shape is resampled
    to nearest cells (used for gradient maps at the model's resolution).
    """
    values = np.asarray(image_map, dtype=np.float64)
    if values.shape == (height, width):
        return values
    gh, gw = values.shape
    if gh == gw and height >= gh and width >= gw:
        return values.reshape(-1)[cell_index_map(height, width, gh)]
    rows = (np.arange(height) * gh) // height
    cols = (np.arange(width) * gw) // width
    return values[rows[:, None], cols[None, :]]


def _limits(
    values: NDArray[np.float64], vmin: float | None, vmax: float | None
) -> tuple[float, float]:
    if vmin is not None and vmax is not None:
        return vmin, vmax
    bound = float(np.max(np.abs(values))) if values.size else 0.0
    bound = bound if bound > 0 else 1e-12
    return -bound, bound


def heatmap_figure(
    image: NDArray[Any],
    image_map: NDArray[np.floating[Any]],
    *,
    title: str,
    label: str = "p(a | original) - p(a | occluded)",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "RdBu_r",
) -> Figure:
    """The image, and the map over it, side by side with a colour bar."""
    height, width = image.shape[:2]
    values = pixel_map(image_map, height, width)
    lo, hi = _limits(values, vmin, vmax)
    fig = Figure(figsize=(8.4, 4.2), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    shown = np.clip(image, 0, 255).astype(np.uint8)
    left.imshow(shown, interpolation="nearest")
    left.set_title("image")
    # A grey copy under the map, so the map's colours are not mixed with the image's.
    grey = shown.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    right.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    overlay = right.imshow(values, cmap=cmap, vmin=lo, vmax=hi, alpha=0.7,
                           interpolation="nearest")
    right.set_title(title)
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])
    bar = fig.colorbar(overlay, ax=right, fraction=0.046, pad=0.04)
    bar.set_label(label)
    return fig


def words_figure(
    words: Sequence[str],
    scores: NDArray[np.floating[Any]],
    *,
    title: str,
    label: str = "p(a | question) - p(a | word dropped)",
) -> Figure:
    """Horizontal bars, one per word in question order; positive red, negative blue."""
    values = np.asarray(scores, dtype=np.float64)
    fig = Figure(figsize=(6.4, 0.45 * max(len(words), 2) + 1.2), dpi=100, layout="constrained")
    axis = fig.subplots()
    positions = np.arange(len(words))
    colours = ["#c0392b" if v >= 0 else "#2e6da4" for v in values]
    axis.barh(positions, values, color=colours)
    axis.set_yticks(positions, labels=[f"{i}: {w}" for i, w in enumerate(words)])
    axis.invert_yaxis()
    axis.axvline(0.0, color="black", linewidth=0.8)
    for pos, value in zip(positions, values, strict=True):
        axis.annotate(f"{value:+.3f}", (value, pos), xytext=(3 if value >= 0 else -3, 0),
                      textcoords="offset points", va="center",
                      ha="left" if value >= 0 else "right", fontsize=8)
    bound = float(np.max(np.abs(values))) if values.size else 0.0
    bound = bound * 1.35 if bound > 0 else 1.0
    axis.set_xlim(-bound, bound)
    axis.set_xlabel(label)
    axis.set_title(title)
    return fig


def deletion_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], *, title: str) \
        -> Figure:
    """Mean deletion (solid) and insertion (dashed) curves per method, each beside its
    random order's (dotted), over the fraction of the image removed or inserted."""
    fig = Figure(figsize=(9.6, 4.2), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    for axis, kind in ((left, "deletion"), (right, "insertion")):
        for k, (method, found) in enumerate(curves.items()):
            colour = f"C{k}"
            for name, style in ((kind, "-"), (f"random_{kind}", ":")):
                if name in found:
                    values = np.asarray(found[name], dtype=np.float64)
                    axis.plot(np.linspace(0, 1, values.size), values, style, color=colour,
                              label=method if style == "-" else f"{method} (random)")
        axis.set_xlabel(f"fraction of the image {'removed' if kind == 'deletion' else 'inserted'}")
        axis.set_ylabel("score of the answer")
        axis.set_title(f"{kind} ({title})")
        axis.legend(fontsize=7)
    return fig


def sanity_figure(per_layer: Mapping[str, Sequence[float | None]], *, title: str) -> Figure:
    """Mean rank correlation with the original map after each randomised layer."""
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    axis = fig.subplots()
    for method, values in per_layer.items():
        ys = [np.nan if v is None else v for v in values]
        axis.plot(np.arange(1, len(ys) + 1), ys, marker="o", label=method)
    axis.axhline(0.5, color="black", linestyle="dotted", linewidth=1.0, label="threshold")
    axis.set_xlabel("layers randomised (from the output down)")
    axis.set_ylabel("Spearman rank correlation of |map|")
    axis.set_ylim(-0.2, 1.05)
    axis.set_title(title)
    axis.legend(fontsize=8)
    return fig


def figure_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` to PNG and write it atomically."""
    data = figure_png(fig)
    return atomic_write(path, lambda f: f.write(data))

"""Image maps against human attention (Das et al. 2016, as Goyal et al. use it).

Protocol: take ``|map|``; resize it and the human map to ``14 x 14`` by area averaging
(each output cell is the mean of the input over the cell's area, fractional pixels
weighted by their overlap); rank the 196 values of each (ties get their average rank) and
take the Pearson correlation of the ranks (Spearman's rho). Over a set: mean +- standard
error (``std(ddof=1) / sqrt(n)``). A uniform random map gives the chance level; the mean
correlation between pairs of human maps of one question gives inter-human agreement.

All functions are pure; a constant map has no ranking, so its correlation is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import rankdata, spearmanr

from blackbox_vqa.errors import InputError

__all__ = [
    "MAP_SIZE",
    "Estimate",
    "area_resize",
    "inter_human_agreement",
    "map_correlation",
    "mean_sem",
    "prepare_map",
    "random_map",
    "rank_average",
    "spearman",
]

MAP_SIZE = 14
# Resized values equal to this many decimals of the map's largest |value| count as ties,
# so round-off in the resizing cannot split a tie (e.g. two cells half covered by a shape).
_TIE_DECIMALS = 10


@dataclass(frozen=True)
class Estimate:
    """Mean +- standard error over ``n`` finite values (``undefined`` NaN values left out)."""

    mean: float
    sem: float
    n: int
    undefined: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None)."""
        return {"mean": _finite(self.mean), "sem": _finite(self.sem), "n": self.n,
                "undefined": self.undefined}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _area_weights(n_in: int, n_out: int) -> NDArray[np.float64]:
    """``[n_out, n_in]``: share of output cell ``i`` covered by input pixel ``j``."""
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    pixels = np.arange(n_in, dtype=np.float64)
    low = np.maximum(edges[:-1, None], pixels[None, :])
    high = np.minimum(edges[1:, None], pixels[None, :] + 1.0)
    overlap = np.clip(high - low, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def area_resize(
    values: NDArray[Any], size: int | tuple[int, int] = MAP_SIZE
) -> NDArray[np.float64]:
    """Resize a 2-D map to ``size`` (``(rows, cols)`` or one int) by area averaging."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or min(array.shape) < 1:
        raise InputError(f"a map must be a non-empty 2-D array, got shape {array.shape}")
    rows, cols = (size, size) if isinstance(size, int) else size
    if rows < 1 or cols < 1:
        raise InputError(f"map size must be positive, got {size!r}")
    if not np.isfinite(array).all():
        raise InputError("a map contains NaN or infinite values")
    return _area_weights(array.shape[0], rows) @ array @ _area_weights(array.shape[1], cols).T


def prepare_map(
    values: NDArray[Any], size: int | tuple[int, int] = MAP_SIZE
) -> NDArray[np.float64]:
    """Area-resize to ``size`` and round to ties at 10 decimals of the largest |value|."""
    resized = area_resize(values, size)
    scale = float(np.max(np.abs(resized)))
    if scale == 0.0:
        return resized
    return np.round(resized / scale, _TIE_DECIMALS) * scale


def rank_average(values: NDArray[Any]) -> NDArray[np.float64]:
    """Ranks ``1..n`` of the flattened ``values``; tied values share their average rank."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.asarray(rankdata(flat, method="average"), dtype=np.float64)


def spearman(a: NDArray[Any], b: NDArray[Any]) -> float:
    """Spearman's rho of two equal-size arrays (flattened); NaN when either is constant."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise InputError(f"maps to correlate have {x.size} and {y.size} values")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan  # no ranking; scipy would warn before giving NaN
    return float(spearmanr(x, y).statistic)


def map_correlation(
    explanation: NDArray[Any], human: NDArray[Any], *, size: int = MAP_SIZE
) -> float:
    """Rank correlation of ``|explanation|`` with ``human``, both resized to ``size x size``."""
    return spearman(prepare_map(np.abs(np.asarray(explanation, dtype=np.float64)), size),
                    prepare_map(human, size))


def random_map(rng: np.random.Generator, size: int = MAP_SIZE) -> NDArray[np.float64]:
    """A ``size x size`` map of independent uniform values: the chance-level baseline."""
    return rng.random((size, size))


def inter_human_agreement(maps: Sequence[NDArray[Any]], *, size: int = MAP_SIZE) -> float:
    """Mean rank correlation over all pairs of human maps of one question (NaN if < 2)."""
    prepared = [prepare_map(m, size) for m in maps]
    values = [spearman(a, b) for a, b in combinations(prepared, 2)]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def mean_sem(values: Iterable[float]) -> Estimate:
    """Mean and standard error ``s / sqrt(n)`` (``s`` with ``ddof=1``) of the finite values."""
    array = np.asarray(list(values), dtype=np.float64)
    finite = array[np.isfinite(array)]
    n = int(finite.size)
    undefined = int(array.size - n)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, undefined)
    mean = float(finite.mean())
    sem = float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate(mean, sem, n, undefined)

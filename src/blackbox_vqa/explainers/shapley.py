"""Shapley values by permutations, and the modality share: the pure maths of MM-SHAP.

Players are numbered ``0 .. n-1``; a coalition is a ``bool [n]`` mask or a Python int
bitmask (bit ``k`` = player ``k``). A permutation's marginal contributions
``v(prefix + i) - v(prefix)`` telescope to ``v(all) - v(none)``. Nothing here calls a
model (:mod:`blackbox_vqa.explainers.modality_share` does).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError

__all__ = [
    "EXHAUSTIVE_MAX_PLAYERS",
    "SAMPLINGS",
    "exact_shapley",
    "modality_share",
    "modality_share_evaluations",
    "permutation_marginals",
    "permutation_units",
    "prefix_masks",
    "t_shap_standard_error",
    "unit_estimate",
]

SAMPLINGS: tuple[str, ...] = ("antithetic", "plain", "exhaustive")
# n! permutations: 8 players are 40320 permutations over 256 coalitions.
EXHAUSTIVE_MAX_PLAYERS = 8

ValueFunction = Callable[[NDArray[np.bool_]], float]


def permutation_marginals(
    order: NDArray[np.int64], prefix_values: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Marginal contributions ``[n]`` of one permutation: player ``order[k]`` gets
    ``prefix_values[k + 1] - prefix_values[k]``, where ``prefix_values[k]`` (``[n + 1]``) is
    the value of the first ``k`` players of ``order``."""
    out = np.empty(order.size, dtype=np.float64)
    out[order] = np.diff(prefix_values)
    return out


def exact_shapley(value: ValueFunction, n: int) -> NDArray[np.float64]:
    """Shapley values ``[n]`` by the subset formula over all ``2**n`` coalitions:
    ``phi_i = sum_S |S|! (n - |S| - 1)! / n! (v(S + i) - v(S))``; ``value`` takes a
    ``bool [n]`` membership mask. For checks on small ``n`` (at most 16)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
        raise InputError(f"n must be an integer in [1, 16], got {n!r}")
    masks = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
    values = np.array([value(mask) for mask in masks], dtype=np.float64)
    sizes = masks.sum(axis=1)
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                       if s < n else 0.0 for s in sizes])
    phi = np.zeros(n, dtype=np.float64)
    index = np.arange(2**n)
    for i in range(n):
        without = ~masks[:, i]
        phi[i] = float(np.sum(weight[without] * (values[index[without] | (1 << i)]
                                                 - values[without])))
    return phi


def unit_estimate(units: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean ``[n]`` of the units' Shapley vectors ``[U, n]`` and its standard error
    (``std(ddof=1) / sqrt(U)``; NaN with one unit)."""
    values = np.asarray(units, dtype=np.float64)
    mean = values.mean(axis=0)
    if values.shape[0] < 2:
        return mean, np.full(values.shape[1], np.nan)
    return mean, values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])


def modality_share(phi: NDArray[np.float64], cells: int) -> tuple[float, float]:
    """``(T-SHAP, V-SHAP)`` of Shapley values ``phi`` whose first ``cells`` entries are image
    cells and the rest words; ``(nan, nan)`` when every value is 0."""
    values = np.abs(np.asarray(phi, dtype=np.float64))
    image, words = float(values[:cells].sum()), float(values[cells:].sum())
    total = image + words
    if total == 0.0:
        return math.nan, math.nan
    text = words / total
    return text, 1.0 - text


def t_shap_standard_error(units: NDArray[np.float64], cells: int) -> float:
    """Delta-method standard error of T-SHAP from the units' Shapley vectors ``[U, n]``:
    the s.e. of ``grad T(phi_mean) . phi_u`` over the units (NaN with one unit or when
    T-SHAP is undefined)."""
    values = np.asarray(units, dtype=np.float64)
    if values.shape[0] < 2:
        return math.nan
    phi = values.mean(axis=0)
    image, words = float(np.abs(phi[:cells]).sum()), float(np.abs(phi[cells:]).sum())
    total = image + words
    if total == 0.0:
        return math.nan
    gradient = np.sign(phi)
    gradient[:cells] *= -words / total**2
    gradient[cells:] *= image / total**2
    projected = values @ gradient
    return float(projected.std(ddof=1) / math.sqrt(values.shape[0]))


def modality_share_evaluations(players: int, permutations: int, sampling: str) -> int:
    """Inputs scored at most: ``2 + permutations * (players - 1)`` (each permutation's
    inner prefixes, plus the whole input and the empty coalition), or ``2**players``
    when that is smaller (each coalition is scored once); exhaustive: ``2**players``."""
    if sampling == "exhaustive":
        return 2**players
    return min(2 + permutations * max(players - 1, 0), 2**players)


def permutation_units(players: int, permutations: int, sampling: str, seed: int) \
        -> Iterator[list[NDArray[np.int64]]]:
    """The permutations, one sampling unit (a list of orders) at a time: a permutation and
    its reverse (``"antithetic"``, ``permutations // 2`` units), one permutation
    (``"plain"``), or every permutation in lexicographic order (``"exhaustive"``)."""
    if sampling == "exhaustive":
        for walk in itertools.permutations(range(players)):
            yield [np.asarray(walk, dtype=np.int64)]
        return
    rng = np.random.default_rng(seed)
    if sampling == "antithetic":
        for _ in range(permutations // 2):
            order = rng.permutation(players).astype(np.int64)
            yield [order, order[::-1].copy()]
        return
    for _ in range(permutations):
        yield [rng.permutation(players).astype(np.int64)]


def prefix_masks(order: NDArray[np.int64]) -> list[int]:
    """The bitmasks of the ``n + 1`` prefixes of ``order`` (empty first, all last)."""
    masks, mask = [0], 0
    for player in order.tolist():
        mask |= 1 << player
        masks.append(mask)
    return masks

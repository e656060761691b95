"""Agreement between two explanations of the same image and question.

Image maps are compared the way the human-attention evaluation compares a map with a
human map, with its functions (:mod:`blackbox_vqa.evaluation.human_attention`): take
absolute values, resize both to ``14 x 14`` by area averaging, and rank the 196 values
(Spearman's rank correlation, ties given their average rank). Two more
measures: the overlap of the ``k`` most important cells, and whether the two explanations
pick the same most important word. All functions are pure; they never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.human_attention import MAP_SIZE, prepare_map, spearman

__all__ = [
    "EVAL_SIZE",
    "PairAgreement",
    "map_rank_correlation",
    "mean_ignoring_nan",
    "pair_agreement",
    "top_k_cells",
    "top_k_overlap",
    "top_word",
    "top_word_agreement",
]

EVAL_SIZE = MAP_SIZE
"""Side of the lattice maps are compared on (the human-attention protocol's 14 x 14)."""


def _image_map(values: ArrayLike, name: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"{name} must be a non-empty 2-D map, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{name} holds NaN or infinite values")
    return array


def _comparable(values: ArrayLike, name: str, size: int) -> NDArray[np.float64]:
    """``|values|`` resized to ``size x size`` as the human-attention evaluation does it."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"size must be a positive integer, got {size!r}")
    return prepare_map(np.abs(_image_map(values, name)), size)


def map_rank_correlation(a: ArrayLike, b: ArrayLike, *, size: int = EVAL_SIZE) -> float:
    """Spearman correlation of ``|a|`` and ``|b|``, each area-resized to ``size x size``.

    The maps may have different shapes (a 16 x 16 occlusion grid against a 224 x 224
    gradient map); ``nan`` when either resized map is constant.
    """
    return spearman(_comparable(a, "first map", size), _comparable(b, "second map", size))


def top_k_cells(values: ArrayLike, k: int, *, size: int = EVAL_SIZE) -> frozenset[int]:
    """Row-major indices of the ``k`` largest cells of ``|values|`` resized to ``size x size``.

    Ties are broken in row-major order (the earlier cell wins).
    """
    resized = _comparable(values, "map", size).reshape(-1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= resized.size:
        raise InputError(f"k must be an integer in [1, {resized.size}], got {k!r}")
    order = np.argsort(-resized, kind="stable")
    return frozenset(int(i) for i in order[:k])


def top_k_overlap(a: ArrayLike, b: ArrayLike, *, k: int = 10, size: int = EVAL_SIZE) -> float:
    """Share of the ``k`` most important cells two maps have in common, in ``[0, 1]``."""
    return len(top_k_cells(a, k, size=size) & top_k_cells(b, k, size=size)) / k


def top_word(word_map: ArrayLike) -> int:
    """Index of the most important word: the largest ``|importance|`` (first on ties)."""
    values = np.asarray(word_map, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise InputError("word map is empty: the question has no words")
    if not np.isfinite(values).all():
        raise InputError("word map holds NaN or infinite values")
    return int(np.argmax(np.abs(values)))


def top_word_agreement(a: ArrayLike, b: ArrayLike) -> bool:
    """Whether two word maps of the same question pick the same most important word."""
    left = np.asarray(a, dtype=np.float64).reshape(-1)
    right = np.asarray(b, dtype=np.float64).reshape(-1)
    if left.size != right.size:
        raise InputError(
            f"word maps of one question must have one value per word, got {left.size} "
            f"and {right.size}"
        )
    return top_word(left) == top_word(right)


@dataclass(frozen=True)
class PairAgreement:
    """How much two explanations agree.

    Attributes:
        rank_correlation: Spearman of the 14 x 14 ``|maps|`` in ``[-1, 1]``; ``nan`` when
            undefined (a constant map) or when either explanation has no image map.
        top_k_overlap: share of the ``k`` most important cells in common, ``[0, 1]``
            (``nan`` without image maps).
        k: the ``k`` used.
        same_top_word: whether the most important word is the same (``None`` without
            word maps).
    """

    rank_correlation: float
    top_k_overlap: float
    k: int
    same_top_word: bool | None


def _has_map(values: Any) -> bool:
    return values is not None and np.asarray(values).size > 0


def pair_agreement(
    image_a: ArrayLike | None,
    words_a: ArrayLike | None,
    image_b: ArrayLike | None,
    words_b: ArrayLike | None,
    *,
    k: int = 10,
    size: int = EVAL_SIZE,
) -> PairAgreement:
    """All three measures for two explanations; a missing or empty map gives ``nan``/None."""
    nan = float("nan")
    if _has_map(image_a) and _has_map(image_b):
        correlation = map_rank_correlation(image_a, image_b, size=size)  # type: ignore[arg-type]
        overlap = top_k_overlap(image_a, image_b, k=k, size=size)  # type: ignore[arg-type]
    else:
        correlation = overlap = nan
    same: bool | None = None
    if _has_map(words_a) and _has_map(words_b):
        same = top_word_agreement(words_a, words_b)  # type: ignore[arg-type]
    return PairAgreement(rank_correlation=correlation, top_k_overlap=overlap, k=k,
                         same_top_word=same)


def mean_ignoring_nan(values: Sequence[float]) -> float:
    """Mean of the finite values (``nan`` when there are none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")

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
    "top_word_set",
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


def _check_k(k: int, cells: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cells:
        raise InputError(f"k must be an integer in [1, {cells}], got {k!r}")


def top_k_cells(values: ArrayLike, k: int, *, size: int = EVAL_SIZE) -> frozenset[int]:
    """Row-major indices of the ``k`` largest cells of ``|values|`` resized to ``size x size``.

    Ties are broken in row-major order (the earlier cell wins).
    """
    resized = _comparable(values, "map", size).reshape(-1)
    _check_k(k, resized.size)
    order = np.argsort(-resized, kind="stable")
    return frozenset(int(i) for i in order[:k])


def top_k_overlap(a: ArrayLike, b: ArrayLike, *, k: int = 10, size: int = EVAL_SIZE) -> float:
    """Share of the ``k`` most important cells two maps have in common, in ``[0, 1]``.

    ``nan`` when either resized ``|map|`` is constant (it has no most important cells).
    """
    first, second = _comparable(a, "first map", size), _comparable(b, "second map", size)
    if float(np.ptp(first)) == 0.0 or float(np.ptp(second)) == 0.0:
        _check_k(k, first.size)
        return float("nan")
    return len(top_k_cells(first, k, size=size) & top_k_cells(second, k, size=size)) / k


def _word_map(values: ArrayLike) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise InputError("word map is empty: the question has no words")
    if not np.isfinite(array).all():
        raise InputError("word map holds NaN or infinite values")
    return array


def top_word_set(word_map: ArrayLike) -> frozenset[int]:
    """Indices of the most important words: those with the largest ``|importance|``
    (equal to 1e-12 of it, so exact ties all count); empty when every value is zero."""
    magnitude = np.abs(_word_map(word_map))
    largest = float(magnitude.max())
    if largest == 0.0:
        return frozenset()
    return frozenset(int(i) for i in np.flatnonzero(magnitude >= largest * (1 - 1e-12)))


def top_word(word_map: ArrayLike) -> int | None:
    """Index of the most important word (the first on ties); None when all are zero."""
    found = top_word_set(word_map)
    return min(found) if found else None


def top_word_agreement(a: ArrayLike, b: ArrayLike) -> bool | None:
    """Whether two word maps of one question share a most important word.

    With ties, any shared top word counts. None when either map is all zero (no word
    matters, so there is no most important one).
    """
    left, right = _word_map(a), _word_map(b)
    if left.size != right.size:
        raise InputError(
            f"word maps of one question must have one value per word, got {left.size} "
            f"and {right.size}"
        )
    top_left, top_right = top_word_set(left), top_word_set(right)
    if not top_left or not top_right:
        return None
    return bool(top_left & top_right)


@dataclass(frozen=True)
class PairAgreement:
    """How much two explanations agree.

    Attributes:
        rank_correlation: Spearman of the 14 x 14 ``|maps|`` in ``[-1, 1]``; ``nan`` when
            undefined (a constant map) or when either explanation has no image map.
        top_k_overlap: share of the ``k`` most important cells in common, ``[0, 1]``
            (``nan`` without image maps).
        k: the ``k`` used.
        same_top_word: whether the two share a most important word (None without word
            maps, when they have different lengths, or when one of them is all zero).
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
    """All three measures for two explanations; a missing or empty map gives ``nan``/None,
    and so do word maps of different lengths (tokenizers that split the question
    differently: their words cannot be matched)."""
    nan = float("nan")
    if _has_map(image_a) and _has_map(image_b):
        correlation = map_rank_correlation(image_a, image_b, size=size)  # type: ignore[arg-type]
        overlap = top_k_overlap(image_a, image_b, k=k, size=size)  # type: ignore[arg-type]
    else:
        correlation = overlap = nan
    same: bool | None = None
    if _has_map(words_a) and _has_map(words_b) and \
            np.asarray(words_a).size == np.asarray(words_b).size:
        same = top_word_agreement(words_a, words_b)  # type: ignore[arg-type]
    return PairAgreement(rank_correlation=correlation, top_k_overlap=overlap, k=k,
                         same_top_word=same)


def mean_ignoring_nan(values: Sequence[float]) -> float:
    """Mean of the finite values (``nan`` when there are none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")

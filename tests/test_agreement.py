"""Agreement measures against independent computations (scipy, block means, hand counts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.agreement import (
    map_rank_correlation,
    mean_ignoring_nan,
    pair_agreement,
    top_k_cells,
    top_k_overlap,
    top_word,
    top_word_agreement,
    top_word_set,
)


def block_resize(values: np.ndarray, size: int = 14) -> np.ndarray:
    """Area resize by another route: repeat every cell up to a common multiple of the
    sides, then average ``size x size`` blocks."""
    rows, cols = values.shape
    lcm_r, lcm_c = math.lcm(rows, size), math.lcm(cols, size)
    big = np.repeat(np.repeat(values, lcm_r // rows, axis=0), lcm_c // cols, axis=1)
    return big.reshape(size, lcm_r // size, size, lcm_c // size).mean(axis=(1, 3))


def scipy_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(block_resize(np.abs(a)).ravel(), block_resize(np.abs(b)).ravel())[0])


@pytest.mark.parametrize(("shape_a", "shape_b"), [((16, 16), (16, 16)), ((16, 16), (56, 56)),
                                                   ((7, 7), (28, 20)), ((14, 14), (15, 13))])
def test_rank_correlation_matches_scipy_on_independently_resized_maps(
    rng: np.random.Generator, shape_a: tuple[int, int], shape_b: tuple[int, int]
) -> None:
    a = rng.normal(size=shape_a)
    b = rng.normal(size=shape_b)
    assert map_rank_correlation(a, b) == pytest.approx(scipy_correlation(a, b), abs=1e-12)


def test_rank_correlation_with_ties_matches_scipy(rng: np.random.Generator) -> None:
    # Integer-valued maps at 28 x 28: 2 x 2 blocks average to many tied 14 x 14 values.
    a = rng.integers(-2, 3, size=(28, 28)).astype(float)
    b = rng.integers(0, 2, size=(28, 28)).astype(float)
    assert map_rank_correlation(a, b) == pytest.approx(scipy_correlation(a, b), abs=1e-12)


def test_rank_correlation_uses_absolute_values() -> None:
    base = np.arange(196, dtype=float).reshape(14, 14)
    assert map_rank_correlation(base, -base) == pytest.approx(1.0)
    assert map_rank_correlation(base, base.max() - base) == pytest.approx(-1.0)


def test_constant_map_has_no_correlation(rng: np.random.Generator) -> None:
    assert math.isnan(map_rank_correlation(np.full((16, 16), 0.3), rng.random((16, 16))))
    assert math.isnan(top_k_overlap(np.zeros((16, 16)), rng.random((16, 16))))


def test_top_k_cells_and_overlap_by_hand() -> None:
    a = np.zeros((14, 14))
    b = np.zeros((14, 14))
    a.flat[[0, 5, 17, 40, 100]] = [5, 4, 3, 2, 1]
    b.flat[[5, 40, 101, 150, 0]] = [-9, 8, 7, 6, 0.5]
    assert top_k_cells(a, 3) == {0, 5, 17}
    assert top_k_cells(b, 3) == {5, 40, 101}  # |values|
    # top 4: {0, 5, 17, 40} and {5, 40, 101, 150}: two in common.
    assert top_k_overlap(a, b, k=4) == pytest.approx(2 / 4)
    # top 5: {0, 5, 17, 40, 100} and {5, 40, 101, 150, 0}: three in common.
    assert top_k_overlap(a, b, k=5) == pytest.approx(3 / 5)


def test_top_k_works_on_the_resized_map() -> None:
    small = np.zeros((14, 14))
    small.flat[[3, 60, 195]] = [1.0, 2.0, 3.0]
    big = np.kron(small, np.ones((2, 2)))  # 28 x 28: every 2 x 2 block averages back
    assert top_k_cells(big, 3) == {3, 60, 195}
    assert top_k_overlap(big, small, k=3) == 1.0


def test_top_k_ties_break_in_row_major_order() -> None:
    values = np.zeros((14, 14))
    values.flat[[7, 30, 90]] = 1.0
    assert top_k_cells(values, 2) == {7, 30}


@pytest.mark.parametrize("k", [0, 197, 2.5, True])
def test_bad_k_is_refused(k: object) -> None:
    with pytest.raises(InputError, match="k must be an integer in \\[1, 196\\]"):
        top_k_overlap(np.eye(14), np.eye(14), k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((0, 3)), np.array([[np.nan, 1.0]])])
def test_bad_maps_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(InputError, match="map"):
        map_rank_correlation(bad, np.eye(4))


def test_top_word_by_hand() -> None:
    assert top_word([0.1, -0.5, 0.2]) == 1
    assert top_word([0.0, 0.0]) is None
    assert top_word_set([0.3, -0.3, 0.1]) == {0, 1}
    assert top_word_agreement([0.1, -0.5, 0.2], [0.3, 0.4, 0.0]) is True
    assert top_word_agreement([0.1, -0.5, 0.2], [0.9, 0.4, 0.0]) is False
    assert top_word_agreement([0.3, -0.3, 0.1], [0.0, 0.2, 0.0]) is True  # tie: shared
    assert top_word_agreement([0.0, 0.0, 0.0], [0.0, 0.2, 0.0]) is None  # nothing matters


def test_word_maps_must_match() -> None:
    with pytest.raises(InputError, match="one value per word, got 2 and 3"):
        top_word_agreement([1.0, 0.0], [1.0, 0.0, 0.0])
    with pytest.raises(InputError, match="empty"):
        top_word([])


def test_pair_agreement_combines_and_tolerates_missing_maps(rng: np.random.Generator) -> None:
    a, b = rng.random((16, 16)), rng.random((16, 16))
    found = pair_agreement(a, [0.5, 0.1], b, [0.4, 0.0], k=5)
    assert found.rank_correlation == pytest.approx(scipy_correlation(a, b), abs=1e-12)
    assert found.top_k_overlap == top_k_overlap(a, b, k=5)
    assert found.same_top_word is True and found.k == 5
    missing = pair_agreement(None, None, b, [0.4, 0.0])
    assert math.isnan(missing.rank_correlation) and math.isnan(missing.top_k_overlap)
    assert missing.same_top_word is None


def test_mean_ignoring_nan() -> None:
    assert mean_ignoring_nan([1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(mean_ignoring_nan([float("nan")]))


def test_pair_agreement_does_not_match_words_of_different_tokenizers() -> None:
    found = pair_agreement(np.eye(4), [0.5, 0.1], np.eye(4), [0.4, 0.0, 0.9])
    assert found.same_top_word is None

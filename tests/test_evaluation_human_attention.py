"""Rank correlation with human attention, checked against scipy and hand computations."""

from __future__ import annotations

import math
import warnings
from math import lcm

import numpy as np
import pytest
from scipy.stats import spearmanr

from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.human_attention import (
    area_resize,
    inter_human_agreement,
    map_correlation,
    mean_sem,
    random_map,
    rank_average,
    spearman,
)


def block_mean_resize(values: np.ndarray, size: int = 14) -> np.ndarray:
    """Area averaging by another route: repeat pixels up to a common multiple, then average
    equal blocks (exact for any sizes)."""
    rows, cols = values.shape
    up_r, up_c = lcm(rows, size), lcm(cols, size)
    big = np.repeat(np.repeat(values, up_r // rows, axis=0), up_c // cols, axis=1)
    return big.reshape(size, up_r // size, size, up_c // size).mean(axis=(1, 3))


@pytest.mark.parametrize("shape", [(16, 16), (64, 64), (5, 7), (14, 14), (33, 20)])
def test_area_resize_matches_block_means(shape: tuple[int, int], rng: np.random.Generator) -> None:
    values = rng.normal(size=shape)
    np.testing.assert_allclose(area_resize(values, 14), block_mean_resize(values), atol=1e-12)


def test_area_resize_keeps_the_mean_and_constants(rng: np.random.Generator) -> None:
    values = rng.random((64, 48))
    assert area_resize(values).mean() == pytest.approx(values.mean())
    np.testing.assert_allclose(area_resize(np.full((9, 31), 2.5)), np.full((14, 14), 2.5))


@pytest.mark.parametrize("shape", [(16, 16), (64, 64), (224, 224)])
def test_map_correlation_equals_scipy_on_independently_resized_maps(
    shape: tuple[int, int], rng: np.random.Generator
) -> None:
    for _ in range(5):
        explanation = rng.normal(size=shape)  # signed: the protocol takes |map|
        human = rng.random((64, 64))
        expected = spearmanr(block_mean_resize(np.abs(explanation)).ravel(),
                             block_mean_resize(human).ravel()).statistic
        assert map_correlation(explanation, human) == pytest.approx(expected, abs=1e-12)


def test_map_correlation_with_tied_binary_maps_equals_scipy() -> None:
    # A shape mask: many tied zeros and fractional edge cells after resizing.
    human = np.zeros((64, 64))
    human[10:37, 21:50] = 1.0
    explanation = np.zeros((16, 16))
    explanation[2:9, 5:12] = -0.3  # negative importances count by magnitude
    explanation[0, 0] = 0.05
    expected = spearmanr(block_mean_resize(np.abs(explanation)).ravel(),
                         block_mean_resize(human).ravel()).statistic
    assert map_correlation(explanation, human) == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected < 1.0


def test_identical_maps_at_different_resolutions_correlate_perfectly() -> None:
    human = np.zeros((64, 64))
    human[16:48, 16:32] = 1.0
    occlusion = np.full((4, 4), 0.01)  # the same square on a 4 x 4 grid, small background
    occlusion[1:3, 1:2] = 0.7
    assert map_correlation(occlusion, human) == pytest.approx(1.0, abs=1e-12)


def test_rank_average_gives_ties_their_mean_rank() -> None:
    np.testing.assert_array_equal(rank_average(np.array([10.0, 20.0, 10.0, 5.0, 20.0])),
                                  [2.5, 4.5, 2.5, 1.0, 4.5])


def test_spearman_of_constant_map_is_nan_and_sizes_must_match() -> None:
    assert math.isnan(spearman(np.ones(9), np.arange(9.0)))
    assert math.isnan(map_correlation(np.zeros((16, 16)), np.eye(64)))
    with pytest.raises(InputError, match="9 and 8 values"):
        spearman(np.ones(9), np.ones(8))


def test_mean_sem_matches_its_formula() -> None:
    values = [0.1, 0.4, -0.2, 0.35, 0.05]
    hand_mean = sum(values) / 5
    hand_sd = math.sqrt(sum((v - hand_mean) ** 2 for v in values) / 4)
    estimate = mean_sem([*values, math.nan])
    assert estimate.mean == pytest.approx(hand_mean)
    assert estimate.sem == pytest.approx(hand_sd / math.sqrt(5))
    assert (estimate.n, estimate.undefined) == (5, 1)
    assert estimate.to_dict()["sem"] == pytest.approx(hand_sd / math.sqrt(5))


def test_mean_sem_of_too_few_values() -> None:
    one = mean_sem([0.3])
    assert one.mean == 0.3 and math.isnan(one.sem)
    assert one.to_dict() == {"mean": 0.3, "sem": None, "n": 1, "undefined": 0}
    assert mean_sem([]).n == 0


def test_random_maps_are_at_chance(rng: np.random.Generator) -> None:
    human = np.zeros((64, 64))
    human[20:40, 5:30] = 1.0
    estimate = mean_sem(map_correlation(random_map(rng), human) for _ in range(400))
    assert abs(estimate.mean) < 3 * estimate.sem
    assert 0.0 < estimate.sem < 0.02


def test_inter_human_agreement_is_the_mean_over_pairs(rng: np.random.Generator) -> None:
    maps = [rng.random((48, 48)) for _ in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = np.mean([spearmanr(block_mean_resize(maps[i]).ravel(),
                                  block_mean_resize(maps[j]).ravel()).statistic
                        for i, j in pairs])
    assert inter_human_agreement(maps) == pytest.approx(expected, abs=1e-12)
    assert inter_human_agreement(maps[:1]) != inter_human_agreement(maps[:1])  # NaN
    assert inter_human_agreement([maps[0], maps[0]]) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((0, 3)), np.full((4, 4), np.nan)])
def test_bad_maps_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(InputError, match="map"):
        area_resize(bad)


def test_spearman_with_ties_by_hand_and_no_warning_when_undefined() -> None:
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0])) == \
        pytest.approx(3 / math.sqrt(10), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman(np.arange(9.0), np.full(9, 2.0)))
        assert math.isnan(spearman(np.ones(1), np.ones(1)))

"""Failure prediction: occlusion features and cross-validated accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.failure import FEATURES, occlusion_features, predict_failure


def test_occlusion_features_by_hand() -> None:
    image = np.array([[0.2, -0.1], [0.0, 0.3]])
    words = np.array([0.05, 0.4, -0.05])
    f = occlusion_features(image_map=image, word_map=words, image_flips=1, word_flips=2,
                           probability=0.8, margin=0.5, entropy=0.7)
    assert set(f) == set(FEATURES)
    assert f["image_flip_fraction"] == 0.25
    assert f["word_flip_fraction"] == pytest.approx(2 / 3)
    assert f["any_word_flip"] == 1.0 and f["words"] == 3.0
    assert f["image_max"] == 0.3 and f["word_max"] == 0.4
    assert f["image_mean"] == pytest.approx(0.1)
    assert f["image_abs_mean"] == pytest.approx(0.15)
    assert f["image_positive_fraction"] == 0.5
    assert f["word_mean"] == pytest.approx(0.4 / 3)
    assert f["image_max_relative"] == pytest.approx(0.3 / 0.8)
    assert f["word_max_relative"] == pytest.approx(0.5)
    assert (f["probability"], f["margin"], f["entropy"]) == (0.8, 0.5, 0.7)


def _rows(flips: list[float], rng: np.random.Generator) -> list[dict[str, float]]:
    rows = []
    for flip in flips:
        row = {name: float(rng.random()) for name in FEATURES}
        row["image_flip_fraction"] = flip
        rows.append(row)
    return rows


def test_a_separable_feature_is_predicted_and_the_majority_baseline_is_exact(
    rng: np.random.Generator,
) -> None:
    # 30 right answers with few flips, 10 wrong with many: flips alone separate them.
    flips = [0.05 * rng.random() for _ in range(30)] + [0.5 + 0.1 * rng.random() for _ in range(10)]
    correct = [True] * 30 + [False] * 10
    result = predict_failure(_rows(flips, rng), correct, folds=5, seed=0)
    assert (result.n, result.correct, result.folds, result.reason) == (40, 30, 5, None)
    # Stratified 5 folds of 6 right + 2 wrong: the majority class scores 6/8 in every fold.
    assert result.scores["majority class"]["accuracy"] == pytest.approx(0.75)
    assert result.scores["majority class"]["accuracy_std"] == pytest.approx(0.0)
    assert result.scores["majority class"]["roc_auc"] == pytest.approx(0.5)
    assert result.scores["logistic regression (flips only)"]["accuracy"] == pytest.approx(1.0)
    assert result.scores["gradient boosting"]["accuracy"] >= 0.95
    assert result.to_dict()["scores"]["logistic regression"]["balanced_accuracy"] > 0.9


def test_folds_shrink_to_the_rarer_class_and_one_class_is_not_scored(
    rng: np.random.Generator,
) -> None:
    flips = [0.0] * 10 + [1.0] * 3
    result = predict_failure(_rows(flips, rng), [True] * 10 + [False] * 3, folds=5)
    assert result.folds == 3
    single = predict_failure(_rows([0.0] * 6, rng), [True] * 6)
    assert single.scores == {} and "0 wrong" in (single.reason or "")


def test_bad_arguments_are_refused(rng: np.random.Generator) -> None:
    with pytest.raises(InputError, match="folds must be >= 2, got 1"):
        predict_failure(_rows([0.0], rng), [True], folds=1)
    with pytest.raises(InputError, match="2 feature rows but 1 labels"):
        predict_failure(_rows([0.0, 1.0], rng), [True])

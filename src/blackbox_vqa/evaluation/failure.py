"""Predicting failure from occlusion results (Goyal et al. 2016, section 4.3).

Features of one item come from its occlusion run and the model's scores (see
:data:`FEATURES`); the label is whether the model's answer was right. Predictors are
scored by stratified k-fold cross-validation, beside the majority-class baseline scored
the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError

__all__ = ["FEATURES", "FLIP_FEATURES", "FailurePrediction", "occlusion_features",
           "predict_failure"]

FEATURES = (
    "image_flip_fraction",
    "word_flip_fraction",
    "any_word_flip",
    "words",
    "probability",
    "margin",
    "entropy",
    "image_max",
    "image_mean",
    "image_abs_mean",
    "image_positive_fraction",
    "word_max",
    "word_mean",
    "image_max_relative",
    "word_max_relative",
)
FLIP_FEATURES = ("image_flip_fraction", "word_flip_fraction")


def occlusion_features(
    *,
    image_map: NDArray[Any],
    word_map: NDArray[Any],
    image_flips: int,
    word_flips: int,
    probability: float,
    margin: float,
    entropy: float,
) -> dict[str, float]:
    """The :data:`FEATURES` of one item, from its occlusion maps, flip counts and scores.

    ``margin`` is the top score minus the second; ``entropy`` that of the scores
    normalised to sum to one (nats).
    """
    image = np.asarray(image_map, dtype=np.float64).reshape(-1)
    words = np.asarray(word_map, dtype=np.float64).reshape(-1)
    cells, n_words = max(image.size, 1), max(words.size, 1)
    p = max(float(probability), 1e-12)
    image_max = float(image.max()) if image.size else 0.0
    word_max = float(words.max()) if words.size else 0.0
    return {
        "image_flip_fraction": image_flips / cells,
        "word_flip_fraction": word_flips / n_words,
        "any_word_flip": float(word_flips > 0),
        "words": float(words.size),
        "probability": float(probability),
        "margin": float(margin),
        "entropy": float(entropy),
        "image_max": image_max,
        "image_mean": float(image.mean()) if image.size else 0.0,
        "image_abs_mean": float(np.abs(image).mean()) if image.size else 0.0,
        "image_positive_fraction": float((image > 0).mean()) if image.size else 0.0,
        "word_max": word_max,
        "word_mean": float(words.mean()) if words.size else 0.0,
        "image_max_relative": image_max / p,
        "word_max_relative": word_max / p,
    }


@dataclass(frozen=True)
class FailurePrediction:
    """Cross-validated scores of failure predictors.

    ``scores[name]`` holds ``accuracy`` (mean over folds), ``accuracy_std``,
    ``balanced_accuracy`` and ``roc_auc``; ``"majority class"`` is the baseline. ``reason``
    says why nothing was scored (too few items, one class only), else None.
    """

    n: int
    correct: int
    folds: int
    scores: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    features: tuple[str, ...] = FEATURES
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"n": self.n, "correct": self.correct, "folds": self.folds,
                "scores": {k: dict(v) for k, v in self.scores.items()},
                "features": list(self.features), "reason": self.reason}


def _classifiers(seed: int) -> dict[str, tuple[Any, Sequence[str]]]:
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def logistic() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))

    return {
        "majority class": (DummyClassifier(strategy="most_frequent"), FEATURES),
        "logistic regression (flips only)": (logistic(), FLIP_FEATURES),
        "logistic regression": (logistic(), FEATURES),
        "gradient boosting": (GradientBoostingClassifier(random_state=seed), FEATURES),
    }


def _mean(values: NDArray[Any]) -> float | None:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else None


def predict_failure(
    features: Sequence[Mapping[str, float]],
    correct: Sequence[bool],
    *,
    folds: int = 5,
    seed: int = 0,
) -> FailurePrediction:
    """Stratified ``folds``-fold cross-validated scores of each predictor of ``correct``.

    With fewer items of the rarer class than ``folds``, that many folds are used (at
    least two); with fewer than two, nothing is scored and ``reason`` says why.
    """
    if folds < 2:
        raise InputError(f"folds must be >= 2, got {folds}")
    if len(features) != len(correct):
        raise InputError(f"{len(features)} feature rows but {len(correct)} labels")
    labels = np.asarray(correct, dtype=bool)
    n, n_correct = int(labels.size), int(labels.sum())
    rarer = min(n_correct, n - n_correct)
    if rarer < 2:
        reason = (f"needs at least two right and two wrong answers; got {n_correct} right, "
                  f"{n - n_correct} wrong")
        return FailurePrediction(n, n_correct, 0, reason=reason)
    k = min(folds, rarer)
    from sklearn.model_selection import StratifiedKFold, cross_validate

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores: dict[str, dict[str, float | None]] = {}
    for name, (estimator, columns) in _classifiers(seed).items():
        matrix = np.asarray([[row[c] for c in columns] for row in features], dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = cross_validate(estimator, matrix, labels, cv=splitter,
                                    scoring=("accuracy", "balanced_accuracy", "roc_auc"))
        accuracy = np.asarray(result["test_accuracy"], dtype=np.float64)
        scores[name] = {
            "accuracy": float(accuracy.mean()),
            "accuracy_std": float(accuracy.std()),
            "balanced_accuracy": _mean(result["test_balanced_accuracy"]),
            "roc_auc": _mean(result["test_roc_auc"]),
        }
    return FailurePrediction(n, n_correct, k, scores=scores)


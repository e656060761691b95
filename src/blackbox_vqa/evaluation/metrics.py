"""Faithfulness metrics and the randomisation sanity check of a whole explanation.

:func:`explanation_metrics` runs deletion/insertion on every attribution's image map and
comprehensiveness/sufficiency on every word map (see
:mod:`blackbox_vqa.evaluation.faithfulness`); :func:`explanation_sanity` runs the
model-parameter randomisation test (see :mod:`blackbox_vqa.evaluation.sanity`) for every
method the model's weights allow. Both return JSON-ready dicts keyed by method, kept in
``explanation.json`` as the ``metrics`` and ``sanity`` sections; :func:`metric_rows` and
:func:`sanity_rows` give the flat numbers the evaluation stores per item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import NotSupportedError
from blackbox_vqa.evaluation.faithfulness import (
    DEFAULT_RANDOM_ORDERS,
    Faithfulness,
    default_steps,
)
from blackbox_vqa.evaluation.sanity import randomisation_test
from blackbox_vqa.explain import Explainer
from blackbox_vqa.explainers.cost import CallEstimate
from blackbox_vqa.explainers.registry import MethodSettings
from blackbox_vqa.explanation import Explanation

__all__ = [
    "CURVE_POINTS",
    "explanation_metrics",
    "explanation_sanity",
    "mean_curves",
    "metric_inputs",
    "metric_rows",
    "resampled_curve",
    "sanity_rows",
]

CURVE_POINTS = 21
"""Points (x = 0, 0.05, ..., 1) curves are resampled to before they are averaged."""

_IMAGE_KEYS = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")
_WORD_KEYS = ("comprehensiveness", "sufficiency", "random_comprehensiveness",
              "random_sufficiency")


def metric_inputs(estimate: CallEstimate, words: int, *, steps: int | None = None,
                  random_orders: int = DEFAULT_RANDOM_ORDERS) -> int:
    """Model inputs :func:`explanation_metrics` scores for one method's maps, from its
    :class:`CallEstimate`: image ``2 + 2 (S - 1) (1 + R)`` for a map of more than one
    unit, words ``1 + 2 (n - 1) (1 + R)`` for a word map of ``n >= 2`` words."""
    count = 0
    units = estimate.image_units
    if units > 1:
        chosen = steps if steps is not None else default_steps(units, estimate.pixel_map)
        count += 2 + 2 * (min(chosen, units) - 1) * (1 + random_orders)
    if estimate.word_map and words >= 2:
        count += 1 + 2 * (words - 1) * (1 + random_orders)
    return count


def explanation_metrics(
    model: object,
    image: NDArray[Any],
    found: Explanation,
    *,
    baseline: str = "imagenet-mean",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | str = "auto",
) -> dict[str, Any]:
    """``{method: {"image": deletion/insertion or None, "words": comprehensiveness/
    sufficiency or None, "evaluations": model calls}}`` for every attribution of ``found``
    (maps ranked by their values as given; magnitude maps are >= 0)."""
    meter = Faithfulness(model, steps=steps, baseline=baseline, seed=seed,
                         batch_size=batch_size)
    metrics: dict[str, Any] = {}
    for name, attribution in found.attributions.items():
        entry: dict[str, Any] = {"image": None, "words": None, "evaluations": 0}
        if attribution.image_map.ndim == 2 and attribution.image_map.size > 1:
            curves = meter.deletion_insertion(image, found.question, attribution.image_map,
                                              answer=found.answer)
            entry["image"] = curves.to_dict()
            entry["evaluations"] += curves.evaluations
        words_align = tuple(attribution.tokens) == tuple(found.tokens)
        if words_align and attribution.word_map.size >= 2:
            words = meter.comprehensiveness_sufficiency(image, found.question,
                                                        attribution.word_map,
                                                        answer=found.answer)
            entry["words"] = words.to_dict()
            entry["evaluations"] += words.evaluations
        metrics[name] = entry
    return metrics


def explanation_sanity(
    model: object,
    image: NDArray[Any],
    found: Explanation,
    settings: MethodSettings,
    *,
    layers: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``{method: SanityResult as a dict, or {"available": false, "reason": ...}}``: the
    method's image map recomputed on copies of the model with its layers re-initialised
    from the output down (the model itself is never changed)."""
    results: dict[str, Any] = {}
    for name in found.attributions:
        def recompute(copy: object, method: str = name) -> NDArray[np.float64]:
            redone = Explainer(copy, methods=[method], settings=settings).explain(
                image, found.question, answer=found.answer)
            attribution = redone.attribution(method)
            if attribution is None:
                reason = redone.unavailable[method].reason
                raise NotSupportedError(f"{method} cannot run on the randomised model: "
                                        f"{reason}")
            return attribution.image_map

        try:
            results[name] = randomisation_test(model, recompute, method=name, layers=layers,
                                               seed=seed).to_dict()
        except NotSupportedError as exc:
            results[name] = {"available": False, "reason": str(exc)}
    return results


def resampled_curve(curve: Mapping[str, Any]) -> NDArray[np.float64]:
    """A curve's scores linearly interpolated at :data:`CURVE_POINTS` evenly spaced
    fractions (curves of maps of different sizes can then be averaged)."""
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    return np.interp(grid, np.asarray(curve["fractions"], dtype=np.float64),
                     np.asarray(curve["scores"], dtype=np.float64))


def metric_rows(
    metrics: Mapping[str, Any],
) -> tuple[dict[str, dict[str, float | None]], dict[str, NDArray[np.float64]]]:
    """Per method the flat numbers (AUCs, AOPCs) and the resampled curves
    (``"<method>.deletion"``, ``.insertion``, ``.random_deletion``, ``.random_insertion``)."""
    numbers: dict[str, dict[str, float | None]] = {}
    curves: dict[str, NDArray[np.float64]] = {}
    for name, entry in metrics.items():
        row: dict[str, float | None] = {}
        if entry.get("image"):
            row.update({key: entry["image"][key] for key in _IMAGE_KEYS})
            for curve in ("deletion", "insertion", "random_deletion", "random_insertion"):
                curves[f"{name}.{curve}"] = resampled_curve(entry["image"][curve])
        if entry.get("words"):
            row.update({key: entry["words"][key] for key in _WORD_KEYS})
        row["evaluations"] = float(entry.get("evaluations", 0))
        numbers[name] = row
    return numbers, curves


def sanity_rows(sanity: Mapping[str, Any]) -> dict[str, list[float | None]]:
    """Per method that ran: the rank correlation after each randomised layer."""
    return {name: [step["spearman"] for step in entry["steps"]]
            for name, entry in sanity.items() if entry.get("available", True)}


def mean_curves(records: Sequence[Mapping[str, NDArray[np.float64]]], method: str) \
        -> dict[str, NDArray[np.float64]]:
    """Mean of each resampled curve of ``method`` over the records that have it."""
    found: dict[str, NDArray[np.float64]] = {}
    for curve in ("deletion", "insertion", "random_deletion", "random_insertion"):
        rows = [r[f"{method}.{curve}"] for r in records if f"{method}.{curve}" in r]
        if rows:
            found[curve] = np.mean(np.stack(rows), axis=0)
    return found

"""Evaluating items: one item at a time (:class:`ItemEvaluator`); where items run (here,
in local processes, on a Ray cluster) is an executor's business (``evaluation.executors``).

For one item: read the image, get the model's answer and scores, run each method on the
predicted answer, and correlate each method's image map (and a random map) with the
item's human maps. The result is an :class:`~blackbox_vqa.evaluation.runstore.ItemRecord`.
Everything an item's result depends on is the item, the model and the settings (the
random map is seeded from ``seed`` and the item's key), so the order items run in, and
the process they run in, do not change any result.

An item whose image or question the model cannot take (an :class:`InputError`) is stored
as skipped, with the reason; a model failure (:class:`ModelError`) stops the run.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.datasets import Item, human_maps, normalise_answer
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.evaluation.human_attention import (
    MAP_SIZE,
    inter_human_agreement,
    map_correlation,
    random_map,
)
from blackbox_vqa.evaluation.runstore import ItemRecord
from blackbox_vqa.explain import Explainer
from blackbox_vqa.explainers.registry import MethodSettings
from blackbox_vqa.explanation import Explanation, top_answers
from blackbox_vqa.images import load_image
from blackbox_vqa.specs import public_spec

__all__ = [
    "EvalConfig",
    "ItemEvaluator",
    "item_rng",
    "load_evaluator",
    "run_items",
]


@dataclass(frozen=True)
class EvalConfig:
    """What a worker needs to evaluate items: model spec, methods and their options.

    ``model_options``: the spec's loader options (``ModelOptions.extra``: HTTP format and
    headers, ONNX metadata...). ``metrics``: also measure each map's faithfulness;
    ``sanity_keys``: the items that also get the randomisation sanity check.
    ``threads``: torch CPU threads per process while items run (None: leave as is).
    Equal thread counts make serial and parallel runs give bit-identical results on one
    machine; different counts can change the last bits of a CPU model's scores.
    """

    model: str
    methods: tuple[str, ...]
    options: MethodSettings = field(default_factory=MethodSettings)
    seed: int = 0
    map_size: int = MAP_SIZE
    threads: int | None = 1
    model_options: Mapping[str, Any] = field(default_factory=dict)
    metrics: bool = False
    sanity_keys: frozenset[str] = frozenset()

    def load(self) -> ItemEvaluator:
        """Load the model and build its methods (what each worker does once)."""
        return load_evaluator(self)

    def failed(self, item: Item, reason: str, detail: str) -> ItemRecord:
        """The record of an item no worker could finish: status ``"failed"``."""
        return ItemRecord(item.key, {"key": item.key, "question": item.question,
                                     "status": "failed", "reason": reason,
                                     "detail": detail})


def item_rng(seed: int, key: str) -> np.random.Generator:
    """The random generator of item ``key``: depends on nothing but ``seed`` and ``key``."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


def _nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _score_summary(scores: NDArray[np.float64], answers: Sequence[str],
                   own: int | None = None) -> dict[str, Any]:
    """``own``: the model's own answer when it is not the arg-max (generative models)."""
    index = int(np.argmax(scores)) if own is None else own
    ordered = np.sort(scores)[::-1]
    total = float(scores.sum())
    p = scores / total if total > 0 else np.full_like(scores, 1.0 / scores.size)
    nonzero = p[p > 0]
    return {
        "answer": answers[index],
        "answer_index": index,
        "probability": float(scores[index]),
        "margin": float(ordered[0] - ordered[1]) if scores.size > 1 else float(ordered[0]),
        "entropy": float(-(nonzero * np.log(nonzero)).sum()),
        "top_answers": top_answers(answers, scores),
    }


def _truth(item: Item, predicted: str) -> dict[str, Any]:
    if item.answer is None:
        return {"truth": None, "correct": None, "vqa_accuracy": None}
    guess = normalise_answer(predicted)
    agree = sum(normalise_answer(a) == guess for a in item.answers)
    return {
        "truth": item.answer,
        "correct": normalise_answer(item.answer) == guess,
        "vqa_accuracy": min(1.0, agree / 3.0) if item.answers else None,
    }


class ItemEvaluator:
    """Evaluates items with one loaded model and the methods it supports."""

    def __init__(self, model: Any, config: EvalConfig) -> None:
        self.model = model
        self.config = config
        self.explainer = Explainer(model, methods=config.methods, settings=config.options,
                                   label=public_spec(config.model))
        self.unavailable = {name: gone.reason
                            for name, gone in self.explainer.unavailable.items()}
        if not self.explainer.available:
            reasons = "; ".join(f"{name} is not available: {reason}"
                                for name, reason in self.unavailable.items())
            raise NotSupportedError(f"none of the methods can run on this model: {reasons}")

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods that run on every item."""
        return self.explainer.available

    def evaluate(self, item: Item, *, files: Mapping[str, bytes] | None = None) -> ItemRecord:
        """The record of ``item``; status ``"skipped"`` (with ``reason``) on bad input.

        ``files``: path -> bytes of the item's image and map files, read on another machine
        (:func:`blackbox_vqa.datasets.read_item_files`); paths not in it are read here. The
        record is the same either way.
        """
        started = time.perf_counter()
        base: dict[str, Any] = {"key": item.key, "question": item.question}
        given = files or {}
        try:
            pixels = load_image(item.image, content=given.get(item.image))
            found = self.explainer.explain(pixels, item.question)
        except NotSupportedError:
            raise
        except InputError as exc:
            return ItemRecord(item.key, {**base, "status": "skipped", "reason": str(exc)})
        return self._record(item, pixels, found, base, started, given)

    def _record(
        self, item: Item, pixels: NDArray[Any], found: Explanation, base: dict[str, Any],
        started: float, files: Mapping[str, bytes],
    ) -> ItemRecord:
        summary = _score_summary(found.scores, list(found.answers), found.answer_index)
        outputs: dict[str, Any] = {}
        arrays: dict[str, NDArray[np.float64]] = {}
        seconds: dict[str, float] = {}
        for name, attribution in found.attributions.items():
            seconds[name] = attribution.seconds
            outputs[name] = {"words": list(attribution.tokens), "stats": dict(attribution.stats)}
            arrays[f"{name}.image"] = attribution.image_map
            arrays[f"{name}.words"] = attribution.word_map
        human = self._human(item, pixels, arrays, tuple(found.attributions), files)
        checks = self._checks(item, pixels, found, arrays)
        seconds["total"] = time.perf_counter() - started
        seconds["predict"] = max(0.0, seconds["total"] - sum(
            a.seconds for a in found.attributions.values()))
        unavailable = dict(self.unavailable)
        unavailable.update({n: u.reason for n, u in found.unavailable.items()})
        meta = {
            **base,
            "status": "done",
            "reason": None,
            **summary,
            **_truth(item, summary["answer"]),
            "methods": outputs,
            "unavailable": unavailable,
            "human": human,
            **checks,
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
        }
        return ItemRecord(item.key, meta, arrays)

    def _checks(
        self, item: Item, pixels: NDArray[Any], found: Explanation,
        arrays: dict[str, NDArray[np.float64]],
    ) -> dict[str, Any]:
        """``faithfulness`` (numbers per method; resampled curves go into ``arrays``) and
        ``sanity`` (rank correlation per randomised layer), when the config asks."""
        from blackbox_vqa.evaluation.metrics import (
            explanation_metrics,
            explanation_sanity,
            metric_rows,
            sanity_rows,
        )

        found_checks: dict[str, Any] = {}
        options = self.config.options
        if self.config.metrics:
            metrics = explanation_metrics(self.model, pixels, found, baseline=options.baseline,
                                          batch_size=options.batch_size,
                                          seed=self.config.seed)
            numbers, curves = metric_rows(metrics)
            found_checks["faithfulness"] = numbers
            arrays.update({f"faith.{name}": curve for name, curve in curves.items()})
        if item.key in self.config.sanity_keys:
            sanity = explanation_sanity(self.model, pixels, found, options,
                                        seed=self.config.seed)
            found_checks["sanity"] = sanity_rows(sanity)
        return found_checks

    def _human(
        self, item: Item, pixels: NDArray[Any], arrays: Mapping[str, NDArray[np.float64]],
        methods: Sequence[str], files: Mapping[str, bytes],
    ) -> dict[str, Any]:
        maps = human_maps(item, pixels, files=files)
        if not maps:
            return {"maps": 0, "correlations": {}, "random": [], "inter_human": None}
        size = self.config.map_size
        chance = random_map(item_rng(self.config.seed, item.key), size)
        correlations = {
            name: _nan_to_none(map_correlation(arrays[f"{name}.image"], m, size=size)
                               for m in maps)
            for name in methods
        }
        agreement = inter_human_agreement(maps, size=size) if len(maps) > 1 else math.nan
        return {
            "maps": len(maps),
            "correlations": correlations,
            "random": _nan_to_none(map_correlation(chance, m, size=size) for m in maps),
            "inter_human": agreement if math.isfinite(agreement) else None,
        }


def load_evaluator(config: EvalConfig) -> ItemEvaluator:
    """Load the model from ``config.model`` and build its methods."""
    from blackbox_vqa.specs import ModelOptions, load_model

    model = load_model(config.model, ModelOptions(extra=config.model_options))
    return ItemEvaluator(model, config)


def run_items(
    items: Sequence[Item],
    config: EvalConfig,
    on_record: Callable[[ItemRecord], None],
    *,
    workers: int = 1,
    evaluator: ItemEvaluator | None = None,
) -> None:
    """Evaluate ``items`` with the local executor (here, or in ``workers`` processes),
    calling ``on_record`` in this process as each one finishes; see
    :class:`blackbox_vqa.evaluation.executors.local.LocalExecutor`."""
    from blackbox_vqa.evaluation.executors.local import LocalExecutor

    LocalExecutor(workers=workers, evaluator=evaluator).run(items, config, on_record)

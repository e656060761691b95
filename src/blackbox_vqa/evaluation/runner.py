"""Evaluating items: one item at a time (:class:`ItemEvaluator`), serially or in processes.

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
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_scores, model_name
from blackbox_vqa.datasets import Item, human_maps, normalise_answer
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.evaluation.human_attention import (
    MAP_SIZE,
    inter_human_agreement,
    map_correlation,
    random_map,
)
from blackbox_vqa.evaluation.methods import ItemMethod, MethodOptions, build_methods
from blackbox_vqa.evaluation.runstore import ItemRecord
from blackbox_vqa.explanation import top_answers
from blackbox_vqa.images import load_image
from blackbox_vqa.text import validate_question

__all__ = ["EvalConfig", "ItemEvaluator", "item_rng", "load_evaluator", "run_items"]


@dataclass(frozen=True)
class EvalConfig:
    """What a worker needs to evaluate items: model spec, methods and their options.

    ``threads``: torch CPU threads per process while items run (None: leave as is). Equal
    thread counts make serial and parallel runs give bit-identical results; different
    counts can change the last bits of a CPU model's scores.
    """

    model: str
    methods: tuple[str, ...]
    options: MethodOptions = field(default_factory=MethodOptions)
    seed: int = 0
    map_size: int = MAP_SIZE
    threads: int | None = 1


def item_rng(seed: int, key: str) -> np.random.Generator:
    """The random generator of item ``key``: depends on nothing but ``seed`` and ``key``."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


def _nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _score_summary(scores: NDArray[np.float64], answers: Sequence[str]) -> dict[str, Any]:
    index = int(np.argmax(scores))
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
        self.methods: dict[str, ItemMethod]
        self.methods, self.unavailable = build_methods(config.methods, model, config.options)
        if not self.methods:
            reasons = "; ".join(self.unavailable.values())
            raise NotSupportedError(f"none of the methods can run on this model: {reasons}")

    def evaluate(self, item: Item) -> ItemRecord:
        """The record of ``item``; status ``"skipped"`` (with ``reason``) on bad input."""
        started = time.perf_counter()
        base: dict[str, Any] = {"key": item.key, "question": item.question}
        try:
            pixels = load_image(item.image)
            question = self._question(item.question)
            return self._evaluate(item, pixels, question, base, started)
        except NotSupportedError:
            raise
        except InputError as exc:
            return ItemRecord(item.key, {**base, "status": "skipped", "reason": str(exc)})

    def _question(self, question: str) -> str:
        validate = getattr(self.model, "validate_question", None)
        return str(validate(question)) if callable(validate) else validate_question(question)

    def _evaluate(
        self, item: Item, pixels: NDArray[Any], question: str, base: dict[str, Any],
        started: float,
    ) -> ItemRecord:
        answers = list(self.model.answers)
        raw = self.model.answer_probs_batch([pixels], [question])
        scores = check_scores(raw, 1, len(answers), source=model_name(self.model))[0]
        summary = _score_summary(scores, answers)
        seconds: dict[str, float] = {"predict": time.perf_counter() - started}
        outputs: dict[str, Any] = {}
        arrays: dict[str, NDArray[np.float64]] = {}
        for name, method in self.methods.items():
            tick = time.perf_counter()
            output = method.explain(pixels, question, summary["answer"])
            seconds[name] = time.perf_counter() - tick
            outputs[name] = {"words": list(output.words), "stats": dict(output.stats)}
            arrays[f"{name}.image"] = output.image_map
            arrays[f"{name}.words"] = output.word_map
        human = self._human(item, pixels, arrays)
        seconds["total"] = time.perf_counter() - started
        meta = {
            **base,
            "status": "done",
            "reason": None,
            **summary,
            **_truth(item, summary["answer"]),
            "methods": outputs,
            "unavailable": dict(self.unavailable),
            "human": human,
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
        }
        return ItemRecord(item.key, meta, arrays)

    def _human(
        self, item: Item, pixels: NDArray[Any], arrays: Mapping[str, NDArray[np.float64]]
    ) -> dict[str, Any]:
        maps = human_maps(item, pixels)
        if not maps:
            return {"maps": 0, "correlations": {}, "random": [], "inter_human": None}
        size = self.config.map_size
        chance = random_map(item_rng(self.config.seed, item.key), size)
        correlations = {
            name: _nan_to_none(map_correlation(arrays[f"{name}.image"], m, size=size)
                               for m in maps)
            for name in self.methods
        }
        agreement = inter_human_agreement(maps, size=size) if len(maps) > 1 else math.nan
        return {
            "maps": len(maps),
            "correlations": correlations,
            "random": _nan_to_none(map_correlation(chance, m, size=size) for m in maps),
            "inter_human": agreement if math.isfinite(agreement) else None,
        }


_WORKER: ItemEvaluator | None = None


def _set_torch_threads(threads: int | None) -> int | None:
    """Set torch's CPU threads when torch is loaded; return the previous count (or None)."""
    if threads is None or "torch" not in sys.modules:
        return None
    import torch

    previous = int(torch.get_num_threads())
    torch.set_num_threads(threads)
    return previous


def load_evaluator(config: EvalConfig) -> ItemEvaluator:
    """Load the model from ``config.model`` and build its methods."""
    from blackbox_vqa.specs import load_model

    return ItemEvaluator(load_model(config.model), config)


def _worker_evaluate(config: EvalConfig, item: Item) -> ItemRecord:
    global _WORKER
    if _WORKER is None:
        _WORKER = load_evaluator(config)
        _set_torch_threads(config.threads)
    return _WORKER.evaluate(item)


def run_items(
    items: Sequence[Item],
    config: EvalConfig,
    on_record: Callable[[ItemRecord], None],
    *,
    workers: int = 1,
    evaluator: ItemEvaluator | None = None,
) -> None:
    """Evaluate ``items``, calling ``on_record`` in this process as each one finishes.

    ``workers > 1`` runs items in that many processes (spawned; each loads the model from
    ``config.model``); otherwise they run here, with ``evaluator`` if given. Torch runs with
    ``config.threads`` threads in every process (restored here afterwards).
    """
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if not items:
        return
    if workers == 1:
        local = evaluator or load_evaluator(config)
        previous = _set_torch_threads(config.threads)
        try:
            for item in items:
                on_record(local.evaluate(item))
        finally:
            _set_torch_threads(previous)
        return
    _run_parallel(items, config, on_record, workers)


def _run_parallel(
    items: Sequence[Item],
    config: EvalConfig,
    on_record: Callable[[ItemRecord], None],
    workers: int,
) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = list(reversed(items))
    pending: set[Future[ItemRecord]] = set()
    pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context)
    try:
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                pending.add(pool.submit(_worker_evaluate, config, queue.pop()))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                on_record(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

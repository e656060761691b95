"""MM-SHAP benchmark (issue 20): the permutation budget's precision, and the framework's
share of the time.

Budget: on ``--items`` items of easyvqa:test (drawn with seed 0, as ``bbvqa evaluate``
draws them) the reference model is explained with ``--budgets`` permutations, antithetic
and plain; per budget the median over items of the s.e. of T-SHAP (delta method), of the
distance to a reference estimate (``--reference`` antithetic permutations, seed 99), and
of the model inputs scored per item. No timing: these are statistics of the estimator.

Time: one explanation (default budget, one item) is timed as ``ours`` =
``ModalityShare(adapter).explain(image, question)`` and ``floor`` = the same
``answer_probs_batch`` calls replayed on the same pre-built inputs (recorded in an
untimed run), side by side in one process, in an order shuffled per repeat; medians of
``--repeats`` and the median of per-repeat ratios.

Run ``python benchmarks/mm_shap.py --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from typing import Any

import numpy as np
import torch

from blackbox_vqa.datasets import open_dataset, select_items
from blackbox_vqa.explainers.modality_share import DEFAULT_PERMUTATIONS, ModalityShare
from blackbox_vqa.images import load_image
from blackbox_vqa.models.reference import reference_adapter


class Recorder:
    """The model, recording every ``answer_probs_batch`` call's inputs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.answers = model.answers
        self.name = "recorder"
        self.calls: list[tuple[list[Any], list[str]]] = []

    def answer_probs(self, image: Any, question: str) -> Any:
        return self.answer_probs_batch([image], [question])[0]

    def answer_probs_batch(self, images: Any, questions: Any) -> Any:
        self.calls.append(([np.array(i, copy=True) for i in images], list(questions)))
        return self.model.answer_probs_batch(images, questions)


def budget(
    model: Any, items: list[Any], budgets: list[int], reference: int
) -> list[dict[str, Any]]:
    rows = []
    inputs = [(load_image(item.image).astype(np.float32), item.question) for item in items]
    truth = [ModalityShare(model, permutations=reference, seed=99).explain(p, q).t_shap
             for p, q in inputs]
    for sampling in ("antithetic", "plain"):
        for count in budgets:
            found = [ModalityShare(model, permutations=count, sampling=sampling, seed=1)
                     .explain(p, q) for p, q in inputs]
            rows.append({
                "sampling": sampling, "permutations": count,
                "t_shap_se_median": statistics.median(r.t_shap_se for r in found),
                "t_shap_se_max": max(r.t_shap_se for r in found),
                "abs_error_median": statistics.median(
                    abs(r.t_shap - t) for r, t in zip(found, truth, strict=True)),
                "inputs_median": statistics.median(r.evaluations for r in found),
                "players_median": statistics.median(r.phi.size for r in found),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timing(model: Any, item: Any, repeats: int) -> dict[str, Any]:
    pixels, question = load_image(item.image).astype(np.float32), item.question
    recorder = Recorder(model)
    ModalityShare(recorder).explain(pixels, question)
    calls = recorder.calls

    def ours() -> None:
        ModalityShare(model).explain(pixels, question)

    def floor() -> None:
        for images, questions in calls:
            model.answer_probs_batch(images, questions)

    runs: dict[str, list[float]] = {"ours": [], "floor": []}
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            started = time.perf_counter()
            (ours if name == "ours" else floor)()
            runs[name].append(time.perf_counter() - started)
    ratios = [a / b for a, b in zip(runs["ours"], runs["floor"], strict=True)]
    return {
        "inputs": sum(len(q) for _, q in calls), "calls": len(calls),
        "ours_median_s": statistics.median(runs["ours"]),
        "floor_median_s": statistics.median(runs["floor"]),
        "ours_over_floor": statistics.median(runs["ours"]) / statistics.median(runs["floor"]),
        "median_of_ratios": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--budgets", default="8,16,32,64,128")
    parser.add_argument("--reference", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-budget", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = reference_adapter()
    items = select_items(open_dataset("easyvqa:test").items, limit=args.items, seed=0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; default budget {DEFAULT_PERMUTATIONS}")
    if not args.skip_budget:
        budget(model, items, [int(b) for b in args.budgets.split(",")], args.reference)
    print(json.dumps(timing(model, items[0], args.repeats)))


if __name__ == "__main__":
    main()

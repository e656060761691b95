"""Several models explained on the same inputs, and how much they agree.

:func:`explain_model` runs every method a model supports on one image and question and
returns a :class:`ModelRun`: the model's ``explanation.json`` document, the methods it
cannot do with the reason, or the error that stopped it. A method a model cannot do never
stops the others, and a failing model never stops the other models. :func:`pair_results`
measures agreement between every pair of runs, per method; answers are compared on the
answers both models can give.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import BlackboxVQAError, InputError, ModelError
from blackbox_vqa.evaluation.agreement import PairAgreement, pair_agreement

__all__ = [
    "GRADIENT_METHODS",
    "METHODS",
    "CompareSettings",
    "GradientSource",
    "ItemResult",
    "ModelRun",
    "PairResult",
    "best_shared_answer",
    "check_shared_answer",
    "dataset_summary",
    "explain_model",
    "item_result",
    "pair_dict",
    "pair_results",
    "run_dict",
    "shared_answers",
    "top_words",
]

METHODS = ("occlusion", "guided-bp", "gradient")
"""Methods a comparison runs, each where the model supports it."""

GRADIENT_METHODS = (("guided_backprop", "guided-bp", True), ("gradient", "gradient", False))
"""``(explanation.json key, method, guided)`` of the gradient methods."""

_SECTION = {"occlusion": "occlusion", "guided-bp": "guided_backprop", "gradient": "gradient"}

GradientSource = tuple[Any, str, str]

ProgressFactory = Callable[[str], Any]


@dataclass(frozen=True)
class CompareSettings:
    """Explainer settings shared by every model of a comparison."""

    grid: int = 16
    baseline: str = "imagenet-mean"
    batch_size: int | str = "auto"
    answer: str | None = None
    k: int = 10


@dataclass(frozen=True)
class ModelRun:
    """One model's explanations of one image and question.

    Attributes:
        spec: the ``--model`` spec (unique within a comparison); ``name`` its label.
        answers: the model's answer vocabulary; ``scores`` its scores ``[A]`` on the
            original input (empty when the run failed).
        doc: the ``explanation.json`` document, or None when the run failed.
        unavailable: method -> why the model cannot do it.
        error: the error that stopped the run, or None.
        seconds: wall time of all its methods.
    """

    spec: str
    name: str
    answers: tuple[str, ...]
    scores: NDArray[np.float64]
    doc: dict[str, Any] | None
    unavailable: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def maps(self, method: str) -> tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]:
        """``(image_map, word_map)`` of ``method`` (None, None when it did not run)."""
        section = (self.doc or {}).get(_SECTION.get(method, method))
        if not isinstance(section, Mapping) or section.get("available") is False:
            return None, None
        image = section.get("image")
        words = section.get("words")
        return (
            np.asarray(image, dtype=np.float64) if image else None,
            np.asarray(words, dtype=np.float64) if words else None,
        )

    @property
    def answer(self) -> str | None:
        """The answer explained (None when the run failed)."""
        return None if self.doc is None else str(self.doc["answer"])


@dataclass(frozen=True)
class PairResult:
    """Agreement of two runs on one method; ``same_answer`` is judged on shared answers
    (None when the models share none or a run failed)."""

    a: str
    b: str
    method: str
    agreement: PairAgreement
    same_answer: bool | None


def shared_answers(vocabularies: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Answers every vocabulary holds, in the first one's order."""
    if not vocabularies:
        return ()
    others = [set(v) for v in vocabularies[1:]]
    return tuple(a for a in vocabularies[0] if all(a in other for other in others))


def check_shared_answer(answer: str | None, vocabularies: Mapping[str, Sequence[str]]) -> None:
    """Raise :class:`InputError` when ``--answer`` is missing from some model's answers."""
    if answer is None:
        return
    missing = [spec for spec, answers in vocabularies.items() if answer not in answers]
    if missing:
        raise InputError(
            f"--answer {answer!r} is not among the answers of model(s) {', '.join(missing)}; "
            "only an answer every model can give can be explained for all of them"
        )


def best_shared_answer(run: ModelRun, shared: Sequence[str]) -> tuple[str, float] | None:
    """The highest-scoring answer of ``run`` among ``shared`` answers, with its score."""
    if run.doc is None or not shared or run.scores.size == 0:
        return None
    index = {answer: i for i, answer in enumerate(run.answers)}
    scores = [float(run.scores[index[a]]) for a in shared]
    best = int(np.argmax(scores))
    return shared[best], scores[best]


def top_words(run: ModelRun, n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` words with the largest ``|occlusion importance|``, most important first."""
    if run.doc is None:
        return []
    words = list(run.doc.get("tokens", []))
    _, values = run.maps("occlusion")
    if values is None or not words:
        return []
    order = np.argsort(-np.abs(values), kind="stable")[:n]
    return [(str(words[i]), float(values[i])) for i in order]


def _gradient_sections(
    source: GradientSource, pixels: NDArray[Any], question: str, answer: str,
    doc: dict[str, Any],
) -> dict[str, str]:
    """Add the ``guided_backprop`` and ``gradient`` sections to ``doc`` (as ``bbvqa explain
    --method all`` writes them; no ``.npy`` is saved, so ``gradient_file`` is null).

    Returns method -> reason for the methods that could not run.
    """
    unavailable: dict[str, str] = {}
    model, where, reason = source
    for key, method, guided in GRADIENT_METHODS:
        if model is None:
            doc[key] = {"available": False, "reason": reason}
            unavailable[method] = reason
            continue
        from blackbox_vqa.explainers.guided_backprop import GuidedBackprop, gradient_dict

        started = time.perf_counter()
        try:
            result = GuidedBackprop(model, guided=guided).explain(pixels, question,
                                                                  answer=answer)
        except BlackboxVQAError as exc:
            doc[key] = {"available": False, "reason": str(exc)}
            unavailable[method] = str(exc)
            continue
        doc[key] = {**gradient_dict(result, gradient_file="", source=where),
                    "gradient_file": None}
        doc["timing"][f"{key}_s"] = round(time.perf_counter() - started, 4)
    return unavailable


def _occlusion_doc(
    name: str,
    model: Any,
    pixels: NDArray[Any],
    question: str,
    image_info: Mapping[str, Any],
    settings: CompareSettings,
    progress: Any,
) -> tuple[Any, dict[str, Any]]:
    from blackbox_vqa.explainers.occlusion import Occlusion
    from blackbox_vqa.explanation import explanation_dict

    started = time.perf_counter()
    explainer = Occlusion(model, grid=settings.grid, baseline=settings.baseline,
                          batch_size=settings.batch_size, progress=progress)
    result = explainer.explain(pixels, question, answer=settings.answer)
    seconds = time.perf_counter() - started
    doc = explanation_dict(
        model=name, answers=list(model.answers), question=question, image=image_info,
        occlusion=result, timing={"occlusion_s": round(seconds, 4)},
    )
    return result, doc


def explain_model(
    spec: str,
    name: str,
    model: Any,
    pixels: NDArray[Any],
    question: str,
    image_info: Mapping[str, Any],
    settings: CompareSettings,
    *,
    gradients: GradientSource = (None, "", "this model offers no gradients"),
    progress: Callable[[int, int], None] | None = None,
) -> ModelRun:
    """Every method ``model`` supports on one input; failures are recorded, not raised.

    Occlusion runs on every model; a model error there fails the run. The gradient
    methods run on ``gradients`` = ``(model with the gradient protocol or None, where its
    gradients come from, why there are none)``; a method that cannot run is listed in
    ``unavailable`` with the reason.
    """
    answers = tuple(model.answers)
    started = time.perf_counter()
    try:
        result, doc = _occlusion_doc(name, model, pixels, question, image_info,
                                     settings, progress)
    except (ModelError, InputError) as exc:
        return ModelRun(spec, name, answers, np.zeros(0), None, error=str(exc),
                        seconds=time.perf_counter() - started)
    unavailable = _gradient_sections(gradients, pixels, question, result.answer, doc)
    return ModelRun(spec, name, answers, np.asarray(result.scores, dtype=np.float64), doc,
                    unavailable=unavailable, seconds=time.perf_counter() - started)


def _same_answer(a: ModelRun, b: ModelRun) -> bool | None:
    shared = shared_answers([a.answers, b.answers])
    left, right = best_shared_answer(a, shared), best_shared_answer(b, shared)
    if left is None or right is None:
        return None
    return left[0] == right[0]


def pair_results(runs: Sequence[ModelRun], *, k: int = 10) -> list[PairResult]:
    """Agreement of every pair of runs (in order), for each method both of them ran.

    ``same_answer`` compares each model's best answer among the answers the two share.
    """
    ok = [run for run in runs if run.doc is not None]
    found: list[PairResult] = []
    for a, b in combinations(ok, 2):
        same = _same_answer(a, b)
        for method in METHODS:
            image_a, words_a = a.maps(method)
            image_b, words_b = b.maps(method)
            if (image_a is None and words_a is None) or (image_b is None and words_b is None):
                continue
            agreement = pair_agreement(image_a, words_a, image_b, words_b, k=k)
            found.append(PairResult(a.spec, b.spec, method, agreement, same))
    return found


@dataclass(frozen=True)
class ItemResult:
    """Every model's run on one data-set item.

    Attributes:
        key, question, image, reference: the item (``reference`` is its answer, if known).
        runs: one run per model, in model order.
        correct: spec -> whether the explained answer equals the reference (normalised),
            None when the item has no reference or the run failed.
        human: spec -> method -> rank correlation with the item's human maps (mean over
            them); empty when the item has none.
        pairs: agreement between the runs.
    """

    key: str
    question: str
    image: str
    reference: str | None
    runs: tuple[ModelRun, ...]
    correct: Mapping[str, bool | None]
    human: Mapping[str, Mapping[str, float]]
    pairs: tuple[PairResult, ...]


def _correct(run: ModelRun, reference: str | None) -> bool | None:
    from blackbox_vqa.datasets import normalise_answer

    if reference is None or run.answer is None:
        return None
    return normalise_answer(run.answer) == normalise_answer(reference)


def _human(run: ModelRun, maps: Sequence[NDArray[Any]]) -> dict[str, float]:
    from blackbox_vqa.evaluation.agreement import mean_ignoring_nan
    from blackbox_vqa.evaluation.human_attention import map_correlation

    found: dict[str, float] = {}
    if run.doc is None or not maps:
        return found
    for method in METHODS:
        image_map, _ = run.maps(method)
        if image_map is not None and image_map.size:
            found[method] = mean_ignoring_nan([map_correlation(image_map, m) for m in maps])
    return found


def item_result(
    item: Any,
    runs: Sequence[ModelRun],
    human_maps: Sequence[NDArray[Any]],
    *,
    k: int = 10,
) -> ItemResult:
    """Score the runs of one item (a :class:`blackbox_vqa.datasets.Item`)."""
    return ItemResult(
        key=str(item.key),
        question=str(item.question),
        image=str(item.image),
        reference=item.answer,
        runs=tuple(runs),
        correct={run.spec: _correct(run, item.answer) for run in runs},
        human={run.spec: _human(run, human_maps) for run in runs},
        pairs=tuple(pair_results(runs, k=k)),
    )


def _rate(values: Sequence[bool | None]) -> tuple[float | None, int]:
    known = [v for v in values if v is not None]
    return (sum(known) / len(known) if known else None), len(known)


def dataset_summary(items: Sequence[ItemResult], specs: Sequence[str]) -> dict[str, Any]:
    """Per model: accuracy and human-attention correlation (mean +- s.e.) per method;
    per pair and method: mean rank correlation, mean top-k overlap, and how often the
    most important word and the answer agree. JSON-ready (NaN becomes None)."""
    from blackbox_vqa.evaluation.agreement import mean_ignoring_nan
    from blackbox_vqa.evaluation.human_attention import mean_sem

    models: dict[str, Any] = {}
    for spec in specs:
        accuracy, judged = _rate([item.correct.get(spec) for item in items])
        failed = sum(1 for item in items for run in item.runs if run.spec == spec and run.error)
        human = {
            method: mean_sem([item.human.get(spec, {}).get(method, np.nan) for item in items
                              if item.human.get(spec)]).to_dict()
            for method in METHODS
            if any(method in item.human.get(spec, {}) for item in items)
        }
        models[spec] = {"accuracy": accuracy, "judged": judged, "failed": failed,
                        "human_attention": human}
    groups: dict[tuple[str, str, str], list[PairResult]] = {}
    for item in items:
        for pair in item.pairs:
            groups.setdefault((pair.a, pair.b, pair.method), []).append(pair)
    agreement = []
    for (a, b, method), pairs in groups.items():
        top_word, _ = _rate([p.agreement.same_top_word for p in pairs])
        same_answer, _ = _rate([p.same_answer for p in pairs])
        agreement.append({
            "a": a, "b": b, "method": method, "n": len(pairs),
            "rank_correlation": _finite(mean_ignoring_nan(
                [p.agreement.rank_correlation for p in pairs])),
            "top_k_overlap": _finite(mean_ignoring_nan([p.agreement.top_k_overlap for p in pairs])),
            "same_top_word": top_word,
            "same_answer": same_answer,
        })
    return {"items": len(items), "models": models, "agreement": agreement}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def pair_dict(pair: PairResult) -> dict[str, Any]:
    """JSON-ready form of a pair result (NaN becomes None)."""
    return {
        "a": pair.a, "b": pair.b, "method": pair.method,
        "rank_correlation": _finite(pair.agreement.rank_correlation),
        "top_k_overlap": _finite(pair.agreement.top_k_overlap),
        "k": pair.agreement.k,
        "same_top_word": pair.agreement.same_top_word,
        "same_answer": pair.same_answer,
    }


def run_dict(run: ModelRun, shared: Sequence[str], *, full: bool = True) -> dict[str, Any]:
    """JSON-ready form of a run; ``full`` includes its whole ``explanation.json`` document."""
    best = best_shared_answer(run, shared)
    entry: dict[str, Any] = {
        "spec": run.spec,
        "status": "failed" if run.error else "ok",
        "error": run.error,
        "answer": run.answer,
        "probability": None if run.doc is None else run.doc["probability"],
        "answers": len(run.answers),
        "best_shared_answer": None if best is None else {"answer": best[0], "score": best[1]},
        "top_words": [{"word": w, "importance": v} for w, v in top_words(run)],
        "unavailable": dict(run.unavailable),
        "seconds": round(run.seconds, 4),
    }
    if full:
        entry["explanation"] = run.doc
    return entry

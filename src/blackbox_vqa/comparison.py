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
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.capabilities import SupportsAnswerChoice
from blackbox_vqa.errors import BlackboxVQAError, InputError
from blackbox_vqa.evaluation.agreement import PairAgreement, pair_agreement
from blackbox_vqa.explain import Explainer
from blackbox_vqa.explanation import Explanation
from blackbox_vqa.text import OTHER_ANSWER, normalise_answer

__all__ = [
    "CompareConfig",
    "CompareModel",
    "CompareWorker",
    "ItemResult",
    "ModelRun",
    "PairResult",
    "best_shared_answer",
    "check_shared_answer",
    "compared_methods",
    "dataset_summary",
    "explain_model",
    "item_result",
    "modality_share",
    "pair_dict",
    "pair_results",
    "run_dict",
    "shared_answers",
    "top_words",
    "with_metrics",
]

ProgressFactory = Callable[[str], Any]


def compared_methods(runs: Sequence[ModelRun]) -> tuple[str, ...]:
    """Every method that ran (or was unavailable) in any run, in registry order."""
    from blackbox_vqa.explainers.registry import method_names

    seen = {name for run in runs for name in (*run.methods, *run.unavailable)}
    return tuple(name for name in method_names() if name in seen)


@dataclass(frozen=True)
class ModelRun:
    """One model's explanations of one image and question.

    Attributes:
        spec: the model's label (unique within a comparison; no credentials).
        answers: the model's answer vocabulary; ``scores`` its scores ``[A]`` on the
            original input (empty when the run failed).
        explanation: the explanation, or None when the run failed.
        unavailable: method -> why the model cannot do it.
        error: the error that stopped the run, or None.
        seconds: wall time of all its methods.
    """

    spec: str
    answers: tuple[str, ...]
    scores: NDArray[np.float64]
    explanation: Explanation | None
    unavailable: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def doc(self) -> dict[str, Any] | None:
        """The ``explanation.json`` document (no files are written beside it), or None."""
        return None if self.explanation is None else self.explanation.to_dict(with_files=False)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods that ran."""
        return () if self.explanation is None else tuple(self.explanation.attributions)

    def maps(self, method: str) -> tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]:
        """``(image_map, word_map)`` of ``method`` (None, None when it did not run)."""
        found = None if self.explanation is None else self.explanation.attribution(method)
        if found is None:
            return None, None
        return (found.image_map if found.image_map.size else None,
                found.word_map if found.word_map.size else None)

    @property
    def answer(self) -> str | None:
        """The answer explained (None when the run failed)."""
        return None if self.explanation is None else self.explanation.answer


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
    """Answers every vocabulary holds, in the first one's order; the placeholder
    ``"(other)"`` (everything a model does not list) is not an answer and never shared."""
    if not vocabularies:
        return ()
    others = [set(v) for v in vocabularies[1:]]
    return tuple(a for a in vocabularies[0]
                 if a != OTHER_ANSWER and all(a in other for other in others))


def free_text(run: ModelRun) -> bool:
    """Whether ``run``'s model lists one answer only beside ``"(other)"``: a generative
    model scoring its own free-text answer (or one given) by its sequence probability."""
    return len([a for a in run.answers if a != OTHER_ANSWER]) <= 1


def check_shared_answer(answer: str | None, models: Mapping[str, object]) -> None:
    """Raise :class:`InputError` when ``--answer`` is missing from the answers of a model
    with a fixed list (label -> model); a model told any answer text
    (:class:`~blackbox_vqa.adapters.capabilities.SupportsAnswerChoice`, a generative one)
    checks it itself when it is told."""
    if answer is None:
        return
    missing = [spec for spec, model in models.items()
               if not isinstance(model, SupportsAnswerChoice)
               and answer not in getattr(model, "answers", ())]
    if missing:
        raise InputError(
            f"--answer {answer!r} is not among the answers of model(s) {', '.join(missing)}; "
            "only an answer every model can give can be explained for all of them"
        )


def best_shared_answer(run: ModelRun, shared: Sequence[str]) -> tuple[str, float] | None:
    """The highest-scoring answer of ``run`` among ``shared`` answers, with its score."""
    if run.explanation is None or not shared or run.scores.size == 0:
        return None
    index = {answer: i for i, answer in enumerate(run.answers)}
    scores = [float(run.scores[index[a]]) for a in shared]
    best = int(np.argmax(scores))
    return shared[best], scores[best]


def top_words(run: ModelRun, n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` words with the largest ``|occlusion importance|``, most important first."""
    if run.explanation is None:
        return []
    words = list(run.explanation.tokens)
    _, values = run.maps("occlusion")
    if values is None or not words:
        return []
    order = np.argsort(-np.abs(values), kind="stable")[:n]
    return [(str(words[i]), float(values[i])) for i in order]


def modality_share(run: ModelRun) -> dict[str, float | None] | None:
    """``{"t_shap", "v_shap", "t_shap_se"}`` of the run's MM-SHAP attribution (None when
    MM-SHAP did not run; values None when undefined)."""
    found = None if run.explanation is None else run.explanation.attribution("mm-shap")
    if found is None:
        return None
    return {key: found.extras.get(key) for key in ("t_shap", "v_shap", "t_shap_se")}


def _modality_summary(items: Sequence[ItemResult], spec: str) -> dict[str, Any] | None:
    """T-SHAP and V-SHAP of one model over the items (mean +- s.e. over items; an item
    whose T-SHAP is undefined counts as undefined), or None when MM-SHAP never ran."""
    from blackbox_vqa.evaluation.human_attention import mean_sem

    shares = [modality_share(run) for item in items for run in item.runs if run.spec == spec]
    found = [share for share in shares if share is not None]
    if not found:
        return None
    return {key: mean_sem(np.nan if share[key] is None else float(share[key])  # type: ignore[arg-type]
                          for share in found).to_dict() for key in ("t_shap", "v_shap")}


def explain_model(
    spec: str,
    explainer: Explainer,
    pixels: NDArray[Any],
    question: str,
    *,
    image_path: str | None = None,
    answer: str | None = None,
    progress: ProgressFactory | None = None,
) -> ModelRun:
    """Every method ``explainer`` has bound on one input; failures are recorded, not raised.

    A method the model cannot serve is listed in ``unavailable`` with the reason; any
    error of the model (bad scores, an exception inside it) fails the run with its
    message, and the other models of the comparison go on.
    """
    answers = tuple(explainer.model.answers)
    started = time.perf_counter()
    try:
        found = explainer.explain(pixels, question, answer=answer, progress=progress)
    except BlackboxVQAError as exc:
        return ModelRun(spec, answers, np.zeros(0), None, error=str(exc),
                        seconds=time.perf_counter() - started)
    except Exception as exc:  # a third-party model's own failure must not stop the others
        return ModelRun(spec, answers, np.zeros(0), None,
                        error=f"{type(exc).__name__}: {exc}",
                        seconds=time.perf_counter() - started)
    found = replace(found, model=spec, image={**found.image, "path": image_path})
    return ModelRun(spec, tuple(found.answers), found.scores, found,
                    unavailable={n: u.reason for n, u in found.unavailable.items()},
                    seconds=time.perf_counter() - started)


def _same_answer(a: ModelRun, b: ModelRun, *, given: bool = False) -> bool | None:
    if a.answer is None or b.answer is None:
        return None
    if free_text(a) or free_text(b):  # the answers explained, as texts (normalised)
        # (with an answer given, that is not the free-text model's own: unknown)
        return None if given else normalise_answer(a.answer) == normalise_answer(b.answer)
    shared = shared_answers([a.answers, b.answers])
    left, right = best_shared_answer(a, shared), best_shared_answer(b, shared)
    if left is None or right is None:
        return None
    return left[0] == right[0]


def pair_results(runs: Sequence[ModelRun], *, k: int = 10, answer_given: bool = False
                 ) -> list[PairResult]:
    """Agreement of every pair of runs (in order), for each method both of them ran.

    ``same_answer`` compares each model's best answer among the answers the two share;
    where one of them answers in free text (:func:`free_text`), the two answers explained,
    normalised, and None when ``answer_given`` (the answer explained was given, not the
    free-text model's own).
    """
    ok = [run for run in runs if run.explanation is not None]
    found: list[PairResult] = []
    for a, b in combinations(ok, 2):
        same = _same_answer(a, b, given=answer_given)
        for method in compared_methods(ok):
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
    if run.explanation is None or not maps:
        return found
    for method in run.methods:
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
    answer_given: bool = False,
) -> ItemResult:
    """Score the runs of one item (a :class:`blackbox_vqa.datasets.Item`);
    ``answer_given`` as for :func:`pair_results`."""
    return ItemResult(
        key=str(item.key),
        question=str(item.question),
        image=str(item.image),
        reference=item.answer,
        runs=tuple(runs),
        correct={run.spec: _correct(run, item.answer) for run in runs},
        human={run.spec: _human(run, human_maps) for run in runs},
        pairs=tuple(pair_results(runs, k=k, answer_given=answer_given)),
    )


def _rate(values: Sequence[bool | None]) -> tuple[float | None, int]:
    known = [v for v in values if v is not None]
    return (sum(known) / len(known) if known else None), len(known)


def dataset_summary(items: Sequence[ItemResult], specs: Sequence[str]) -> dict[str, Any]:
    """Per model: accuracy, human-attention correlation (mean +- s.e.) per method and,
    when MM-SHAP ran, T-SHAP and V-SHAP (mean +- s.e. over items, ``modality_share``);
    per pair and method: mean rank correlation, mean top-k overlap, and how often the
    most important word and the answer agree. JSON-ready (NaN becomes None)."""
    from blackbox_vqa.evaluation.agreement import mean_ignoring_nan
    from blackbox_vqa.evaluation.human_attention import mean_sem

    models: dict[str, Any] = {}
    methods = compared_methods([run for item in items for run in item.runs])
    for spec in specs:
        accuracy, judged = _rate([item.correct.get(spec) for item in items])
        failed = sum(1 for item in items for run in item.runs if run.spec == spec and run.error)
        human = {
            method: mean_sem([item.human.get(spec, {}).get(method, np.nan) for item in items
                              if item.human.get(spec)]).to_dict()
            for method in methods
            if any(method in item.human.get(spec, {}) for item in items)
        }
        models[spec] = {"accuracy": accuracy, "judged": judged, "failed": failed,
                        "human_attention": human}
        share = _modality_summary(items, spec)
        if share is not None:
            models[spec]["modality_share"] = share
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
        "probability": None if run.explanation is None else run.explanation.probability,
        "answers": len(run.answers),
        "best_shared_answer": None if best is None else {"answer": best[0], "score": best[1]},
        "top_words": [{"word": w, "importance": v} for w, v in top_words(run)],
        "modality_share": modality_share(run),
        "unavailable": dict(run.unavailable),
        "seconds": round(run.seconds, 4),
    }
    if full:
        entry["explanation"] = run.doc
    return entry


@dataclass(frozen=True)
class CompareModel:
    """One model of a comparison as a worker loads it: label, spec, loader options
    (``ModelOptions.extra``)."""

    label: str
    spec: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompareConfig:
    """A data-set comparison as an executor's work (picklable): each worker loads every
    model once and returns ``(key, ItemResult or None)`` per item (None: the image cannot
    be read). ``threads``: torch CPU threads per worker (None: leave as is)."""

    models: tuple[CompareModel, ...]
    methods: tuple[str, ...]
    settings: Any  # MethodSettings
    answer: str | None = None
    k: int = 10
    threads: int | None = None
    metrics: bool = False

    def load(self) -> CompareWorker:
        """Load every model and bind the methods."""
        from blackbox_vqa.specs import ModelOptions, load_model

        explainers = {}
        for model in self.models:
            loaded = load_model(model.spec, ModelOptions(extra=model.options))
            explainers[model.label] = Explainer(loaded, methods=self.methods,
                                                settings=self.settings, label=model.label)
        check_shared_answer(self.answer, {label: e.model for label, e in explainers.items()})
        return CompareWorker(explainers, self)

    def failed(self, item: Any, reason: str, detail: str) -> tuple[str, ItemResult]:
        """Every model's run of an item no worker could finish fails with ``reason``."""
        runs = [ModelRun(model.label, (), np.zeros(0), None, error=reason)
                for model in self.models]
        return str(item.key), item_result(item, runs, [], k=self.k,
                                          answer_given=self.answer is not None)


class CompareWorker:
    """Every model of a comparison, loaded: explains items one at a time."""

    def __init__(self, explainers: Mapping[str, Explainer], config: CompareConfig) -> None:
        self.explainers = dict(explainers)
        self.config = config

    @property
    def unavailable(self) -> Mapping[str, str]:
        return {}

    def evaluate(
        self, item: Any, *, files: Mapping[str, bytes] | None = None
    ) -> tuple[str, ItemResult | None]:
        """``(key, every model's run scored)``, or ``(key, None)`` for an unreadable image."""
        from blackbox_vqa.datasets import human_maps
        from blackbox_vqa.errors import ImageError
        from blackbox_vqa.images import load_image

        given = files or {}
        try:
            pixels = load_image(item.image, content=given.get(item.image))
        except ImageError:
            return str(item.key), None
        runs = [explain_model(label, explainer, pixels, item.question,
                              image_path=str(item.image), answer=self.config.answer)
                for label, explainer in self.explainers.items()]
        if self.config.metrics:
            runs = [self._with_metrics(run, pixels) for run in runs]
        maps = human_maps(item, pixels, files=given)
        return str(item.key), item_result(item, runs, maps, k=self.config.k,
                                          answer_given=self.config.answer is not None)

    def _with_metrics(self, run: ModelRun, pixels: NDArray[Any]) -> ModelRun:
        options = self.config.settings
        return with_metrics(run, self.explainers[run.spec].model, pixels,
                            baseline=options.baseline, batch_size=options.batch_size)


def with_metrics(run: ModelRun, model: Any, pixels: NDArray[Any], *, baseline: str,
                 batch_size: str) -> ModelRun:
    """The run with its explanation's ``metrics`` section (a failed run as it is)."""
    from blackbox_vqa.evaluation.metrics import explanation_metrics

    if run.explanation is None:
        return run
    metrics = explanation_metrics(model, pixels, run.explanation, baseline=baseline,
                                  batch_size=batch_size)
    sections = {**run.explanation.sections, "metrics": metrics}
    return replace(run, explanation=replace(run.explanation, sections=sections))

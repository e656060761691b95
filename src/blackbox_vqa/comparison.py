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
    "METHODS",
    "CompareSettings",
    "ModelRun",
    "PairResult",
    "best_shared_answer",
    "check_shared_answer",
    "explain_model",
    "guided_backprop_section",
    "pair_results",
    "shared_answers",
    "top_words",
]

METHODS = ("occlusion", "guided-bp")
"""Methods a comparison runs, each where the model supports it."""

_SECTION = {"occlusion": "occlusion", "guided-bp": "guided_backprop"}

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
        if not isinstance(section, Mapping):
            return None, None
        image = section.get("image")
        words = section.get("words")
        return (
            np.asarray(image, dtype=np.float64) if image is not None else None,
            np.asarray(words, dtype=np.float64) if words is not None else None,
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


def guided_backprop_section(
    model: object, pixels: NDArray[Any], question: str, answer: str
) -> dict[str, Any]:
    """The ``guided_backprop`` section (DESIGN.md): ``image`` = max over channels of
    ``|gradient|`` at model resolution, ``words`` = L2 norm of each word's embedding
    gradient (None when the model has no word gradients).

    Raises :class:`blackbox_vqa.errors.GradientUnavailableError` for a model without
    the gradient protocol.
    """
    from blackbox_vqa.adapters.gradients import has_gradients
    from blackbox_vqa.errors import GradientUnavailableError

    if not has_gradients(model):
        raise GradientUnavailableError(
            "guided backpropagation needs gradients, which this model does not offer (a "
            "PyTorch module, or a graph exported with bbvqa export, does); occlusion works "
            "on any model"
        )
    grads = model.input_gradients(  # type: ignore[attr-defined]
        pixels, question, answer=answer, guided=True
    )
    image = np.abs(np.asarray(grads.image, dtype=np.float64)).max(axis=0)
    words = None
    if grads.words is not None:
        words = np.linalg.norm(np.asarray(grads.words, dtype=np.float64), axis=1).tolist()
    return {"image": image.tolist(), "words": words, "guided": bool(grads.guided),
            "words_note": grads.words_note or None}


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
    progress: Callable[[int, int], None] | None = None,
) -> ModelRun:
    """Every method ``model`` supports on one input; failures are recorded, not raised.

    Occlusion runs on every model; a model error there fails the run. Any other method
    that cannot run (no gradients, or an error of its own) is listed in ``unavailable``.
    """
    answers = tuple(model.answers)
    started = time.perf_counter()
    try:
        result, doc = _occlusion_doc(name, model, pixels, question, image_info,
                                     settings, progress)
    except (ModelError, InputError) as exc:
        return ModelRun(spec, name, answers, np.zeros(0), None, error=str(exc),
                        seconds=time.perf_counter() - started)
    unavailable: dict[str, str] = {}
    gb_started = time.perf_counter()
    try:
        doc["guided_backprop"] = guided_backprop_section(model, pixels, question, result.answer)
        doc["timing"]["guided_backprop_s"] = round(time.perf_counter() - gb_started, 4)
    except BlackboxVQAError as exc:
        unavailable["guided-bp"] = str(exc)
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
            if image_a is None and words_a is None or image_b is None and words_b is None:
                continue
            agreement = pair_agreement(image_a, words_a, image_b, words_b, k=k)
            found.append(PairResult(a.spec, b.spec, method, agreement, same))
    return found

"""What the HTML report shows, as plain frozen data, and how it is read from results.

A report holds *items* (one image and question each); an item holds one :class:`ModelView`
per model, each with one :class:`MethodView` per explanation method (its image and word
maps, or the reason it is not available), and agreement matrices between models or
methods. :func:`model_view` reads a model's view from an ``explanation.json`` document,
so ``bbvqa explain``, ``compare`` and ``evaluate`` share one reader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.evaluation.agreement import EVAL_SIZE, pair_agreement
from blackbox_vqa.explanation import SCHEMA, Explanation, TokenMaps

__all__ = [
    "AgreementView",
    "ItemView",
    "MethodView",
    "ModelView",
    "ReportView",
    "TableView",
    "TokenView",
    "agreement_views",
    "explanation_report",
    "method_views",
    "model_view",
]

@dataclass(frozen=True)
class TokenView:
    """One answer token's maps (a method's per-token maps): ``text`` the token decoded,
    ``logprob`` its log-probability given its prefix on the original input."""

    text: str
    logprob: float
    image_map: NDArray[np.float64] | None
    word_map: NDArray[np.float64] | None


@dataclass(frozen=True)
class MethodView:
    """One method's result for one model: maps, or why the method is not available.

    ``image_map`` is 2-D (a ``grid x grid`` lattice or a per-pixel map); ``word_map``
    has one value per word of the question, or per token in ``words`` when the method
    saw other tokens. Both maps are None when ``unavailable`` is set. ``answer_tokens``
    holds one view per answer token when the method gave per-token maps.
    """

    name: str
    image_map: NDArray[np.float64] | None = None
    word_map: NDArray[np.float64] | None = None
    signed: bool = True
    unavailable: str | None = None
    words: tuple[str, ...] | None = None
    answer_tokens: tuple[TokenView, ...] = ()


@dataclass(frozen=True)
class ModelView:
    """One model's answer and explanations (``failed`` holds the error of a failed run)."""

    name: str
    answer: str | None = None
    probability: float | None = None
    top_answers: tuple[tuple[str, float], ...] = ()
    log_probability: float | None = None
    words: tuple[str, ...] = ()
    methods: tuple[MethodView, ...] = ()
    flips: str | None = None
    seconds: float | None = None
    facts: tuple[tuple[str, str], ...] = ()
    failed: str | None = None


@dataclass(frozen=True)
class AgreementView:
    """A square matrix ``values[i, j]`` between ``labels``; ``nan`` shows as n/a.

    ``low``/``high`` give the value range the cell colours span.
    """

    title: str
    labels: tuple[str, ...]
    values: NDArray[np.float64]
    low: float = -1.0
    high: float = 1.0


@dataclass(frozen=True)
class TableView:
    """A plain table of text cells (dataset summaries, accuracies...)."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ItemView:
    """One image and question with every model's view of it."""

    question: str
    image: NDArray[Any] | None
    image_name: str
    models: tuple[ModelView, ...]
    agreements: tuple[AgreementView, ...] = ()
    heading: str | None = None


@dataclass(frozen=True)
class ReportView:
    """The whole report."""

    title: str
    items: tuple[ItemView, ...]
    tables: tuple[TableView, ...] = ()
    notes: tuple[str, ...] = ()
    footer: tuple[tuple[str, str], ...] = field(default=())


def _as_explanation(found: Explanation | Mapping[str, Any]) -> Explanation:
    """An :class:`Explanation`, read from an ``explanation.json`` document if need be."""
    if isinstance(found, Explanation):
        return found
    from blackbox_vqa.explainers.registry import method_keys

    return Explanation.from_dict(found, method_keys())


def method_views(
    found: Explanation | Mapping[str, Any], unavailable: Mapping[str, str] | None = None
) -> tuple[MethodView, ...]:
    """The methods of an explanation, in registry order (an unavailable method gives an
    unavailable view), then one unavailable view per further entry of ``unavailable``
    (method name -> reason)."""
    from blackbox_vqa.explainers.registry import get_method, method_names

    explanation = _as_explanation(found)
    views: list[MethodView] = []
    order = [*method_names(), *explanation.attributions, *explanation.unavailable]
    for name in dict.fromkeys(order):
        gone = explanation.unavailable.get(name)
        attribution = explanation.attributions.get(name)
        if gone is not None:
            views.append(MethodView(name, signed=_signed(name, get_method),
                                    unavailable=gone.reason or "not available"))
            continue
        if attribution is None:
            continue
        image_map = attribution.image_map if attribution.image_map.size else None
        word_map = attribution.word_map if attribution.word_map.size else None
        if image_map is None and word_map is None:
            continue
        words = (attribution.tokens if attribution.tokens != explanation.tokens else None)
        views.append(MethodView(name, image_map, word_map, attribution.signed,
                                words=words or None,
                                answer_tokens=_token_views(attribution.answer_tokens)))
    present = {view.name for view in views}
    for name, reason in (unavailable or {}).items():
        if name not in present:
            views.append(MethodView(name, signed=_signed(name, get_method), unavailable=reason))
    return tuple(views)


def _token_views(maps: TokenMaps | None) -> tuple[TokenView, ...]:
    if maps is None:
        return ()
    return tuple(
        TokenView(text, float(logprob), image if image.size else None,
                  words if words.size else None)
        for text, logprob, image, words in zip(maps.texts, maps.logprobs, maps.image_maps,
                                               maps.word_maps, strict=True))


def _signed(name: str, lookup: Any) -> bool:
    from blackbox_vqa.errors import InputError

    try:
        return bool(lookup(name).signed)
    except InputError:
        return False


def _flips(explanation: Explanation) -> str | None:
    occlusion = explanation.attribution("occlusion")
    flips = None if occlusion is None else occlusion.extras.get("flips")
    if not isinstance(flips, Mapping):
        return None
    return (
        f"{flips.get('image', 0)}/{flips.get('image_total', 0)} cells, "
        f"{flips.get('words', 0)}/{flips.get('words_total', 0)} words"
    )


def _seconds(explanation: Explanation) -> float | None:
    if not explanation.attributions:
        return None
    return float(sum(a.seconds for a in explanation.attributions.values()))


def model_view(
    found: Explanation | Mapping[str, Any],
    *,
    name: str | None = None,
    unavailable: Mapping[str, str] | None = None,
    facts: Sequence[tuple[str, str]] = (),
) -> ModelView:
    """A model's view of an :class:`Explanation` (or its ``explanation.json`` document)."""
    explanation = _as_explanation(found)
    semantics = explanation.sections.get("score_semantics") or {}
    sequence = semantics.get("kind") == "sequence"  # one answer beside "(other)": no ranking
    return ModelView(
        name=str(name if name is not None else explanation.model),
        answer=explanation.answer,
        probability=explanation.probability,
        top_answers=() if sequence else tuple(explanation.top_answers),
        log_probability=(float(np.log(explanation.probability))
                         if sequence and explanation.probability > 0 else None),
        words=explanation.tokens,
        methods=method_views(explanation, unavailable),
        flips=_flips(explanation),
        seconds=_seconds(explanation),
        facts=(*facts, *_method_facts(explanation), *_check_facts(explanation.sections)),
    )


def _method_facts(explanation: Explanation) -> tuple[tuple[str, str], ...]:
    """Facts a method's section states beyond its maps: MM-SHAP's modality shares."""
    facts: list[tuple[str, str]] = []
    for attribution in explanation.attributions.values():
        extras = attribution.extras
        if "t_shap" not in extras:
            continue
        label = f"{attribution.method}: T-SHAP (question) / V-SHAP (image)"
        if extras.get("t_shap") is None:
            facts.append((label, "undefined (every Shapley value is 0)"))
            continue
        se = extras.get("t_shap_se")
        facts.append((label, f"{_number(extras['t_shap'])}"
                      + ("" if se is None else f" ± {_number(se)}")
                      + f" / {_number(extras.get('v_shap'))} "
                      f"({extras.get('permutations_walked')} permutations, "
                      f"{extras.get('evaluations')} model inputs)"))
    return tuple(facts)


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _check_facts(sections: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Facts from the ``metrics`` and ``sanity`` sections, if the explanation has them."""
    facts: list[tuple[str, str]] = []
    for name, entry in (sections.get("metrics") or {}).items():
        image, words = entry.get("image"), entry.get("words")
        if image:
            facts.append((f"{name}: deletion / insertion AUC (random)",
                          f"{_number(image['deletion_auc'])} / "
                          f"{_number(image['insertion_auc'])} "
                          f"({_number(image['random_deletion_auc'])} / "
                          f"{_number(image['random_insertion_auc'])})"))
        if words:
            facts.append((f"{name}: comprehensiveness / sufficiency (random)",
                          f"{_number(words['comprehensiveness'])} / "
                          f"{_number(words['sufficiency'])} "
                          f"({_number(words['random_comprehensiveness'])} / "
                          f"{_number(words['random_sufficiency'])})"))
    for name, entry in (sections.get("sanity") or {}).items():
        if entry.get("available") is False:
            facts.append((f"{name}: sanity check", f"not available: {entry['reason']}"))
        else:
            facts.append((f"{name}: rank corr. after randomising all layers",
                          f"{_number(entry['final_spearman'])} "
                          f"({'passes' if entry['passes'] else 'fails'})"))
    return tuple(facts)


def _matrix(
    pairs: Sequence[tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]],
    measure: str,
    k: int,
) -> NDArray[np.float64]:
    n = len(pairs)
    values = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i, n):
            found = pair_agreement(pairs[i][0], pairs[i][1], pairs[j][0], pairs[j][1], k=k)
            value: Any = getattr(found, measure)
            values[i, j] = values[j, i] = np.nan if value is None else float(value)
    return values


def agreement_views(
    subject: str,
    labels: Sequence[str],
    maps: Sequence[tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]],
    *,
    k: int = 10,
) -> tuple[AgreementView, ...]:
    """Three matrices between ``labels`` (their ``(image_map, word_map)`` in ``maps``):
    rank correlation of ``|image maps|`` at 14 x 14, top-``k`` cell overlap, and whether
    the most important word is the same (1 yes, 0 no)."""
    names = tuple(labels)
    size = EVAL_SIZE
    return (
        AgreementView(f"{subject}: rank correlation of |image maps| ({size}x{size})", names,
                      _matrix(maps, "rank_correlation", k)),
        AgreementView(f"{subject}: overlap of the top {k} of {size * size} cells", names,
                      _matrix(maps, "top_k_overlap", k), 0.0, 1.0),
        AgreementView(f"{subject}: same most important word (1 = yes)", names,
                      _matrix(maps, "same_top_word", k), 0.0, 1.0),
    )


def explanation_report(
    found: Explanation | Mapping[str, Any], image: NDArray[Any] | None, *, k: int = 10
) -> ReportView:
    """The report of one ``bbvqa explain`` result (methods compared when there are two+)."""
    explanation = _as_explanation(found)
    view = model_view(explanation)
    image_name = str(explanation.image.get("path") or "")
    shown = [m for m in view.methods if m.unavailable is None]
    agreements: tuple[AgreementView, ...] = ()
    if len(shown) >= 2:
        agreements = agreement_views(
            "methods", [m.name for m in shown], [(m.image_map, m.word_map) for m in shown], k=k
        )
    item = ItemView(
        question=explanation.question,
        image=image,
        image_name=image_name,
        models=(view,),
        agreements=agreements,
    )
    footer = tuple((key, value) for key, value in (
        ("created", explanation.created), ("version", explanation.version),
        ("schema", SCHEMA)) if value)
    return ReportView(title=f"bbvqa explain: {view.name}", items=(item,), footer=footer,
                      notes=_score_notes(explanation))


def _score_notes(explanation: Explanation) -> tuple[str, ...]:
    """What a reader must know about the scores: answer-only flip maps, a fallback of the
    score kind, a server that seems to ignore the image."""
    semantics = explanation.sections.get("score_semantics")
    notes: list[str] = []
    if isinstance(semantics, Mapping):
        if semantics.get("kind") == "answer_only":
            notes.append("answer-only: maps show answer flips, not probabilities")
        notes.extend(str(n) for n in semantics.get("notes", ()) if str(n) not in notes)
    warnings = explanation.sections.get("warnings")
    if isinstance(warnings, list):
        notes.extend(f"warning: {w}" for w in warnings)
    return tuple(notes)

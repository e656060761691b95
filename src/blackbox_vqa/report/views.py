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

__all__ = [
    "METHOD_SECTIONS",
    "AgreementView",
    "ItemView",
    "MethodView",
    "ModelView",
    "ReportView",
    "TableView",
    "agreement_views",
    "explanation_report",
    "method_views",
    "model_view",
]

METHOD_SECTIONS: tuple[tuple[str, str, bool], ...] = (
    ("occlusion", "occlusion", True),
    ("guided_backprop", "guided-bp", False),
    ("gradient", "gradient", False),
)
"""``(explanation.json key, method name, signed)`` of the methods a report can show.

Signed maps (occlusion: a drop in probability, possibly negative) get a diverging colour
scale centred on zero; unsigned ones (gradient magnitudes) a scale from zero."""

_SIGNED = {name: signed for _, name, signed in METHOD_SECTIONS}


@dataclass(frozen=True)
class MethodView:
    """One method's result for one model: maps, or why the method is not available.

    ``image_map`` is 2-D (a ``grid x grid`` lattice or a per-pixel map); ``word_map``
    has one value per word of the question, or per token in ``words`` when the method
    saw other tokens. Both maps are None when ``unavailable`` is set.
    """

    name: str
    image_map: NDArray[np.float64] | None = None
    word_map: NDArray[np.float64] | None = None
    signed: bool = True
    unavailable: str | None = None
    words: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelView:
    """One model's answer and explanations (``failed`` holds the error of a failed run)."""

    name: str
    answer: str | None = None
    probability: float | None = None
    top_answers: tuple[tuple[str, float], ...] = ()
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


def _array(values: Any, ndim: int) -> NDArray[np.float64] | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    return array if array.ndim == ndim and array.size else None


def method_views(
    doc: Mapping[str, Any], unavailable: Mapping[str, str] | None = None
) -> tuple[MethodView, ...]:
    """The methods an ``explanation.json`` document holds, in ``METHOD_SECTIONS`` order
    (a section ``{"available": false, "reason": ...}`` gives an unavailable view), then
    one unavailable view per further entry of ``unavailable`` (method name -> reason)."""
    views: list[MethodView] = []
    for key, name, signed in METHOD_SECTIONS:
        section = doc.get(key)
        if not isinstance(section, Mapping):
            continue
        if section.get("available") is False:
            reason = str(section.get("reason") or "not available")
            views.append(MethodView(name, signed=signed, unavailable=reason))
            continue
        image_map = _array(section.get("image"), 2)
        word_map = _array(section.get("words"), 1)
        if image_map is None and word_map is None:
            continue
        tokens = section.get("tokens")
        words = tuple(str(t) for t in tokens) if isinstance(tokens, list) and tokens else None
        views.append(MethodView(name, image_map, word_map, signed, words=words))
    present = {view.name for view in views}
    for name, reason in (unavailable or {}).items():
        if name not in present:
            views.append(MethodView(name, signed=_SIGNED.get(name, False), unavailable=reason))
    return tuple(views)


def _flips(doc: Mapping[str, Any]) -> str | None:
    section = doc.get("occlusion")
    flips = section.get("flips") if isinstance(section, Mapping) else None
    if not isinstance(flips, Mapping):
        return None
    return (
        f"{flips.get('image', 0)}/{flips.get('image_total', 0)} cells, "
        f"{flips.get('words', 0)}/{flips.get('words_total', 0)} words"
    )


def _seconds(doc: Mapping[str, Any]) -> float | None:
    timing = doc.get("timing")
    if not isinstance(timing, Mapping) or not timing:
        return None
    return float(sum(float(v) for v in timing.values() if isinstance(v, (int, float))))


def model_view(
    doc: Mapping[str, Any],
    *,
    name: str | None = None,
    unavailable: Mapping[str, str] | None = None,
    facts: Sequence[tuple[str, str]] = (),
) -> ModelView:
    """A model's view from its ``explanation.json`` document."""
    top = tuple(
        (str(entry["answer"]), float(entry["score"])) for entry in doc.get("top_answers", [])
    )
    probability = doc.get("probability")
    return ModelView(
        name=str(name if name is not None else doc.get("model", "model")),
        answer=str(doc["answer"]) if doc.get("answer") is not None else None,
        probability=float(probability) if probability is not None else None,
        top_answers=top,
        words=tuple(str(w) for w in doc.get("tokens", [])),
        methods=method_views(doc, unavailable),
        flips=_flips(doc),
        seconds=_seconds(doc),
        facts=tuple(facts),
    )


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
    doc: Mapping[str, Any], image: NDArray[Any] | None, *, k: int = 10
) -> ReportView:
    """The report of one ``bbvqa explain`` result (methods compared when there are two+)."""
    view = model_view(doc)
    image_info = doc.get("image")
    image_name = str(image_info.get("path", "")) if isinstance(image_info, Mapping) else ""
    shown = [m for m in view.methods if m.unavailable is None]
    agreements: tuple[AgreementView, ...] = ()
    if len(shown) >= 2:
        agreements = agreement_views(
            "methods", [m.name for m in shown], [(m.image_map, m.word_map) for m in shown], k=k
        )
    item = ItemView(
        question=str(doc.get("question", "")),
        image=image,
        image_name=image_name,
        models=(view,),
        agreements=agreements,
    )
    footer = tuple(
        (key, str(doc[key])) for key in ("created", "version", "schema") if doc.get(key)
    )
    return ReportView(title=f"bbvqa explain: {view.name}", items=(item,), footer=footer)

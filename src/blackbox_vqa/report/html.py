"""The HTML report: one self-contained file that needs no network and runs no script.

Images are PNG data URIs, styles are inline, and a Content-Security-Policy forbids every
remote load and every script (``default-src 'none'; img-src data:; style-src
'unsafe-inline'``), so the page works offline and from a mail attachment. Every string
that comes from outside (questions, answers, model names, file names, error messages) is
HTML-escaped: the page is rendered from Jinja2 templates (``templates/``) with autoescaping
on, and this module hands them only plain strings, never markup. Each model's heat maps of
one method share one colour scale, as do its word bars, so models can be compared by eye.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from numpy.typing import NDArray

from blackbox_vqa.explanation import Explanation, probability_text
from blackbox_vqa.outputs import atomic_write_text
from blackbox_vqa.report.overlays import (
    ColourScale,
    colour_bar_png,
    heatmap_png,
    image_png,
    png_data_uri,
    shared_scale,
)
from blackbox_vqa.report.views import (
    AgreementView,
    ItemView,
    MethodView,
    ModelView,
    ReportView,
    explanation_report,
)
from blackbox_vqa.text import terminal_safe

__all__ = ["CSP", "render_report", "write_explanation_report", "write_report"]

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

def _no_control_bytes(value: object) -> object:
    """Text shown in the report with its control characters (ESC, BEL...) escaped
    visibly (``\\x1b``), as on the terminal; markup built by the report is left alone."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return terminal_safe(value, newlines=True)
    return value


_TEMPLATES = Environment(
    loader=PackageLoader("blackbox_vqa.report", "templates"),
    autoescape=True,
    finalize=_no_control_bytes,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)

def _method_help(name: str) -> str:
    """The registry's help text of a method ("" for one that is not registered)."""
    from blackbox_vqa.errors import InputError
    from blackbox_vqa.explainers.registry import get_method

    try:
        return get_method(name).help
    except InputError:
        return ""


# What the templates see: plain strings (escaped there) and numbers formatted here.


@dataclass(frozen=True)
class _Legend:
    method: str
    uri: str
    low: str
    middle: str
    high: str
    help: str


@dataclass(frozen=True)
class _Figure:
    kind: Literal["photo", "heatmap", "unavailable"]
    method: str = ""
    uri: str = ""
    caption: str = ""


@dataclass(frozen=True)
class _WordRow:
    word: str
    negative: bool
    width: str
    value: str


@dataclass(frozen=True)
class _WordTable:
    method: str
    bar_class: str
    rows: tuple[_WordRow, ...]


@dataclass(frozen=True)
class _TokenFigure:
    text: str
    logprob: str
    uri: str
    top_word: str


@dataclass(frozen=True)
class _TokenStrip:
    method: str
    scale: str
    tokens: tuple[_TokenFigure, ...]


@dataclass(frozen=True)
class _ModelPart:
    name: str
    failed: str | None
    facts: tuple[tuple[str, str], ...] = ()
    figures: tuple[_Figure, ...] = ()
    word_tables: tuple[_WordTable, ...] = ()
    strips: tuple[_TokenStrip, ...] = ()


@dataclass(frozen=True)
class _Cell:
    text: str
    background: str  # "rgb(r,g,b)", or "" for no colour


@dataclass(frozen=True)
class _AgreementRow:
    label: str
    cells: tuple[_Cell, ...]


@dataclass(frozen=True)
class _AgreementTable:
    title: str
    labels: tuple[str, ...]
    rows: tuple[_AgreementRow, ...]


@dataclass(frozen=True)
class _ItemPart:
    heading: str | None
    question: str
    image_name: str
    legends: tuple[_Legend, ...]
    models: tuple[_ModelPart, ...]
    agreements: tuple[_AgreementTable, ...]


def _number(value: float | None, spec: str = "+.3g") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def _method_maps(item: ItemView) -> dict[str, list[MethodView]]:
    """Available method views of every model, grouped by method name in first-seen order."""
    grouped: dict[str, list[MethodView]] = {}
    for model in item.models:
        for method in model.methods:
            grouped.setdefault(method.name, [])
            if method.unavailable is None:
                grouped[method.name].append(method)
    return grouped


def _scales(item: ItemView) -> tuple[dict[str, ColourScale], dict[str, float]]:
    """Per method: the colour scale of its image maps and the bound of its word bars."""
    image_scales: dict[str, ColourScale] = {}
    word_bounds: dict[str, float] = {}
    for name, views in _method_maps(item).items():
        signed = views[0].signed if views else True
        maps = [v.image_map for v in views if v.image_map is not None]
        image_scales[name] = shared_scale(maps, signed=signed)
        words = [np.abs(v.word_map) for v in views if v.word_map is not None and v.word_map.size]
        word_bounds[name] = max((float(w.max()) for w in words), default=0.0)
    return image_scales, word_bounds


def _legend(name: str, scale: ColourScale) -> _Legend:
    return _Legend(
        method=name,
        uri=png_data_uri(colour_bar_png(scale)),
        low=_number(scale.vmin),
        middle=_number((scale.vmin + scale.vmax) / 2),
        high=_number(scale.vmax),
        help=_method_help(name),
    )


def _figures(
    model: ModelView, image: NDArray[Any] | None, scales: Mapping[str, ColourScale]
) -> tuple[_Figure, ...]:
    figures: list[_Figure] = []
    if image is not None:
        figures.append(_Figure("photo", uri=png_data_uri(image_png(image))))
    for method in model.methods:
        if method.unavailable is not None:
            figures.append(_Figure("unavailable", method.name, caption=method.unavailable))
        elif method.image_map is not None and image is not None:
            uri = png_data_uri(heatmap_png(image, method.image_map, scales[method.name]))
            figures.append(_Figure("heatmap", method.name, uri=uri))
    return tuple(figures)


def _strip_scale(maps: list[NDArray[np.float64]], signed: bool) -> ColourScale:
    """One scale for a strip: ``±max|v|`` when signed, else its own ``min..max`` (per-token
    maps of an unsigned method are log-probabilities, all negative)."""
    if signed or not maps:
        return shared_scale(maps, signed=signed)
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    return ColourScale(low, high if high > low else low + 1e-12, "Reds")


def _token_strips(model: ModelView, image: NDArray[Any] | None) -> tuple[_TokenStrip, ...]:
    """Per method with per-answer-token maps: the small maps, one per token, on one scale
    shared by the strip (the main map's scale is the method's, across models)."""
    strips = []
    for method in model.methods:
        if method.unavailable is not None or not method.answer_tokens:
            continue
        maps = [t.image_map for t in method.answer_tokens if t.image_map is not None]
        scale = _strip_scale(maps, method.signed)
        labels = method.words or model.words
        figures = []
        for token in method.answer_tokens:
            uri = ""
            if token.image_map is not None and image is not None:
                uri = png_data_uri(heatmap_png(image, token.image_map, scale))
            top = ""
            if token.word_map is not None and token.word_map.size:
                index = int(np.argmax(token.word_map))
                word = labels[index] if index < len(labels) else f"#{index}"
                top = f"top word {word} {_number(float(token.word_map[index]))}"
            figures.append(_TokenFigure(repr(token.text), _number(token.logprob, "+.3f"),
                                        uri, top))
        strips.append(_TokenStrip(
            method.name, f"{_number(scale.vmin)} to {_number(scale.vmax)}", tuple(figures)))
    return tuple(strips)


def _word_table(model: ModelView, method: MethodView, bound: float) -> _WordTable | None:
    if method.word_map is None:
        return None
    labels = method.words or model.words
    rows = []
    for i, raw in enumerate(method.word_map):
        value = float(raw)
        share = 0.0 if bound <= 0 else min(abs(value) / bound, 1.0) * 100
        rows.append(_WordRow(
            word=labels[i] if i < len(labels) else f"#{i}",
            negative=value < 0,
            width=f"{share:.1f}",
            value=_number(value),
        ))
    return _WordTable(method.name, "bar" if method.signed else "bar unsigned", tuple(rows))


def _facts(model: ModelView) -> tuple[tuple[str, str], ...]:
    facts: list[tuple[str, str]] = []
    if model.answer is not None:
        facts.append(("answer", model.answer))
    if model.probability is not None:
        logs = "" if model.log_probability is None else f" (log {model.log_probability:.4f})"
        facts.append(("probability", probability_text(model.probability) + logs))
    if model.top_answers:
        facts.append(("top answers", ", ".join(f"{a} {s:.3f}" for a, s in model.top_answers)))
    if model.flips is not None:
        facts.append(("answer flips", str(model.flips)))
    if model.seconds is not None:
        facts.append(("time", f"{model.seconds:.2f} s"))
    facts.extend((str(key), str(value)) for key, value in model.facts)
    return tuple(facts)


def _model_part(
    model: ModelView,
    image: NDArray[Any] | None,
    scales: Mapping[str, ColourScale],
    bounds: Mapping[str, float],
) -> _ModelPart:
    if model.failed is not None:
        return _ModelPart(model.name, model.failed)
    tables = (_word_table(model, m, bounds.get(m.name, 0.0))
              for m in model.methods if m.unavailable is None)
    return _ModelPart(
        name=model.name,
        failed=None,
        facts=_facts(model),
        figures=_figures(model, image, scales),
        word_tables=tuple(t for t in tables if t is not None),
        strips=_token_strips(model, image),
    )


def _cell_background(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return ""
    colour = ColourScale(low, high, "RdBu_r" if low < 0 else "Greens").colours(
        np.asarray([value])
    )[0]
    light = np.round(0.55 * colour + 0.45 * 255).astype(int)
    return f"rgb({light[0]},{light[1]},{light[2]})"


def _agreement_table(view: AgreementView) -> _AgreementTable:
    rows = tuple(
        _AgreementRow(label, tuple(
            _Cell(_number(float(v), ".3f"), _cell_background(float(v), view.low, view.high))
            for v in values
        ))
        for label, values in zip(view.labels, view.values, strict=True)
    )
    return _AgreementTable(view.title, tuple(view.labels), rows)


def _item_part(item: ItemView) -> _ItemPart:
    scales, bounds = _scales(item)
    shown = _method_maps(item)
    return _ItemPart(
        heading=item.heading,
        question=item.question,
        image_name=item.image_name,
        legends=tuple(_legend(name, scale) for name, scale in scales.items() if shown[name]),
        models=tuple(_model_part(m, item.image, scales, bounds) for m in item.models),
        agreements=tuple(_agreement_table(view) for view in item.agreements),
    )


def render_report(view: ReportView) -> str:
    """The report as one HTML document (a string)."""
    items = [_item_part(item) for item in view.items]
    return _TEMPLATES.get_template("report.html.j2").render(
        csp=CSP,
        title=view.title,
        notes=view.notes,
        tables=view.tables,
        items=items,
        # the strips' styles only where there are strips: other reports stay as they were
        token_strips=any(model.strips for item in items for model in item.models),
        footer=view.footer,
    )


def write_report(path: str | os.PathLike[str], view: ReportView) -> Path:
    """Render ``view`` and write it atomically to ``path``."""
    return atomic_write_text(path, render_report(view))


def write_explanation_report(
    path: str | os.PathLike[str], found: Explanation | Mapping[str, Any], image: NDArray[Any]
) -> Path:
    """Write the report of one explanation (or its ``explanation.json`` document) and its
    image ``H x W x 3``."""
    return write_report(path, explanation_report(found, image))

"""The HTML report: one self-contained file that needs no network and runs no script.

Images are PNG data URIs, styles are inline, and a Content-Security-Policy forbids every
remote load and every script (``default-src 'none'; img-src data:; style-src
'unsafe-inline'``), so the page works offline and from a mail attachment. Every string
that comes from outside (questions, answers, model names, file names, error messages) is
HTML-escaped. Each model's heat maps of one method share one colour scale, as do its word
bars, so models can be compared by eye.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

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
    TableView,
    explanation_report,
)

__all__ = ["CSP", "render_report", "write_explanation_report", "write_report"]

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5em;
color:#1d232a;background:#fff;line-height:1.4}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.25em;margin:1.2em 0 .3em}
h3{font-size:1.05em;margin:1em 0 .3em}
.question{font-size:1.15em;margin:.2em 0 1em}.muted{color:#5b6570}
.item{border-top:2px solid #d5dbe1;margin-top:1.5em}
.model{border:1px solid #d5dbe1;border-radius:6px;padding:.6em 1em;margin:1em 0}
.model.failed{border-color:#c0392b;background:#fdf2f1}
.maps{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0}figcaption{font-size:.85em;color:#5b6570;max-width:240px}
img.photo,img.heatmap{width:224px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
.na{width:224px;height:224px;display:flex;align-items:center;justify-content:center;
text-align:center;background:#f1f3f5;color:#5b6570;border:1px dashed #aab}
.scales{display:flex;flex-wrap:wrap;gap:24px;margin:.5em 0}
.scale img{width:256px;height:14px;display:block;border:1px solid #ccc}
.scale .ends{display:flex;justify-content:space-between;font-size:.8em;width:258px}
.scale .help{font-size:.8em;color:#5b6570;max-width:300px}
table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #d5dbe1;padding:2px 8px;font-size:.9em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.wordlists{display:flex;flex-wrap:wrap;gap:24px}
.bar{display:flex;width:180px;height:12px}
.bar .neg,.bar .pos{flex:1;display:flex}.bar .neg{justify-content:flex-end}
.bar .neg span{background:#2e6da4}.bar .pos span{background:#c0392b}
.bar.unsigned .neg{display:none}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:0 1em;margin:.3em 0}
dl.facts dt{color:#5b6570}dl.facts dd{margin:0}
footer{margin-top:2em;font-size:.8em;color:#5b6570}
"""


def _e(text: object) -> str:
    """Escape any value for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


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


_METHOD_HELP = {
    "occlusion": "p(a | image) - p(a | cell hidden): red cells support the answer, blue "
                 "cells work against it",
    "guided-bp": "|guided gradient| at the model's input size, largest over the colour "
                 "channels",
    "gradient": "|gradient| at the model's input size, largest over the colour channels",
}


def _scale_legend(name: str, scale: ColourScale) -> str:
    middle = (scale.vmin + scale.vmax) / 2
    help_text = _METHOD_HELP.get(name, "")
    return (
        f'<div class="scale"><div>{_e(name)}</div>'
        f'<img class="colorbar" alt="{_e(name)} colour scale" '
        f'src="{_e(png_data_uri(colour_bar_png(scale)))}">'
        f'<div class="ends"><span>{_e(_number(scale.vmin))}</span>'
        f"<span>{_e(_number(middle))}</span><span>{_e(_number(scale.vmax))}</span></div>"
        f'<div class="help">{_e(help_text)}</div></div>'
    )


def _maps_row(
    model: ModelView, image: NDArray[Any] | None, scales: Mapping[str, ColourScale]
) -> str:
    parts: list[str] = []
    if image is not None:
        parts.append(
            f'<figure><img class="photo" alt="input image" '
            f'src="{_e(png_data_uri(image_png(image)))}"><figcaption>image</figcaption></figure>'
        )
    for method in model.methods:
        if method.unavailable is not None:
            parts.append(
                f'<figure class="unavailable"><div class="na">{_e(method.name)}<br>'
                f"not available</div><figcaption>{_e(method.unavailable)}</figcaption></figure>"
            )
        elif method.image_map is not None and image is not None:
            uri = png_data_uri(heatmap_png(image, method.image_map, scales[method.name]))
            parts.append(
                f'<figure><img class="heatmap" data-method="{_e(method.name)}" '
                f'alt="{_e(method.name)} heat map of {_e(model.name)}" src="{_e(uri)}">'
                f"<figcaption>{_e(method.name)}</figcaption></figure>"
            )
    return f'<div class="maps">{"".join(parts)}</div>'


def _bar(value: float, bound: float, signed: bool) -> str:
    share = 0.0 if bound <= 0 else min(abs(value) / bound, 1.0) * 100
    neg = f'<span style="width:{share:.1f}%"></span>' if value < 0 else ""
    pos = f'<span style="width:{share:.1f}%"></span>' if value >= 0 else ""
    kind = "bar" if signed else "bar unsigned"
    return f'<div class="{kind}"><div class="neg">{neg}</div><div class="pos">{pos}</div></div>'


def _word_table(model: ModelView, method: MethodView, bound: float) -> str:
    if method.word_map is None:
        return ""
    rows = []
    labels = method.words or model.words
    for i, value in enumerate(method.word_map):
        word = labels[i] if i < len(labels) else f"#{i}"
        rows.append(
            f"<tr><td>{_e(word)}</td><td>{_bar(float(value), bound, method.signed)}</td>"
            f'<td class="num">{_e(_number(float(value)))}</td></tr>'
        )
    return (
        f'<div><h3>words: {_e(method.name)}</h3><table class="words">'
        f"<tr><th>word</th><th>importance</th><th></th></tr>{''.join(rows)}</table></div>"
    )


def _facts(model: ModelView) -> str:
    facts: list[tuple[str, str]] = []
    if model.answer is not None:
        facts.append(("answer", model.answer))
    if model.probability is not None:
        facts.append(("probability", f"{model.probability:.4f}"))
    if model.top_answers:
        facts.append(("top answers", ", ".join(f"{a} {s:.3f}" for a, s in model.top_answers)))
    if model.flips is not None:
        facts.append(("answer flips", model.flips))
    if model.seconds is not None:
        facts.append(("time", f"{model.seconds:.2f} s"))
    facts.extend(model.facts)
    body = "".join(f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>" for key, value in facts)
    return f'<dl class="facts">{body}</dl>'


def _model_section(
    model: ModelView,
    image: NDArray[Any] | None,
    scales: Mapping[str, ColourScale],
    bounds: Mapping[str, float],
) -> str:
    if model.failed is not None:
        return (
            f'<section class="model failed"><h2>{_e(model.name)}</h2>'
            f"<p>failed: {_e(model.failed)}</p></section>"
        )
    words = "".join(
        _word_table(model, m, bounds.get(m.name, 0.0))
        for m in model.methods
        if m.unavailable is None
    )
    return (
        f'<section class="model"><h2>{_e(model.name)}</h2>{_facts(model)}'
        f"{_maps_row(model, image, scales)}"
        f'<div class="wordlists">{words}</div></section>'
    )


def _cell_style(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return ""
    colour = ColourScale(low, high, "RdBu_r" if low < 0 else "Greens").colours(
        np.asarray([value])
    )[0]
    light = np.round(0.55 * colour + 0.45 * 255).astype(int)
    return f' style="background:rgb({light[0]},{light[1]},{light[2]})"'


def _agreement_table(view: AgreementView) -> str:
    header = "".join(f"<th>{_e(label)}</th>" for label in view.labels)
    rows = []
    for label, values in zip(view.labels, view.values, strict=True):
        cells = "".join(
            f'<td class="num"{_cell_style(float(v), view.low, view.high)}>'
            f"{_e(_number(float(v), '.3f'))}</td>"
            for v in values
        )
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return (
        f'<div><h3>{_e(view.title)}</h3><table class="agreement">'
        f"<tr><th></th>{header}</tr>{''.join(rows)}</table></div>"
    )


def _plain_table(view: TableView) -> str:
    header = "".join(f"<th>{_e(cell)}</th>" for cell in view.header)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in view.rows
    )
    return f"<h2>{_e(view.title)}</h2><table><tr>{header}</tr>{rows}</table>"


def _item_section(item: ItemView) -> str:
    scales, bounds = _scales(item)
    shown = _method_maps(item)
    legends = "".join(_scale_legend(name, scale) for name, scale in scales.items()
                      if shown[name])
    heading = f"<h2>{_e(item.heading)}</h2>" if item.heading else ""
    models = "".join(_model_section(m, item.image, scales, bounds) for m in item.models)
    agreement = ""
    if item.agreements:
        agreement = '<h2>agreement</h2><div class="wordlists">' + "".join(
            _agreement_table(view) for view in item.agreements
        ) + "</div>"
    return (
        f'<section class="item">{heading}'
        f'<p class="question">Q: <strong>{_e(item.question)}</strong></p>'
        f'<p class="muted">image: {_e(item.image_name)}</p>'
        f'<div class="muted">colour scales, one per method, shared by every model:</div>'
        f'<div class="scales">{legends}</div>{models}{agreement}</section>'
    )


def render_report(view: ReportView) -> str:
    """The report as one HTML document (a string)."""
    tables = "".join(_plain_table(table) for table in view.tables)
    notes = "".join(f"<p class=\"muted\">{_e(note)}</p>" for note in view.notes)
    items = "".join(_item_section(item) for item in view.items)
    footer = " · ".join(f"{_e(k)}: {_e(v)}" for k, v in view.footer)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(view.title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{_e(view.title)}</h1>{notes}{tables}{items}"
        f"<footer>{footer}</footer></body></html>\n"
    )


def write_report(path: str | os.PathLike[str], view: ReportView) -> Path:
    """Render ``view`` and write it atomically to ``path``."""
    return atomic_write_text(path, render_report(view))


def write_explanation_report(
    path: str | os.PathLike[str], doc: Mapping[str, Any], image: NDArray[Any]
) -> Path:
    """Write the report of one ``explanation.json`` document and its image ``H x W x 3``."""
    return write_report(path, explanation_report(doc, image))

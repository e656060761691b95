"""Explanations in Jupyter: ``_repr_html_`` is the report's model card, escaped the same way,
and the documentation's notebook runs from top to bottom in a real kernel."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import blackbox_vqa  # noqa: F401  (installs the notebook display, as any import of the package does)
from blackbox_vqa.adapters.base import BaseAdapter
from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.registry import method_keys
from blackbox_vqa.explanation import Explanation
from blackbox_vqa.report.html import render_report
from blackbox_vqa.report.views import explanation_report
from blackbox_vqa.specs import load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "blue_circle.png"
HOSTILE = '<script>alert(1)</script>\x1b[31m"&'


def _srcdoc(shown: str) -> str:
    match = re.fullmatch(r'<iframe class="bbvqa-explanation" sandbox="" srcdoc="([^"]*)" .*'
                         r'</iframe>', shown, flags=re.S)
    assert match, shown[:200]
    return html.unescape(match.group(1))


def test_the_display_is_the_report_of_the_explanation() -> None:
    found = explain(load_model("easyvqa"), EXAMPLE, "what color is the shape?",
                    methods="occlusion,guided-bp")
    shown = found._repr_html_()
    assert shown is not None
    page = _srcdoc(shown)
    assert page == render_report(explanation_report(found, found.pixels))
    assert page.count('class="heatmap"') == 2 and "data:image/png;base64," in page
    for word in found.tokens:
        assert f"<td>{word}</td>" in page
    assert found.answer in page and "Content-Security-Policy" in page


class _HostileModel(BaseAdapter):
    """Answers an HTML/escape-sequence string; the score follows the image's brightness."""

    def __init__(self) -> None:
        super().__init__([HOSTILE, "other"], name=HOSTILE)

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        bright = [float(np.asarray(i, dtype=np.float64).mean()) / 255.0 for i in images]
        return np.asarray([[0.5 + b / 4, 0.5 - b / 4] for b in bright])


def test_hostile_text_is_escaped_in_the_display() -> None:
    found = explain(_HostileModel(), EXAMPLE, f"what is {HOSTILE}?", label=HOSTILE)
    shown = found._repr_html_()
    assert shown is not None
    assert "<script" not in shown and "\x1b" not in shown.split('srcdoc="', 1)[0]
    page = _srcdoc(shown)
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_document_read_back_displays_with_its_image(tmp_path: Path) -> None:
    found = explain(load_model("easyvqa"), EXAMPLE, "what color is the shape?")
    doc = found.to_dict()
    keys = method_keys()
    back = Explanation.from_dict(doc, keys)
    assert back.pixels is None
    page = _srcdoc(back._repr_html_() or "")
    assert page == render_report(explanation_report(back, found.pixels))
    doc["image"] = {**doc["image"], "path": str(tmp_path / "moved.png")}
    assert "heatmap" in _srcdoc(Explanation.from_dict(doc, keys)._repr_html_() or "")


def test_the_documentation_notebook_runs() -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = ROOT / "docs" / "notebooks" / "library-call.ipynb"
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.startswith("blue ")
    shown = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(shown) == 1 and shown[0].startswith('<iframe class="bbvqa-explanation"')

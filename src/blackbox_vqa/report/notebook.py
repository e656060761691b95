"""An explanation shown inline in Jupyter: the report's own page, in a sandboxed frame.

:func:`explanation_html` renders the same HTML report as ``bbvqa explain`` writes
(the model card: answer, top answers, heat maps, word bars), with the same templates and so
the same escaping, and wraps it in an ``<iframe srcdoc>`` with an empty ``sandbox``: the
report's own Content-Security-Policy still applies, no script runs, and its styles stay
inside the frame instead of restyling the notebook.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import BlackboxVQAError
from blackbox_vqa.explanation import Explanation
from blackbox_vqa.images import load_image
from blackbox_vqa.report.html import render_report
from blackbox_vqa.report.views import explanation_report

__all__ = ["explanation_html"]

_FRAME_HEIGHT_PX = 720


def _pixels(explanation: Explanation) -> NDArray[Any]:
    """The explained image: kept by :func:`~blackbox_vqa.explain.explain`, else read from
    the document's path, else a grey canvas of the recorded size (a document read back
    after its image moved)."""
    if explanation.pixels is not None:
        return explanation.pixels
    path = explanation.image.get("path")
    if path:
        try:
            return load_image(path)
        except BlackboxVQAError:
            pass
    height = int(explanation.image.get("height") or 1)
    width = int(explanation.image.get("width") or 1)
    return np.full((height, width, 3), 128, dtype=np.uint8)


def explanation_html(explanation: Explanation, *, height: int = _FRAME_HEIGHT_PX) -> str:
    """The report of ``explanation`` as an inline ``<iframe>`` (a string of HTML)."""
    page = render_report(explanation_report(explanation, _pixels(explanation)))
    return (f'<iframe class="bbvqa-explanation" sandbox="" srcdoc="{html.escape(page)}" '
            f'style="width:100%;height:{int(height)}px;border:1px solid #ddd" '
            f'title="bbvqa explanation: {html.escape(explanation.model)}"></iframe>')

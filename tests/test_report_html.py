"""The self-contained HTML report: content, shared colour scales, escaping, the CSP."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from blackbox_vqa.cli.app import main
from blackbox_vqa.explain import explain
from blackbox_vqa.report.html import CSP, render_report, write_explanation_report
from blackbox_vqa.report.views import (
    AgreementView,
    ItemView,
    MethodView,
    ModelView,
    ReportView,
)

from toys import BrightnessModel

EVIL = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">"\'&'
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p",
                "strong", "div", "span", "section", "figure", "figcaption", "img", "br",
                "table", "tr", "th", "td", "dl", "dt", "dd", "footer"}


class Page(HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML document."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and (cls is None or
                                                          cls in (a.get("class") or "").split())]


def png_pixels(uri: str | None) -> np.ndarray:
    assert uri is not None and uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def check_safe(page: Page) -> None:
    """Only known tags, no event handlers, every image an inline PNG, nothing remote."""
    assert {tag for tag, _ in page.tags} <= ALLOWED_TAGS
    for tag, attrs in page.tags:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        assert "href" not in attrs
        if tag == "img":
            assert (attrs["src"] or "").startswith("data:image/png;base64,")


def brightness_doc(image: np.ndarray, question: str) -> dict[str, object]:
    found = explain(BrightnessModel(), image, question, grid=8, label="brightness")
    return replace(found, image={"path": "square.png", "width": 64, "height": 64}).to_dict()


def square() -> np.ndarray:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = 255
    return pixels


def test_explanation_report_of_a_real_explanation() -> None:
    doc = brightness_doc(square(), "is it not bright?")
    page = Page(render_report_of(doc))
    check_safe(page)
    heatmaps = page.find("img", "heatmap")
    assert [h["data-method"] for h in heatmaps] == ["occlusion"]
    # 64 x 64 is enlarged 3x (nearest) for display; the 8 x 8 grid stays 24 px cells.
    pixels = png_pixels(heatmaps[0]["src"])
    assert pixels.shape == (192, 192, 3)
    occlusion = np.asarray(doc["occlusion"]["image"])  # type: ignore[index]
    bound = np.abs(occlusion).max()
    for row, col in [(0, 0), (1, 3), (7, 7)]:
        value = occlusion[row, col]
        base = square()[row * 8 + 4, col * 8 + 4].astype(float)
        rgb = np.asarray(colormaps["RdBu_r"]((value + bound) / (2 * bound)))[:3] * 255
        expected = np.round(0.4 * base + 0.6 * rgb)
        assert np.abs(pixels[row * 24 + 12, col * 24 + 12] - expected).max() <= 1
    text = "".join(page.text)
    assert "is it not bright?" in text and "bright" in text
    word_rows = page.find("table", "words")
    assert len(word_rows) == 1
    assert text.count("0.902") >= 1  # probability 0.9023 (the image is 9.8 % white)


def render_report_of(doc: dict[str, object]) -> str:
    from blackbox_vqa.report.views import explanation_report

    return render_report(explanation_report(doc, square()))


def test_heat_maps_and_word_bars_share_one_scale_across_models() -> None:
    image = np.full((64, 64, 3), 100, dtype=np.uint8)
    big = np.full((16, 16), 0.5)
    small = np.full((16, 16), 0.1)
    models = tuple(
        ModelView(name=name, answer="yes", probability=0.5, words=("a", "b"),
                  methods=(MethodView("occlusion", values, np.asarray(words)),))
        for name, values, words in [("big", big, [0.4, -0.2]), ("small", small, [0.1, 0.0])]
    )
    view = ReportView("t", (ItemView("q?", image, "img.png", models),))
    page = Page(render_report(view))
    first, second = (png_pixels(h["src"]) for h in page.find("img", "heatmap"))
    for pixels, value in [(first, 0.5), (second, 0.1)]:
        rgb = np.asarray(colormaps["RdBu_r"]((value + 0.5) / 1.0))[:3] * 255
        expected = np.round(0.4 * 100 + 0.6 * rgb)
        assert np.abs(pixels[50, 50] - expected).max() <= 1
    widths = [float(w) for w in re.findall(r'style="width:([\d.]+)%"', render_report(view))]
    assert widths == [100.0, 50.0, 25.0, 0.0]
    legend = "".join(page.text)
    assert "-0.5" in legend and "+0.5" in legend


def test_unavailable_and_failed_models_and_agreement_matrix() -> None:
    models = (
        ModelView(name="a", answer="x", methods=(
            MethodView("occlusion", np.eye(4), np.asarray([1.0])),
            MethodView("guided-bp", unavailable="needs gradients"))),
        ModelView(name="b", failed="scores were NaN"),
    )
    matrix = np.asarray([[1.0, np.nan], [np.nan, 1.0]])
    view = ReportView("t", (ItemView("q", np.zeros((8, 8, 3)), "i.png", models,
                                     (AgreementView("occlusion: rank", ("a", "b"), matrix),)),))
    page = Page(render_report(view))
    text = " ".join(page.text)
    assert "not available" in text and "needs gradients" in text
    assert "failed: scores were NaN" in text
    cells = [t.strip() for t in page.text if t.strip() in ("1.000", "n/a")]
    assert cells == ["1.000", "n/a", "n/a", "1.000"]
    assert len(page.find("img", "heatmap")) == 1


def test_untrusted_strings_are_escaped_everywhere() -> None:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    models = (
        ModelView(name=EVIL, answer=EVIL, probability=0.5, top_answers=((EVIL, 0.5),),
                  words=(EVIL,), facts=((EVIL, EVIL),),
                  methods=(MethodView(EVIL, np.eye(4), np.asarray([1.0])),
                           MethodView("guided-bp", unavailable=EVIL))),
        ModelView(name=EVIL, failed=EVIL),
    )
    view = ReportView(EVIL, (ItemView(EVIL, image, EVIL, models, (
        AgreementView(EVIL, (EVIL, EVIL), np.eye(2)),), heading=EVIL),), notes=(EVIL,),
        footer=((EVIL, EVIL),))
    html = render_report(view)
    page = Page(html)
    check_safe(page)
    assert not page.find("script")
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html
    # Every untrusted string is shown as text, exactly as given.
    assert "".join(page.text).count(EVIL) >= 12


def test_csp_meta_forbids_remote_loads_and_scripts() -> None:
    html = render_report(ReportView("t", ()))
    page = Page(html)
    metas = page.find("meta")
    assert metas[0] == {"charset": "utf-8"}
    assert metas[1]["http-equiv"] == "Content-Security-Policy"
    assert metas[1]["content"] == CSP
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"  # scripts, fonts, frames, fetches: none
    assert directives["img-src"] == "data:"
    assert "script-src" not in directives


def test_bbvqa_explain_writes_the_report(square_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--image", str(square_image), "--question", "what <b>is</b> it?",
              "--model", "toys:brightness_model", "--grid", "4", "--out", str(out)])
    assert exit_info.value.code in (0, None)
    html = (out / "report.html").read_text(encoding="utf-8")
    page = Page(html)
    check_safe(page)
    assert [h["data-method"] for h in page.find("img", "heatmap")] == ["occlusion"]
    assert "what <b>is</b> it?" in "".join(page.text)
    assert "&lt;b&gt;is&lt;/b&gt;" in html


def test_write_explanation_report_is_atomic_and_complete(tmp_path: Path) -> None:
    doc = brightness_doc(square(), "how bright?")
    path = write_explanation_report(tmp_path / "r.html", doc, square())
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_explanation_sections_unavailable_and_own_tokens() -> None:
    doc = brightness_doc(square(), "how bright?")
    doc["guided_backprop"] = {"available": False, "reason": "no <gradients> here"}
    doc["gradient"] = {"available": True, "image": np.ones((8, 8)).tolist(),
                       "tokens": ["#7", "#9", "#11"], "words": [0.1, 0.3, 0.2]}
    html = render_report_of(doc)
    page = Page(html)
    check_safe(page)
    assert [h["data-method"] for h in page.find("img", "heatmap")] == ["occlusion", "gradient"]
    text = "".join(page.text)
    assert "no <gradients> here" in text and "&lt;gradients&gt;" in html
    assert "#9" in text
    # Two methods with maps: their agreement is shown (methods against each other).
    assert "methods: rank correlation of |image maps| (14x14)" in text

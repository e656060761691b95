"""Per-answer-token maps on generative VLMs (tiny random-weight models from genvlm_toys):
each token's occlusion map equals a direct teacher-forced computation with plain
transformers calls, the token maps sum to the log-probability map, they come from the
scoring passes themselves, and they reach explanation.json, the terminal, the report and
``bbvqa compare``; MM-SHAP's token maps are checked on a hand-computable two-token model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli

pytest.importorskip("transformers")

from blackbox_vqa.adapters.capabilities import SupportsAnswerTokenScores
from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.registry import method_keys
from blackbox_vqa.explanation import TOKEN_MAPS_FORMAT, Explanation
from genvlm_toys import build, direct_token_logprobs, image
from test_report_html import Page, check_safe

from toys import TwoTokenToy

QUESTION = "what color is the shape"
FAMILIES = ("llava", "qwen2vl", "paligemma")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gentoken")
    return {family: build(family, root / family) for family in FAMILIES}


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "picture.png"
    Image.fromarray(image(3, 40)).save(path)
    return path


def _direct(adapter: GenerativeAdapter, pixels: np.ndarray, question: str) -> np.ndarray:
    return np.asarray(direct_token_logprobs(adapter.module, adapter.processor, pixels,
                                            question, list(adapter.answer_ids)))


@pytest.mark.parametrize("family", FAMILIES)
def test_token_maps_equal_direct_teacher_forcing(
    family: str, folders: dict[str, Path]
) -> None:
    """Token i's map: log p(token_i | original, prefix) - log p(token_i | cell (r, c) filled
    with the baseline / word w dropped, prefix), computed here input by input."""
    adapter = GenerativeAdapter.from_pretrained(folders[family], answer="red circle",
                                                device="cpu")
    eos = adapter.tokenizer.eos_token_id
    assert adapter.answer_ids[-1] == eos and len(adapter.answer_ids) >= 3
    assert adapter.answer_token_labels[-1] == adapter.tokenizer.eos_token
    pixels = image(3, 40).astype(np.float32)
    found = explain(adapter, pixels, QUESTION, methods="occlusion", grid=3,
                    baseline="0,0,0", score="probability", batch_size=5)
    occlusion = found.attribution("occlusion")
    assert occlusion is not None and occlusion.answer_tokens is not None
    maps = occlusion.answer_tokens
    assert maps.tokens == adapter.answer_token_labels
    assert maps.texts == tuple(adapter.tokenizer.decode([i]) for i in adapter.answer_ids)
    base = _direct(adapter, pixels, QUESTION)
    np.testing.assert_allclose(maps.logprobs, base, atol=1e-5, rtol=0)
    edges = [40 * k // 3 for k in range(4)]
    for r in range(3):
        for c in range(3):
            occluded = pixels.copy()
            occluded[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0
            expected = base - _direct(adapter, occluded, QUESTION)
            got = [maps.image_maps[i][r, c] for i in range(len(base))]
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    words = QUESTION.split()
    for w in range(len(words)):
        expected = base - _direct(adapter, pixels, " ".join(words[:w] + words[w + 1:]))
        got = [maps.word_maps[i][w] for i in range(len(base))]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert max(np.abs(m).max() for m in maps.image_maps) > 1e-3


@pytest.mark.parametrize("family", ("llava", "paligemma"))
def test_token_maps_sum_to_the_log_probability_map(
    family: str, folders: dict[str, Path]
) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders[family], max_tokens=3, device="cpu")
    pixels = image(5, 40).astype(np.float32)
    found = explain(adapter, pixels, QUESTION, methods="occlusion,rise", grid=4,
                    score="log-probability", rise_masks=24, batch_size=7)
    occlusion, rise = found.attribution("occlusion"), found.attribution("rise")
    assert occlusion is not None and occlusion.answer_tokens is not None
    assert rise is not None and rise.answer_tokens is not None
    count = len(adapter.answer_ids)
    assert len(occlusion.answer_tokens.image_maps) == count >= 2
    np.testing.assert_allclose(sum(occlusion.answer_tokens.image_maps), occlusion.image_map,
                               atol=1e-9, rtol=0)
    np.testing.assert_allclose(sum(occlusion.answer_tokens.word_maps), occlusion.word_map,
                               atol=1e-9, rtol=0)
    np.testing.assert_allclose(sum(rise.answer_tokens.image_maps), rise.image_map,
                               atol=1e-9, rtol=0)
    assert rise.answer_tokens.image_maps[0].shape == (40, 40)
    assert all(m.size == 0 for m in rise.answer_tokens.word_maps)
    # the original input's tokens, scored in a batch of 7: batching changes < 1e-5
    assert np.log(found.probability) == pytest.approx(
        occlusion.answer_tokens.logprobs.sum(), abs=1e-5)


@pytest.mark.parametrize("reuse", [False, True])
def test_token_scores_come_from_the_scoring_passes(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, reuse: bool
) -> None:
    """Same scores as answer_probs_batch, and occlusion runs exactly as many forward passes
    with per-token maps as without them: without reuse one per batch (plus explain's
    original input); with reuse (vision output and prompt prefix cached) the same number
    with and without them."""
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], max_tokens=3, device="cpu",
                                                batch_size=4, reuse=reuse)
    assert isinstance(adapter, SupportsAnswerTokenScores)
    inputs = [image(i, 40) for i in range(6)]
    questions = [QUESTION, "how many shapes", "is it red", QUESTION, "what is it", "red"]
    plain = adapter.answer_probs_batch(inputs, questions)
    scores, tokens = adapter.answer_probs_with_token_logprobs(inputs, questions)
    np.testing.assert_array_equal(scores, plain)
    assert tokens.shape == (6, len(adapter.answer_ids))
    np.testing.assert_allclose(np.exp(tokens.sum(axis=1)), plain[:, 0], rtol=1e-12)

    pixels = image(3, 40)
    explain(adapter, pixels, QUESTION, methods="occlusion", grid=3)  # generates the answer

    def passes() -> tuple[int, Any]:
        calls: list[int] = []
        handle = adapter.module.model.register_forward_hook(lambda *_: calls.append(1))
        try:
            found = explain(adapter, pixels, QUESTION, methods="occlusion", grid=3,
                            batch_size=4)
        finally:
            handle.remove()
        return len(calls), found.attribution("occlusion")

    with_tokens, occlusion = passes()
    assert occlusion.answer_tokens is not None
    monkeypatch.setattr(GenerativeAdapter, "token_answer", property(lambda self: None))
    without, plain_occlusion = passes()
    assert plain_occlusion.answer_tokens is None
    assert with_tokens == without
    if not reuse:
        assert without == 1 + math.ceil((1 + 9 + 5) / 4)
    np.testing.assert_array_equal(occlusion.image_map, plain_occlusion.image_map)


def test_no_token_maps_where_they_do_not_apply(folders: dict[str, Path],
                                                tmp_path: Path) -> None:
    pixels = image(3, 40)
    answers = tmp_path / "answers.txt"
    answers.write_text("red\nblue circle\n")
    candidates = GenerativeAdapter.from_pretrained(folders["llava"], answers_file=answers,
                                                   device="cpu")
    found = explain(candidates, pixels, QUESTION, methods="occlusion", grid=2)
    assert found.attribution("occlusion").answer_tokens is None  # type: ignore[union-attr]
    assert "answer_tokens" not in found.to_dict()["occlusion"]
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], answer="red circle",
                                                device="cpu")
    other = explain(adapter, pixels, QUESTION, methods="occlusion", grid=2,
                    answer="(other)")
    assert other.attribution("occlusion").answer_tokens is None  # type: ignore[union-attr]


def test_json_round_trip(folders: dict[str, Path]) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], answer="red circle",
                                                device="cpu")
    found = explain(adapter, image(3, 40), QUESTION, methods="occlusion,rise", grid=3,
                    rise_masks=8)
    doc = json.loads(json.dumps(found.to_dict()))
    block = doc["occlusion"]["answer_tokens"]
    assert block["format"] == TOKEN_MAPS_FORMAT
    assert block["tokens"] == doc["score_semantics"]["answer_tokens"]
    assert len(block["maps"]) == len(block["tokens"]) == len(block["logprobs"])
    assert np.asarray(block["maps"][0]["image"]).shape == (3, 3)
    assert len(block["maps"][0]["words"]) == len(QUESTION.split())
    assert np.asarray(doc["rise"]["answer_tokens"]["maps"][1]["image"]).shape == (40, 40)
    back = Explanation.from_dict(doc, method_keys())
    assert back.to_dict() == doc
    again = back.attribution("occlusion")
    assert again is not None and again.answer_tokens is not None
    assert "answer_tokens" not in again.extras
    original = found.attribution("occlusion").answer_tokens  # type: ignore[union-attr]
    assert original is not None
    for a, b in zip(again.answer_tokens.image_maps, original.image_maps, strict=True):
        np.testing.assert_array_equal(a, b)


def test_terminal_report_and_notebook(folders: dict[str, Path], picture: Path,
                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli([
        "explain", "-m", f"hf:{folders['llava']}", "-i", str(picture), "-q", QUESTION,
        "--grid", "3", "--method", "occlusion,rise", "--masks", "8", "--answer",
        "red circle", "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    block = doc["occlusion"]["answer_tokens"]
    count = len(block["tokens"])
    for method in ("occlusion", "rise"):
        lines = [line for line in stdout.splitlines()
                 if re.match(rf"{method}: token \d+/{count} ", line)]
        assert len(lines) == count, stdout
        for i, (line, text) in enumerate(zip(lines, block["texts"], strict=True)):
            logprob = doc[method]["answer_tokens"]["logprobs"][i]
            assert line.startswith(f"{method}: token {i + 1}/{count} {text!r} "
                                   f"(log p {logprob:+.4f}): highest at ")
    occlusion_lines = [x for x in stdout.splitlines() if x.startswith("occlusion: token")]
    assert all("top word" in x for x in occlusion_lines)

    page = Page((out / "report.html").read_text())
    check_safe(page)
    _check_strips(page, {"occlusion": block["texts"], "rise": block["texts"]})

    back = Explanation.from_dict(doc, method_keys())
    frame = back._repr_html_()
    assert frame is not None
    import html

    inner = re.search(r'srcdoc="([^"]*)"', frame)
    assert inner is not None
    _check_strips(Page(html.unescape(inner.group(1))),
                  {"occlusion": block["texts"], "rise": block["texts"]})


def _check_strips(page: Page, expected: dict[str, list[str]]) -> None:
    """One strip per method, after the main heat maps, with one small map per token whose
    caption starts with the token (quoted)."""
    order = [(t, a) for t, a in page.tags if (t == "img" and "heatmap" in (a.get("class") or ""))
             or (t == "div" and a.get("class") == "token-strip")]
    strips = [a.get("data-method") for t, a in order if t == "div"]
    assert strips == list(expected)
    first_strip = next(i for i, (t, _) in enumerate(order) if t == "div")
    assert all(t == "img" for t, _ in order[:first_strip])  # main maps come first
    maps = page.find("img", "tokenmap")
    total = sum(len(v) for v in expected.values())
    assert len(maps) == total
    text = "".join(page.text)
    for texts in expected.values():
        for token in texts:
            assert repr(token) in text


def test_report_escapes_token_text() -> None:
    from dataclasses import replace

    from blackbox_vqa.explanation import TokenMaps
    from blackbox_vqa.report.html import render_report
    from blackbox_vqa.report.views import explanation_report

    from toys import BrightnessModel

    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    found = explain(BrightnessModel(), pixels, "is it bright", grid=4)
    occlusion = found.attribution("occlusion")
    assert occlusion is not None and occlusion.answer_tokens is None
    evil = '<script>x</script>"&'
    maps = TokenMaps(tokens=("a", evil), texts=("a", evil), logprobs=np.array([-1.0, -2.0]),
                     image_maps=(occlusion.image_map, -occlusion.image_map),
                     word_maps=(occlusion.word_map, occlusion.word_map))
    found = replace(found, attributions={"occlusion": replace(occlusion, answer_tokens=maps)})
    page_text = render_report(explanation_report(found, pixels))
    assert "<script>" not in page_text
    page = Page(page_text)
    check_safe(page)
    assert repr(evil) in "".join(page.text)
    assert len(page.find("img", "tokenmap")) == 2


def test_compare_shows_the_strip_for_the_generative_model_only(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    from hf_toys import BLIP_ANSWERS, build_blip, build_vilt, write_answers

    vilt = build_vilt(tmp_path / "vilt")
    blip = build_blip(tmp_path / "blip")
    answers = write_answers(tmp_path / "blip_answers.txt", BLIP_ANSWERS)
    models = tmp_path / "models.toml"
    models.write_text(f'[blip]\nspec = "hf:{blip}"\nanswers = "{answers}"\n')
    out = tmp_path / "cmp"
    code, _, err = run_cli([
        "compare", "-m", f"hf:{vilt}", "-m", f"@{models}:blip", "-m", f"hf:{folders['llava']}",
        "-i", str(picture), "-q", QUESTION, "--grid", "2", "--max-tokens", "3",
        "--threads", "1", "--out", str(out)])
    assert code == 0, err
    entries = {m["spec"]: m for m in json.loads((out / "comparison.json").read_text())["models"]}
    llava = f"hf:{folders['llava']}"
    block = entries[llava]["explanation"]["occlusion"]["answer_tokens"]
    for other in (f"hf:{vilt}", "blip"):
        assert "answer_tokens" not in entries[other]["explanation"]["occlusion"]
    page = _Sections((out / "report.html").read_text())
    check_safe(page)
    assert page.models == {f"hf:{vilt}": 0, "blip": 0, llava: len(block["tokens"])}
    assert len(block["tokens"]) >= 2


class _Sections(Page):
    """Small token maps counted per model section (``<section class="model">`` whose
    ``<h2>`` names the model)."""

    def __init__(self, text: str) -> None:
        self.models: dict[str, int] = {}
        self._current: str | None = None
        self._in_h2 = False
        super().__init__(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        super().handle_starttag(tag, attrs)
        found = dict(attrs)
        if tag == "section" and "model" in (found.get("class") or "").split():
            self._current = ""
        elif tag == "h2" and self._current == "":
            self._in_h2 = True
        elif tag == "img" and found.get("class") == "tokenmap" and self._current:
            self.models[self._current] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False
        elif tag == "section":
            self._current = None

    def handle_data(self, data: str) -> None:
        super().handle_data(data)
        if self._in_h2 and self._current == "":
            self._current = data.strip()
            self.models[self._current] = 0


def test_mm_shap_token_maps_are_exact_shapley_values_of_each_token() -> None:
    """With every permutation walked, each token's MM-SHAP values equal the subset formula
    on that token's log-probability; they sum to the log-probability values."""
    from blackbox_vqa.explainers.modality_share import ModalityShare, modality_share_attribution
    from blackbox_vqa.explainers.shapley import exact_shapley

    model = TwoTokenToy()
    assert isinstance(model, SupportsAnswerTokenScores)
    pixels = image(4, 32).astype(np.float32)
    question = "what color"
    result = ModalityShare(model, grid=2, sampling="exhaustive", baseline="0,0,0",
                           score="log-probability").explain(pixels, question)
    maps = result.token_maps
    assert maps is not None and maps.tokens == ("a", "b")

    def value(mask: np.ndarray, token: int) -> float:
        shown = pixels.copy()
        for k in range(4):  # cell (r, c) = rows 16r..16r+15, columns 16c..16c+15
            if not mask[k]:
                r, c = divmod(k, 2)
                shown[16 * r:16 * r + 16, 16 * c:16 * c + 16] = 0
        words = [w for w, keep in zip(question.split(), mask[4:], strict=True) if keep]
        return float(model.logprobs(shown, " ".join(words))[token])

    for token in range(2):
        expected = exact_shapley(lambda m, t=token: value(m, t), 6)
        got = np.concatenate([maps.image_maps[token].reshape(-1), maps.word_maps[token]])
        np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(sum(maps.image_maps), result.image_map, atol=1e-12)
    np.testing.assert_allclose(sum(maps.word_maps), result.word_map, atol=1e-12)
    np.testing.assert_allclose(maps.logprobs, model.logprobs(pixels, question))
    section = modality_share_attribution(result).section()
    assert len(section["answer_tokens"]["maps"]) == 2


def test_toy_occlusion_and_rise_token_maps() -> None:
    """The same capability on a non-transformers model: occlusion's token maps are the
    drops of each token's log-probability, RISE's the mask-weighted means."""
    from blackbox_vqa.explainers.rise import Rise

    model = TwoTokenToy()
    pixels = image(6, 32).astype(np.float32)
    found = explain(model, pixels, "what color is it", methods="occlusion", grid=2,
                    baseline="0,0,0")
    maps = found.attribution("occlusion").answer_tokens  # type: ignore[union-attr]
    assert maps is not None
    base = model.logprobs(pixels, "what color is it")
    for k in range(4):
        r, c = divmod(k, 2)
        shown = pixels.copy()
        shown[16 * r:16 * r + 16, 16 * c:16 * c + 16] = 0
        drop = base - model.logprobs(shown, "what color is it")
        np.testing.assert_allclose([maps.image_maps[0][r, c], maps.image_maps[1][r, c]], drop,
                                   atol=1e-12)
    np.testing.assert_allclose(maps.word_maps[0], 0.0, atol=1e-12)  # token a: no words
    rise = Rise(model, masks=6, cells=4, baseline="0,0,0")
    result = rise.explain(pixels, "what color")
    assert result.token_maps is not None
    masks = rise.masks(32, 32)
    for token in range(2):
        values = [model.logprobs(m[..., None] * pixels, "what color")[token] for m in masks]
        expected = np.tensordot(np.asarray(values), masks.astype(np.float64), axes=1) / (6 * 0.5)
        np.testing.assert_allclose(result.token_maps.image_maps[token], expected, atol=1e-9)


def test_mm_shap_on_a_generative_model_is_the_exact_shapley_value(
    folders: dict[str, Path],
) -> None:
    """MM-SHAP on a tiny LLaVA, every permutation of 3 players (the whole image as one cell
    and two words), equals the Shapley subset formula over values computed here with plain
    transformers calls; the empty coalition drops every word (an empty question: the user
    turn holds the image alone)."""
    from itertools import combinations

    from blackbox_vqa.explainers.modality_share import ModalityShare

    adapter = GenerativeAdapter.from_pretrained(folders["llava"], device="cpu")
    pixels = image(5, 40).astype(np.float32)
    question = "what color"
    fill = np.empty_like(pixels)
    fill[...] = (10.0, 20.0, 30.0)
    adapter.prepare(pixels, question)  # the model's own answer on this input
    found = ModalityShare(adapter, grid=1, sampling="exhaustive", baseline="10,20,30",
                          score="log-probability").explain(pixels, question,
                                                           answer=adapter.answers[0])
    answer = list(adapter.answer_ids)
    words = ("what", "color")

    def value(players: frozenset[int]) -> float:
        shown = pixels if 0 in players else fill
        text = " ".join(w for i, w in enumerate(words) if i + 1 in players)
        return sum(direct_token_logprobs(adapter.module, adapter.processor, shown, text,
                                         answer))

    everyone = frozenset(range(3))
    expected = []
    for player in range(3):
        others = sorted(everyone - {player})
        total = 0.0
        for size in range(3):
            weight = math.factorial(size) * math.factorial(2 - size) / math.factorial(3)
            for subset in combinations(others, size):
                s = frozenset(subset)
                total += weight * (value(s | {player}) - value(s))
        expected.append(total)
    assert np.allclose(found.phi, expected, atol=1e-5, rtol=0), (found.phi, expected)
    assert abs(found.phi.sum() - (value(everyone) - value(frozenset()))) < 1e-5

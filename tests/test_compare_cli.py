"""``bbvqa compare``: values against hand computations and scipy, failures isolated, bad input.

The toy models below are loaded by the CLI as factory specs ``test_compare_cli:NAME``
(tests/ is on ``sys.path``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import spearmanr

from blackbox_vqa.adapters.base import BaseAdapter
from cli_runner import run_cli
from test_agreement import block_resize

from toys import BrightnessModel, LinearVQANet, toy_tokenizer

QUESTION = "is it dark?"


class QuadrantModel(BaseAdapter):
    """``bright`` = mean of the top-left quadrant / 255, ``dark`` = 1 - that, ``maybe`` 0.1."""

    def __init__(self) -> None:
        super().__init__(["bright", "dark", "maybe"], name="quadrant")

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        out = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float64)
            h, w = pixels.shape[:2]
            bright = pixels[: h // 2, : w // 2].mean() / 255.0
            out.append([bright, 1.0 - bright, 0.1])
        return np.asarray(out)


class YesNoModel(BaseAdapter):
    """``no`` = 0.5 + 0.4 * mean / 255 and ``yes`` = 1 - no; ``not`` in the question swaps."""

    def __init__(self) -> None:
        super().__init__(["no", "yes"], name="yesno")

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        out = []
        for image, question in zip(images, questions, strict=True):
            no = 0.5 + 0.4 * float(np.asarray(image, dtype=np.float64).mean()) / 255.0
            pair = [no, 1.0 - no]
            if "not" in question.lower().split():
                pair.reverse()
            out.append(pair)
        return np.asarray(out)


def brightness() -> BrightnessModel:
    return BrightnessModel()


def quadrant() -> QuadrantModel:
    return QuadrantModel()


def yesno() -> YesNoModel:
    return YesNoModel()


def linear() -> Any:
    from blackbox_vqa.adapters.torch.module import TorchAdapter

    return TorchAdapter(LinearVQANet(), ["yes", "no", "red"], toy_tokenizer(),
                        image_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        name="linear")


def scipy_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(block_resize(np.abs(a)).ravel(), block_resize(np.abs(b)).ravel())[0])


# The square image (conftest): white rows 10-29, columns 20-39 of a black 64 x 64 image.
# With a 4 x 4 grid (16 px cells) and a black fill, occluding a cell removes its white
# pixels: 72, 48, 168 and 112 of them in cells (0,1), (0,2), (1,1), (1,2).
WHITE = np.zeros((4, 4))
WHITE[0, 1], WHITE[0, 2], WHITE[1, 1], WHITE[1, 2] = 72, 48, 168, 112


def test_compare_two_black_boxes_and_a_torch_model(
    square_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    specs = ["test_compare_cli:brightness", "test_compare_cli:quadrant", "test_compare_cli:linear"]
    code, stdout, stderr = run_cli(
        ["compare", *[a for s in specs for a in ("--model", s)], "--image", str(square_image),
         "--question", QUESTION, "--grid", "4", "--baseline", "black", "--top-k", "3",
         "--out", str(out)])
    assert code == 0, stderr
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["schema"] == "blackbox_vqa.comparison/1"
    models = {m["spec"]: m for m in doc["models"]}
    bright, quad, lin = (models[s] for s in specs)

    # Hand computations: p(dark) rises when white pixels are blacked out.
    expected_bright = -WHITE / (64 * 64)
    tl = WHITE.copy()
    tl[:, 2] = 0  # the quadrant model only sees the top-left 32 x 32
    expected_quad = -tl / (32 * 32)
    assert bright["answer"] == quad["answer"] == "dark"
    assert bright["probability"] == pytest.approx(1 - 400 / 4096)
    assert quad["probability"] == pytest.approx(1 - 240 / 1024)
    np.testing.assert_allclose(bright["explanation"]["occlusion"]["image"], expected_bright,
                               atol=1e-12)
    np.testing.assert_allclose(quad["explanation"]["occlusion"]["image"], expected_quad,
                               atol=1e-12)

    # Methods: gradient methods only where gradients exist; the others say why not.
    for entry in (bright, quad):
        assert set(entry["unavailable"]) == {"guided-bp", "gradient"}
        assert "PyTorch" in entry["unavailable"]["guided-bp"]
        assert entry["explanation"]["guided_backprop"]["available"] is False
    assert lin["unavailable"] == {}
    for key in ("guided_backprop", "gradient"):
        section = lin["explanation"][key]
        assert np.asarray(section["image"]).shape == (16, 16)  # the model's input size
        assert len(section["words"]) == 3
    # LinearVQANet has no ReLU, so guided and plain gradients are the same.
    np.testing.assert_allclose(lin["explanation"]["guided_backprop"]["image"],
                               lin["explanation"]["gradient"]["image"], rtol=1e-6)

    # Agreement against scipy on independently resized maps, top-k by hand.
    pairs = {(p["a"], p["b"], p["method"]): p for p in doc["agreement"]}
    pair = pairs[(specs[0], specs[1], "occlusion")]
    assert pair["rank_correlation"] == pytest.approx(
        scipy_agreement(expected_bright, expected_quad), abs=1e-9)
    # Top 3 of 14 x 14: in both maps the largest 4 x 4 cell is (1, 1) (168 white pixels);
    # it covers 14 x 14 cells 3.5-7 in each direction, i.e. nine whole cells (4-6, 4-6)
    # that tie, and ties break in row-major order: (4,4), (4,5), (4,6) in both.
    assert pair["top_k_overlap"] == pytest.approx(1.0)
    assert pair["same_top_word"] is None  # no word matters to either model
    assert pair["same_answer"] is True  # both pick "dark" among {dark, bright}
    assert pairs[(specs[0], specs[2], "occlusion")]["same_answer"] is None  # nothing shared
    assert (specs[0], specs[2], "guided-bp") not in pairs

    # The terminal: one row per model, the reasons, the agreement table.
    assert "dark" in stdout and "0.9023" in stdout and "0.7656" in stdout
    assert "test_compare_cli:brightness: guided-bp not available" in stdout
    assert "test_compare_cli:quadrant: gradient not available" in stdout
    assert "0/16 cells" in stdout and "agreement between models" in stdout

    html = (out / "report.html").read_text()
    assert html.count('class="heatmap"') == 5  # three occlusion maps, two gradient maps
    assert html.count("not available</div>") == 4
    assert "rank correlation of |image maps|" in html


def test_best_shared_answer_and_answer_option(
    square_image: Path, tmp_path: Path
) -> None:
    code, stdout, stderr = run_cli(
        ["compare", "-m", "test_compare_cli:brightness", "-m", "test_compare_cli:quadrant",
         "-i", str(square_image), "-q", QUESTION, "--grid", "2", "--answer", "bright",
         "--out", str(tmp_path / "o"), "--json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["shared_answers"] == ["dark", "bright"]
    for entry, p_bright in zip(doc["models"], [400 / 4096, 240 / 1024], strict=True):
        assert entry["answer"] == "bright"
        assert entry["probability"] == pytest.approx(p_bright)
        assert entry["best_shared_answer"]["answer"] == "dark"


def test_answer_missing_from_a_vocabulary_is_refused(
    square_image: Path, tmp_path: Path
) -> None:
    code, _, stderr = run_cli(
        ["compare", "-m", "test_compare_cli:brightness", "-m", "test_compare_cli:quadrant",
         "-i", str(square_image), "-q", QUESTION, "--answer", "maybe",
         "--out", str(tmp_path / "o")])
    assert code == 2
    assert stderr.strip().splitlines() == [
        "bbvqa: error: --answer 'maybe' is not among the answers of model(s) "
        "test_compare_cli:brightness; only an answer every model can give can be explained "
        "for all of them"]


def test_a_failing_model_does_not_stop_the_others(
    square_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    code, stdout, stderr = run_cli(
        ["compare", "-m", "toys:nan_model", "-m", "test_compare_cli:brightness",
         "-i", str(square_image), "-q", QUESTION, "--grid", "2", "--out", str(out)])
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbvqa: error: 1 of 2 model runs failed")
    assert "NaN" in lines[0] and "Traceback" not in stderr
    doc = json.loads((out / "comparison.json").read_text())
    assert [m["status"] for m in doc["models"]] == ["failed", "ok"]
    assert doc["models"][1]["answer"] == "dark"
    html = (out / "report.html").read_text()
    assert "failed: " in html and html.count('class="heatmap"') == 1
    assert "dark" in stdout


def test_dataset_mode_accuracy_and_human_attention(
    tmp_path: Path
) -> None:
    from blackbox_vqa.datasets import human_maps, open_dataset
    from blackbox_vqa.explainers.occlusion import Occlusion
    from blackbox_vqa.images import load_image

    out = tmp_path / "d"
    code, stdout, stderr = run_cli(
        ["compare", "-m", "test_compare_cli:yesno", "-m", "test_compare_cli:brightness",
         "--dataset", "easyvqa:test", "--limit", "6", "--grid", "4", "--out", str(out)])
    assert code == 0, stderr
    doc = json.loads((out / "comparison.json").read_text())
    by_key = {item.key: item for item in open_dataset("easyvqa:test").items}
    items = [by_key[entry["key"]] for entry in doc["items"]]
    assert doc["dataset"]["items"] == len(items) == len({it.image for it in items}) == 6
    summary = doc["summary"]["models"]
    expected = [("yes" if "not" in it.question.split() else "no") == it.answer for it in items]
    assert summary["test_compare_cli:yesno"]["accuracy"] == pytest.approx(np.mean(expected))
    assert summary["test_compare_cli:brightness"]["accuracy"] == 0.0
    # Human attention: scipy on independently resized |occlusion map| and shape map.
    values = []
    for item in items:
        pixels = load_image(item.image)
        result = Occlusion(YesNoModel(), grid=4).explain(pixels, item.question)
        values.append(np.mean([scipy_agreement(result.image_map, m)
                               for m in human_maps(item, pixels)]))
    human = summary["test_compare_cli:yesno"]["human_attention"]["occlusion"]
    assert human["mean"] == pytest.approx(np.mean(values), abs=1e-9)
    assert human["sem"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(6), abs=1e-9)
    assert human["n"] == 6
    agreement = doc["summary"]["agreement"][0]
    assert agreement["n"] == 6 and agreement["method"] == "occlusion"
    assert "accuracy" in stdout and "mean agreement between models" in stdout
    html = (out / "report.html").read_text()
    assert html.count('class="heatmap"') == 2 * 3  # the first three items in detail


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "toys:brightness_model", "-i", "IMG", "-q", "q"],
         "compare needs at least two --model options, got 1"),
        (["-m", "toys:brightness_model", "-m", "toys:brightness_model", "-i", "IMG", "-q", "q"],
         "--model 'toys:brightness_model' is given twice"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG"], "give --image and --question (or --dataset)"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--dataset", "easyvqa:test"],
         "give either --dataset or --image with --question, not both"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--limit", "3"],
         "--limit only apply with --dataset"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--hat", "x"],
         "--hat only apply with --dataset"),
        (["-m", "a:b", "-m", "c:d", "--dataset", "easyvqa:test", "--limit", "0"],
         "--limit must be >= 1, got 0"),
        (["-m", "a:b", "-m", "c:d", "--dataset", "nope"], "--dataset must be one of"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--top-k", "0"],
         "--top-k must be in [1, 196]"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--top-k", "197"],
         "--top-k must be in [1, 196]"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--grid", "0"],
         "--grid must be >= 1, got 0"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--baseline", "pink"],
         "baseline"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "q", "--batch-size", "0"],
         "batch size must be 'auto' or a positive integer"),
        (["-m", "a:b", "-m", "c:d", "-i", "IMG", "-q", "  "], "question is empty"),
        (["-m", "a:b", "-m", "c:d", "-i", "missing.png", "-q", "q"], "image file not found"),
        (["-m", "toys:brightness_model", "-m", "nonsense spec", "-i", "IMG", "-q", "q"],
         "model spec 'nonsense spec' is not one of"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(
    args: list[str], message: str, square_image: Path, tmp_path: Path,
) -> None:
    args = [str(square_image) if a == "IMG" else a for a in args]
    code, _, stderr = run_cli(["compare", *args, "--out", str(tmp_path / "o")])
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("bbvqa: error: ")
    assert message in lines[0]
    assert not (tmp_path / "o" / "comparison.json").exists()


def test_existing_comparison_needs_force(
    square_image: Path, tmp_path: Path
) -> None:
    args = ["compare", "-m", "test_compare_cli:brightness", "-m", "test_compare_cli:quadrant",
            "-i", str(square_image), "-q", QUESTION, "--grid", "2", "--out", str(tmp_path)]
    assert run_cli(args)[0] == 0
    code, _, stderr = run_cli(args)
    assert code == 2 and "already holds comparison.json" in stderr
    assert run_cli([*args, "--force"])[0] == 0


def test_a_model_that_fails_to_load_stops_before_any_work(
    square_image: Path, tmp_path: Path
) -> None:
    code, _, stderr = run_cli(
        ["compare", "-m", "test_compare_cli:brightness", "-m", "toys:failing_factory",
         "-i", str(square_image), "-q", QUESTION, "--out", str(tmp_path / "o")])
    assert code == 1
    assert "weights file is corrupt" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_local_model_against_the_same_model_behind_http(
    square_image: Path, tmp_path: Path
) -> None:
    from blackbox_vqa.server.app import create_app
    from live_server import uvicorn_server

    out = tmp_path / "h"
    with uvicorn_server(create_app(linear())) as url:
        code, stdout, stderr = run_cli(
            ["compare", "-m", "test_compare_cli:linear", "-m", url, "-i", str(square_image),
             "-q", "is the shape red", "--grid", "4", "--out", str(out)])
    assert code == 0, stderr
    doc = json.loads((out / "comparison.json").read_text())
    local, remote = doc["models"]
    assert remote["spec"] == url and remote["answer"] == local["answer"]
    # The same model: the same maps (to the wire's precision), perfect agreement.
    np.testing.assert_allclose(remote["explanation"]["occlusion"]["image"],
                               local["explanation"]["occlusion"]["image"], atol=1e-6)
    occlusion = next(p for p in doc["agreement"] if p["method"] == "occlusion")
    assert occlusion["rank_correlation"] == pytest.approx(1.0)
    assert occlusion["top_k_overlap"] == 1.0 and occlusion["same_answer"] is True
    # Gradients: from the local module only; the endpoint gets the reason.
    assert local["unavailable"] == {}
    assert "HTTP endpoint" in remote["unavailable"]["guided-bp"]
    assert f"{url}: guided-bp not available" in stdout

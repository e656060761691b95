"""MM-SHAP through ``bbvqa explain``, ``compare`` and ``evaluate``, on a game with known
Shapley values, on the reference model (checked against a second, plain implementation)
and through a real HTTP server; bad settings are one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.explainers.masks import IMAGENET_MEAN_RGB, grid_boxes
from blackbox_vqa.explainers.modality_share import ModalityShare
from blackbox_vqa.images import load_image
from blackbox_vqa.models.reference import reference_adapter
from blackbox_vqa.server.app import create_app
from blackbox_vqa.text import drop_word, split_words
from cli_runner import run_cli
from live_server import uvicorn_server
from test_modality_share import PAIRS_PHI

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BLUE = EXAMPLES / "blue_circle.png"
QUESTION = "what color is the shape?"


@pytest.fixture
def white(tmp_path: Path) -> Path:
    path = tmp_path / "white.png"
    Image.fromarray(np.full((4, 4, 3), 255, dtype=np.uint8)).save(path)
    return path


def game_args(image: Path, out: Path, *extra: str) -> list[str]:
    return ["explain", "-m", "test_modality_share:pairs_model", "-i", str(image),
            "-q", "red shape?", "--method", "mm-shap", "--shap-grid", "2",
            "--baseline", "0,0,0", "--out", str(out), *extra]


def test_explain_writes_the_exact_values_of_a_known_game(white: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, stdout, stderr = run_cli(game_args(white, out, "--shap-permutations", "6"))
    assert code == 0, stderr
    section = json.loads((out / "explanation.json").read_text())["mm_shap"]
    np.testing.assert_allclose(section["image"], PAIRS_PHI[:4].reshape(2, 2), atol=1e-15)
    np.testing.assert_allclose(section["words"], PAIRS_PHI[4:], atol=1e-15)
    expected_t = 0.2 / 0.6
    assert section["t_shap"] == pytest.approx(expected_t, abs=1e-15)
    assert section["v_shap"] == pytest.approx(1 - expected_t, abs=1e-15)
    assert section["t_shap_se"] == pytest.approx(0.0, abs=1e-15)
    assert section["settings"]["permutations"] == 6 and section["units"] == 3
    assert section["players"] == {"cells": 4, "words": 2}
    assert abs(section["efficiency_gap"]) < 1e-15
    assert section["evaluations"] <= 64
    assert f"mm-shap: T-SHAP {expected_t:.3f} ± 0.000 (question), V-SHAP " \
        f"{1 - expected_t:.3f} (image); 6 permutations" in stdout
    assert (out / "mm_shap.png").exists() and (out / "mm_shap_words.png").exists()
    report = (out / "report.html").read_text()
    assert "T-SHAP (question) / V-SHAP (image)" in report and f"{expected_t:.3f}" in report


def test_a_model_blind_to_the_image_has_t_shap_one_through_the_cli(
    white: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    args = game_args(white, out, "--shap-permutations", "4", "--json")
    args[2] = "test_modality_share:image_blind_model"
    code, stdout, stderr = run_cli(args)
    assert code == 0, stderr
    section = json.loads(stdout)["mm_shap"]
    assert section["t_shap"] == 1.0 and section["v_shap"] == 0.0
    assert section["image"] == [[0.0, 0.0], [0.0, 0.0]]


def plain_mm_shap(model: object, pixels: np.ndarray, question: str, *, grid: int,
                  permutations: int, seed: int) -> tuple[np.ndarray, float]:
    """A second implementation: antithetic permutations drawn as the explainer draws them,
    each coalition's input built with grid boxes and drop_word and scored alone."""
    boxes = grid_boxes(pixels.shape[0], pixels.shape[1], grid)
    words = len(split_words(question))
    n = len(boxes) + words
    fill = np.asarray(IMAGENET_MEAN_RGB, dtype=np.float32)

    def value(present: set[int], index: int) -> float:
        image = pixels.copy()
        for k, (top, bottom, left, right) in enumerate(boxes):
            if k not in present:
                image[top:bottom, left:right] = fill
        text = question
        for w in reversed(range(words)):
            if len(boxes) + w not in present:
                text = drop_word(text, w)
        return float(model.answer_probs_batch([image], [text])[0, index])  # type: ignore[attr-defined]

    index = int(np.argmax(model.answer_probs_batch([pixels], [question])[0]))  # type: ignore[attr-defined]
    rng = np.random.default_rng(seed)
    total = np.zeros(n)
    for _ in range(permutations // 2):
        order = rng.permutation(n)
        for walk in (order, order[::-1]):
            present: set[int] = set()
            before = value(present, index)
            for player in walk:
                present.add(int(player))
                after = value(present, index)
                total[player] += after - before
                before = after
    phi = total / permutations
    text_share = np.abs(phi[len(boxes):]).sum() / np.abs(phi).sum()
    return phi, float(text_share)


def test_explain_on_the_reference_model_equals_a_second_implementation(
    tmp_path: Path,
) -> None:
    out = tmp_path / "o"
    code, _, stderr = run_cli(["explain", "-i", str(BLUE), "-q", QUESTION, "--method",
                               "mm-shap", "--shap-permutations", "6", "--shap-seed", "4",
                               "--out", str(out)])
    assert code == 0, stderr
    section = json.loads((out / "explanation.json").read_text())["mm_shap"]
    phi, t_shap = plain_mm_shap(reference_adapter(), load_image(BLUE).astype(np.float32),
                                QUESTION, grid=4, permutations=6, seed=4)
    found = np.concatenate([np.ravel(section["image"]), section["words"]])
    np.testing.assert_allclose(found, phi, rtol=0, atol=2e-6)
    assert section["t_shap"] == pytest.approx(t_shap, abs=2e-6)
    assert section["t_shap"] + section["v_shap"] == pytest.approx(1.0, abs=1e-15)
    assert abs(section["efficiency_gap"]) < 1e-12
    assert section["value_all"] - section["value_none"] == pytest.approx(found.sum(), abs=1e-12)
    assert section["evaluations"] <= 2 + 6 * 20 and section["model_calls"] >= 2


def test_through_a_real_http_server_equals_the_local_model() -> None:
    from blackbox_vqa.adapters.http.endpoint import HttpAdapter

    local_model = reference_adapter()
    pixels = load_image(BLUE)
    local = ModalityShare(local_model, permutations=4, seed=2).explain(pixels, QUESTION)
    with uvicorn_server(create_app(reference_adapter())) as url, HttpAdapter(url) as remote:
        found = ModalityShare(remote, permutations=4, seed=2).explain(pixels, QUESTION)
    assert found.answer == local.answer and found.evaluations == local.evaluations
    np.testing.assert_allclose(found.phi, local.phi, rtol=0, atol=1e-6)
    assert found.t_shap == pytest.approx(local.t_shap, abs=1e-5)


def test_dry_run_prints_the_number_of_model_inputs(tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, stdout, stderr = run_cli(["explain", "-i", str(BLUE), "-q", QUESTION, "--method",
                                    "mm-shap", "--shap-permutations", "10", "--dry-run",
                                    "--out", str(out)])
    assert code == 0, stderr
    assert stdout.startswith("mm-shap: at most 202 model inputs (21 players: 4x4 cells + "
                             "5 words; 10 permutations")
    assert "occlusion:" not in stdout and not out.exists()


def test_compare_reports_each_models_modality_share(white: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    code, stdout, stderr = run_cli([
        "compare", "-m", "test_modality_share:pairs_model", "-m",
        "test_modality_share:image_blind_model", "-i", str(white), "-q", "red shape?",
        "--methods", "mm-shap", "--shap-grid", "2", "--shap-permutations", "4",
        "--baseline", "0,0,0", "--out", str(out)])
    assert code == 0, stderr
    doc = json.loads((out / "comparison.json").read_text())
    assert {k: doc["settings"][k] for k in ("shap_grid", "shap_permutations", "shap_seed")} \
        == {"shap_grid": 2, "shap_permutations": 4, "shap_seed": 0}
    shares = {m["spec"]: m["modality_share"] for m in doc["models"]}
    assert shares["test_modality_share:image_blind_model"] == {
        "t_shap": 1.0, "v_shap": 0.0, "t_shap_se": 0.0}
    assert shares["test_modality_share:pairs_model"]["t_shap"] == pytest.approx(1 / 3,
                                                                              abs=1e-15)
    assert "T-SHAP / V-SHAP (mm-shap)" in stdout and "1.000 ± 0.000 / 0.000" in stdout
    assert "0.333 ± 0.000 / 0.667" in stdout
    assert "0.333 ± 0.000 / 0.667" in (out / "report.html").read_text()


def test_compare_on_a_data_set_averages_t_shap_over_items(tmp_path: Path) -> None:
    out = tmp_path / "c"
    code, stdout, stderr = run_cli([
        "compare", "-m", "easyvqa", "-m", "toys:brightness_model", "--dataset",
        "easyvqa:test", "--limit", "3", "--methods", "mm-shap", "--shap-permutations", "2",
        "--out", str(out)])
    assert code == 0, stderr
    doc = json.loads((out / "comparison.json").read_text())
    for spec in ("easyvqa", "toys:brightness_model"):
        items = [m["modality_share"]["t_shap"] for item in doc["items"]
                 for m in item["models"] if m["spec"] == spec]
        summary = doc["summary"]["models"][spec]["modality_share"]["t_shap"]
        assert summary["n"] == 3 and summary["mean"] == pytest.approx(np.mean(items), abs=1e-15)
        assert summary["sem"] == pytest.approx(np.std(items, ddof=1) / np.sqrt(3), abs=1e-15)
    # the brightness toy reads no word (its question holds no "not")
    assert doc["summary"]["models"]["toys:brightness_model"]["modality_share"]["t_shap"][
        "mean"] == 0.0
    assert "T-SHAP (mm-shap, mean ± s.e.)" in stdout
    assert "modality share (MM-SHAP" in (out / "report.html").read_text()


def test_evaluate_has_a_modality_share_column(tmp_path: Path) -> None:
    out = tmp_path / "e"
    code, stdout, stderr = run_cli([
        "evaluate", "--dataset", "easyvqa:test", "--limit", "3", "--methods",
        "occlusion,mm-shap", "--shap-permutations", "2", "--out", str(out)])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    entry = results["modality_share"]["methods"]["mm-shap"]
    assert list(results["modality_share"]["methods"]) == ["mm-shap"]
    assert entry["t_shap"]["n"] == 3 and entry["t_shap"]["undefined"] == 0
    assert entry["t_shap"]["mean"] + entry["v_shap"]["mean"] == pytest.approx(1.0, abs=1e-12)
    assert entry["t_shap"]["sem"] == pytest.approx(entry["v_shap"]["sem"], abs=1e-12)
    assert results["settings"]["shap_permutations"] == 2
    assert "## Modality share (MM-SHAP)" in stdout
    table = (out / "results.md").read_text().split("## Modality share (MM-SHAP)")[1]
    row = next(line for line in table.splitlines() if line.startswith("| mm-shap |"))
    assert f"{entry['t_shap']['mean']:.3f} ± {entry['t_shap']['sem']:.3f}" in row


@pytest.mark.parametrize(("options", "message"), [
    (["--shap-permutations", "0"], "shap_permutations must be a positive integer, got 0"),
    (["--shap-permutations", "5"], "shap_permutations must be even"),
    (["--shap-grid", "0"], "shap_grid must be a positive integer, got 0"),
    (["--shap-grid", "65"], "mm-shap grid 65: an image side of 64 px cannot be split"),
    (["--shap-seed", "-1"], "shap_seed must be a non-negative integer, got -1"),
])
@pytest.mark.parametrize("command", ["explain", "compare", "evaluate"])
def test_bad_settings_are_one_line_exit_2_and_nothing_written(
    command: str, options: list[str], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    args = {
        "explain": ["explain", "-i", str(BLUE), "-q", QUESTION, "--method", "mm-shap"],
        "compare": ["compare", "-m", "easyvqa", "-m", "toys:brightness_model", "-i",
                    str(BLUE), "-q", QUESTION, "--methods", "mm-shap"],
        "evaluate": ["evaluate", "--dataset", "easyvqa:test", "--limit", "1", "--methods",
                     "mm-shap"],
    }[command]
    code, stdout, stderr = run_cli([*args, *options, "--out", str(out)])
    if command == "compare" and options[1] == "65":
        # a model that cannot explain the input fails its run; the others go on
        assert code == 1 and message in stderr
        return
    if command == "evaluate" and options[1] == "65":
        # an item whose image the grid does not fit is skipped, with the reason
        assert code == 0, stderr
        items = json.loads((out / "results.json").read_text())["items"]
        assert items["evaluated"] == 0 and message in next(iter(items["skipped_in_run"]))
        return
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("bbvqa: error: ") and stderr.count("\n") == 1
    assert message in stderr
    assert not out.exists()


def test_explain_on_an_http_model_prints_the_cost_first_and_keeps_to_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "o"
    with uvicorn_server(create_app(reference_adapter())) as url:
        code, stdout, stderr = run_cli(["explain", "-m", url, "-i", str(BLUE), "-q", QUESTION,
                                        "--method", "mm-shap", "--shap-permutations", "4",
                                        "--out", str(out)])
    assert code == 0, stderr
    first = stdout.splitlines()[0]
    assert first.startswith("mm-shap: at most 82 model inputs (21 players")
    section = json.loads((out / "explanation.json").read_text())["mm_shap"]
    assert 2 < section["evaluations"] <= 82
    local = ModalityShare(reference_adapter(), permutations=4).explain(load_image(BLUE),
                                                                      QUESTION)
    np.testing.assert_allclose(np.ravel(section["image"]), local.phi[:16], atol=1e-6)
    assert section["evaluations"] == local.evaluations


def test_a_run_without_mm_shap_continues_whatever_the_shap_options_say(tmp_path: Path) -> None:
    out = tmp_path / "e"
    base = ["evaluate", "--dataset", "easyvqa:test", "--limit", "1", "--methods", "occlusion",
            "--grid", "2", "--out", str(out)]
    code, _, stderr = run_cli(base)
    assert code == 0, stderr
    settings = json.loads((out / "settings.json").read_text())
    assert not any(key.startswith("shap_") for key in settings)
    code, _, stderr = run_cli([*base, "--shap-permutations", "4"])
    assert code == 0, stderr
    assert "1 stored earlier, 0 to evaluate" in stderr


def test_the_shared_options_reach_mm_shap(white: Path, tmp_path: Path) -> None:
    """--score, --baseline, --batch-size and --answer are MM-SHAP's too."""
    out = tmp_path / "o"
    code, _, stderr = run_cli(game_args(white, out, "--shap-permutations", "2", "--score",
                                        "log-probability", "--batch-size", "3", "--answer",
                                        "no"))
    assert code == 0, stderr
    section = json.loads((out / "explanation.json").read_text())["mm_shap"]
    assert section["settings"]["score"] == "log-probability"
    assert section["settings"]["batch_size"] == 3 and section["settings"]["baseline"] == "rgb"
    # the whole input: every player present, p(yes) = 0.1 + 0.3 + 0.2 + 0.1 = 0.7
    assert section["value_all"] == pytest.approx(np.log(0.3), abs=1e-15)
    assert section["value_none"] == pytest.approx(np.log(0.9), abs=1e-15)
    assert sum(np.ravel(section["image"])) + sum(section["words"]) == pytest.approx(
        np.log(0.3) - np.log(0.9), abs=1e-12)
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["answer"] == "no"

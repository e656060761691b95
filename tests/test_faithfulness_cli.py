"""Faithfulness metrics, the sanity check, RISE and the score option through the commands;
each figure is checked against the library computed directly (a second path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.evaluation.faithfulness import Faithfulness
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.explainers.rise import Rise
from cli_runner import run_cli

from toys import BrightnessModel

QUESTION = "is it not bright?"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_explain_metrics_equal_the_library(square_image: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(square_image),
                              "-q", QUESTION, "--grid", "4", "--baseline", "black",
                              "--method", "occlusion,rise", "--masks", "64", "--metrics",
                              "--out", str(tmp_path / "e")])
    assert code == 0, err
    doc = json.loads((tmp_path / "e" / "explanation.json").read_text())
    pixels = _pixels(square_image)
    meter = Faithfulness(BrightnessModel(), baseline="black")
    image_map = np.asarray(doc["occlusion"]["image"])
    direct = meter.deletion_insertion(pixels, QUESTION, image_map, answer=doc["answer"])
    metrics = doc["metrics"]["occlusion"]
    assert metrics["image"]["deletion_auc"] == pytest.approx(direct.deletion.auc, abs=1e-12)
    assert metrics["image"]["insertion_auc"] == pytest.approx(direct.insertion.auc, abs=1e-12)
    words = meter.comprehensiveness_sufficiency(pixels, QUESTION, doc["occlusion"]["words"],
                                                answer=doc["answer"])
    assert metrics["words"]["comprehensiveness"] == pytest.approx(
        words.comprehensiveness.aopc, abs=1e-12)
    # The brightness toy is exactly additive: removing the bright cells first is the
    # steepest descent, so the map beats a random order.
    assert metrics["image"]["deletion_auc"] < metrics["image"]["random_deletion_auc"]
    rise = Rise(BrightnessModel(), masks=64, baseline="black").explain(pixels, QUESTION)
    np.testing.assert_allclose(doc["rise"]["image"], rise.image_map, atol=1e-12)
    assert doc["metrics"]["rise"]["words"] is None  # RISE has no word map
    assert "occlusion faithfulness: deletion AUC" in out
    assert "deletion / insertion AUC" in (tmp_path / "e" / "report.html").read_text()


def test_log_probability_score_reaches_occlusion(square_image: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(square_image),
                            "-q", QUESTION, "--grid", "4", "--score", "log-probability",
                            "--out", str(tmp_path / "e")])
    assert code == 0, err
    doc = json.loads((tmp_path / "e" / "explanation.json").read_text())
    direct = Occlusion(BrightnessModel(), grid=4, score="log-probability").explain(
        _pixels(square_image), QUESTION)
    np.testing.assert_allclose(doc["occlusion"]["image"], direct.image_map, atol=1e-12)


def test_explain_sanity_on_the_reference_model(square_image: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(["explain", "-i", str(square_image), "-q",
                              "what color is the shape?", "--method", "guided-bp,gradient",
                              "--sanity", "--out", str(tmp_path / "s")])
    assert code == 0, err
    sanity = json.loads((tmp_path / "s" / "explanation.json").read_text())["sanity"]
    assert set(sanity) == {"guided-bp", "gradient"}
    for entry in sanity.values():
        assert len(entry["steps"]) >= 5 and entry["steps"][0]["layers"] == 1
        assert entry["passes"] == (entry["final_spearman"] < entry["threshold"])
    assert "sanity check: rank correlation" in out
    code, out, err = run_cli(["explain", "-m", "toys:brightness_model", "-i",
                              str(square_image), "-q", QUESTION, "--grid", "2", "--sanity",
                              "--out", str(tmp_path / "b")])
    assert code == 0, err
    entry = json.loads((tmp_path / "b" / "explanation.json").read_text())["sanity"]["occlusion"]
    assert entry["available"] is False and "cannot randomise its weights" in entry["reason"]


def test_evaluate_writes_faithfulness_and_sanity_tables_and_plots(tmp_path: Path) -> None:
    code, out, err = run_cli(["evaluate", "--dataset", "easyvqa:test", "--limit", "3",
                              "--grid", "4", "--methods", "occlusion,gradient", "--metrics",
                              "--sanity", "1", "--out", str(tmp_path / "run")])
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    faith = results["faithfulness"]
    assert faith["items"] == 3 and set(faith["methods"]) == {"occlusion", "gradient"}
    assert faith["methods"]["occlusion"]["deletion_auc"]["n"] == 3
    assert len(faith["methods"]["occlusion"]["curves"]["deletion"]) == 21
    assert results["sanity"]["items"] == 1
    for name in ("deletion.png", "sanity.png"):
        assert Image.open(tmp_path / "run" / name).size[0] > 300
    assert "## Faithfulness" in out and "## Sanity check" in out


@pytest.mark.parametrize(("extra", "words"), [
    (["--score", "logit"], "score must be one of probability, log-probability"),
    (["--masks", "0", "--method", "rise"], "rise_masks must be a positive integer"),
])
def test_bad_metric_options(extra: list[str], words: str, square_image: Path,
                            tmp_path: Path) -> None:
    code, _, err = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(square_image),
                            "-q", QUESTION, *extra, "--out", str(tmp_path / "o")])
    assert code == 2 and words in err and err.count("\n") == 1, err
    code, _, err = run_cli(["evaluate", "--dataset", "easyvqa:test", "--sanity", "-1",
                            "--out", str(tmp_path / "r")])
    assert code == 2 and "--sanity must be >= 0" in err

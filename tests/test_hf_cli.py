"""Hugging Face models and integrated gradients through the commands (tiny random-weight
ViLT and BLIP folders written by the tests; nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli

from hf_toys import BLIP_ANSWERS, build_blip, build_vilt, write_answers

pytest.importorskip("transformers")

QUESTION = "what color is the shapes?"


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vilt(tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[8:30, 10:40] = (200, 30, 30)
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    return path


def test_explain_vilt_with_every_white_box_method(
    vilt_dir: Path, picture: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli([
        "explain", "-m", f"hf:{vilt_dir}", "-i", str(picture), "-q", QUESTION, "--grid", "4",
        "--method", "occlusion,guided-bp,integrated-gradients", "--ig-steps", "8",
        "--threads", "1", "--out", str(tmp_path / "v")])
    assert code == 0, err
    doc = json.loads((tmp_path / "v" / "explanation.json").read_text())
    assert doc["score_semantics"]["kind"] == "sigmoid" or doc.get("score_semantics")
    guided = doc["guided_backprop"]
    assert guided["relus_guided"] == 0 and "equals the plain gradient" in guided["note"]
    assert "equals the plain gradient" in out
    ig = doc["integrated_gradients"]
    check = ig["completeness"]
    assert check["attribution_sum"] == pytest.approx(sum(map(sum, ig["image"]))
                                                     + sum(ig["words"]), abs=1e-4)
    assert len(ig["words"]) == len(doc["tokens"]) == 5
    assert (tmp_path / "v" / "integrated_gradients.npy").is_file()
    assert "integrated-gradients: attributions sum to" in out


def test_blip_needs_candidates_and_scores_them(
    blip_dir: Path, picture: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli(["explain", "-m", f"hf:{blip_dir}", "-i", str(picture), "-q",
                            QUESTION, "--out", str(tmp_path / "none")])
    assert code == 2 and err.count("\n") == 1 and "candidate" in err
    answers = write_answers(tmp_path / "answers.txt", BLIP_ANSWERS)
    code, _, err = run_cli(["explain", "-m", f"hf:{blip_dir}", "--answers", str(answers),
                            "-i", str(picture), "-q", QUESTION, "--grid", "2",
                            "--out", str(tmp_path / "b")])
    assert code == 0, err
    doc = json.loads((tmp_path / "b" / "explanation.json").read_text())
    assert "candidate" in json.dumps(doc["score_semantics"])
    assert sum(entry["score"] for entry in doc["top_answers"]) <= 1 + 1e-9


def test_export_vilt_then_explain_the_onnx_file(
    vilt_dir: Path, picture: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    code, out, err = run_cli(["export", "-m", f"hf:{vilt_dir}", "--out", str(tmp_path / "x")])
    assert code == 0, err
    assert "model.onnx" in out and "verified on" in out
    common = ["-i", str(picture), "-q", QUESTION, "--grid", "4"]
    code, _, err = run_cli(["explain", "-m", str(tmp_path / "x" / "model.onnx"), *common,
                            "--out", str(tmp_path / "onnx")])
    assert code == 0, err
    code, _, err = run_cli(["explain", "-m", f"hf:{vilt_dir}", *common,
                            "--out", str(tmp_path / "torch")])
    assert code == 0, err
    onnx = json.loads((tmp_path / "onnx" / "explanation.json").read_text())
    torch_doc = json.loads((tmp_path / "torch" / "explanation.json").read_text())
    assert onnx["answer"] == torch_doc["answer"]
    np.testing.assert_allclose(onnx["occlusion"]["image"], torch_doc["occlusion"]["image"],
                               atol=1e-4)


def test_integrated_gradients_on_the_reference_model_everywhere(
    square_image: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli(["explain", "-i", str(square_image), "-q",
                            "what color is the shape?", "--method", "integrated-gradients",
                            "--ig-steps", "64", "--out", str(tmp_path / "e")])
    assert code == 0, err
    check = json.loads((tmp_path / "e" / "explanation.json").read_text())[
        "integrated_gradients"]["completeness"]
    assert abs(check["gap"]) <= 0.05 * max(abs(check["score_difference"]), 1e-3)
    code, _, err = run_cli(["evaluate", "--dataset", "easyvqa:test", "--limit", "1",
                            "--methods", "integrated-gradients", "--ig-steps", "4",
                            "--out", str(tmp_path / "run")])
    assert code == 0, err
    code, _, err = run_cli(["explain", "-i", str(square_image), "-q", "what color?",
                            "--method", "integrated-gradients", "--ig-steps", "0",
                            "--out", str(tmp_path / "bad")])
    assert code == 2 and "ig_steps must be a positive integer" in err
    code, _, err = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(square_image),
                            "-q", "is it bright?", "--method", "integrated-gradients",
                            "--out", str(tmp_path / "none")])
    assert code == 2 and "integrated gradients needs a PyTorch graph" in err

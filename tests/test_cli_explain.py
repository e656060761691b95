"""``bbvqa explain`` end to end: outputs, JSON contents, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.explainers.occlusion import Occlusion
from cli_runner import run_cli

from toys import BrightnessModel

TESTS = Path(__file__).resolve().parent


def test_explain_writes_json_and_figures(
    square_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["explain", "-m", "toys:brightness_model", "-i", str(square_image),
         "-q", "is it not bright?", "--grid", "8", "--out", str(out)])
    assert code == 0, stderr
    assert stderr == ""  # no progress bar off a terminal
    doc = json.loads((out / "explanation.json").read_text())
    expected = Occlusion(BrightnessModel(), grid=8).explain(square_image, "is it not bright?")
    assert doc["schema"] == "blackbox_vqa.explanation/1"
    assert doc["model"] == "brightness"
    assert doc["tokens"] == ["is", "it", "not", "bright"]
    assert doc["answer"] == expected.answer == "bright"
    assert doc["probability"] == expected.probability
    assert np.array_equal(np.array(doc["occlusion"]["image"]), expected.image_map)
    assert doc["occlusion"]["words"] == expected.word_map.tolist()
    assert doc["occlusion"]["flips"] == {"image": 0, "words": 1, "image_total": 64,
                                         "words_total": 4}
    assert doc["occlusion"]["baseline"] == "imagenet-mean"
    assert doc["top_answers"][0] == {"answer": "bright", "score": expected.probability}
    assert doc["image"] == {"path": str(square_image), "width": 64, "height": 64}
    for name in ("occlusion.png", "words.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 300
    assert "A: bright" in stdout and "written to" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "occlusion.png",
                                                      "report.html", "words.png"]


def test_json_to_stdout_equals_the_file(
    square_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    code, stdout, _ = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(square_image),
                               "-q", "bright?", "--grid", "4", "--out", str(out), "--json",
                               "--baseline", "blur", "--window", "16", "--stride", "8"])
    assert code == 0
    assert json.loads(stdout) == json.loads((out / "explanation.json").read_text())
    doc = json.loads(stdout)
    assert doc["occlusion"]["mode"] == "window" and doc["occlusion"]["window"] == [16, 16]
    assert np.array(doc["occlusion"]["image"]).shape == (64, 64)


def test_method_and_methods_are_one_option_everywhere(
    square_image: Path, tmp_path: Path
) -> None:
    """``explain`` documents ``--method``, ``compare`` and ``evaluate`` ``--methods``: each
    command takes either spelling for the same option."""
    for command, spelling in (("explain", "--methods"), ("explain", "--method"),
                              ("compare", "--method"), ("compare", "--methods")):
        out = tmp_path / f"{command}{spelling}"
        models = ["-m", "toys:brightness_model", *(["-m", "easyvqa"] if command == "compare"
                                                   else [])]
        code, _, err = run_cli([command, *models, "-i",
                                str(square_image), "-q", "what shape is it", "--grid", "2",
                                spelling, "occlusion,rise", "--masks", "8",
                                "--out", str(out)])
        assert code == 0, (command, spelling, err)
        doc = json.loads(next(out.glob("*.json")).read_text())
        if command == "explain":
            assert doc["occlusion"] is not None and doc["rise"] is not None
        else:
            assert doc["settings"]["methods"] == ["occlusion", "rise"]


def test_default_folder_is_new_and_never_overwritten(
    square_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["explain", "-m", "toys:brightness_model", "-i", str(square_image),
            "-q", "Is it bright?", "--grid", "2"]
    assert run_cli(args)[0] == 0
    assert run_cli(args)[0] == 0
    assert (tmp_path / "bbvqa-is-it-bright" / "explanation.json").is_file()
    assert (tmp_path / "bbvqa-is-it-bright-2" / "explanation.json").is_file()


def test_existing_explanation_needs_force(
    square_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    args = ["explain", "-m", "toys:brightness_model", "-i", str(square_image), "-q", "q?",
            "--grid", "2", "--out", str(out)]
    assert run_cli(args)[0] == 0
    before = (out / "explanation.json").read_bytes()
    code, _, err = run_cli(args)
    assert code == 2 and "already holds explanation.json" in err and "--force" in err
    assert (out / "explanation.json").read_bytes() == before
    assert run_cli([*args, "--force", "--grid", "4"])[0] == 0
    assert json.loads((out / "explanation.json").read_text())["occlusion"]["grid"] == 4


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(one)
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    return {"corrupt": corrupt, "one": one, "zero": zero, "missing": tmp_path / "nope.png"}


@pytest.mark.parametrize(
    ("image", "model", "question", "extra", "code", "message"),
    [
        ("missing", "toys:brightness_model", "q?", [], 2, "image file not found"),
        ("corrupt", "toys:brightness_model", "q?", [], 2, "cannot read image"),
        ("zero", "toys:brightness_model", "q?", [], 2, "cannot read image"),
        ("one", "toys:brightness_model", "q?", [], 2, "1x1 pixels"),
        ("ok", "toys:brightness_model", "", [], 2, "question is empty"),
        ("ok", "toys:brightness_model", "   ", [], 2, "question is empty"),
        ("ok", "toys:toy_torch_model", "purple zebras", [], 2,
         "none of the words of 'purple zebras'"),
        ("ok", "no_such_module_xyz:make", "q?", [], 1, "cannot import 'no_such_module_xyz'"),
        ("ok", "toys:missing_factory", "q?", [], 1, "has no attribute 'missing_factory'"),
        ("ok", "toys:failing_factory", "q?", [], 1, "weights file is corrupt"),
        ("ok", "toys:not_a_model", "q?", [], 1, "without the model protocol"),
        ("ok", "toys:wrong_shape_model", "q?", [], 1, "returned scores of shape ("),
        ("ok", "toys:nan_model", "q?", [], 1, "NaN or infinite"),
        ("ok", "toys:negative_model", "q?", [], 1, "negative scores"),
        ("ok", "not a spec", "q?", [], 2, "is not one of: easyvqa"),
        ("ok", "toys:brightness_model", "q?", ["--grid", "0"], 2, "--grid must be >= 1"),
        ("ok", "toys:brightness_model", "q?", ["--grid", "65"], 2, "65-cell grid"),
        ("ok", "toys:brightness_model", "q?", ["--baseline", "pink"], 2,
         "baseline must be one of"),
        ("ok", "toys:brightness_model", "q?", ["--batch-size", "0"], 2, "batch size must be"),
        ("ok", "toys:brightness_model", "q?", ["--window", "3x"], 2, "--window must be N"),
        ("ok", "toys:brightness_model", "q?", ["--stride", "2"], 2, "--stride needs --window"),
        ("ok", "toys:brightness_model", "q?", ["--window", "99"], 2, "larger than the image"),
        ("ok", "toys:brightness_model", "q?", ["--answer", "maybe"], 2,
         "answer 'maybe' is not one of"),
        ("ok", "toys:brightness_model", "q?", ["--method", "magic"], 2,
         "unknown method 'magic'"),
    ],
)
def test_bad_inputs_get_one_line_and_an_exit_code(
    image: str, model: str, question: str, extra: list[str], code: int, message: str,
    square_image: Path, tmp_path: Path,
) -> None:
    path = square_image if image == "ok" else _bad_files(tmp_path)[image]
    out = tmp_path / "out"
    got, _stdout, stderr = run_cli(["explain", "-m", model, "-i", str(path), "-q", question,
                                   "--out", str(out), *extra])
    assert got == code
    assert message in stderr
    assert "Traceback" not in stderr
    if "Invalid value" not in message:
        assert stderr.startswith("bbvqa: error: ") and stderr.count("\n") == 1
    assert not out.exists()  # nothing written, not even the folder


def test_debug_shows_the_traceback(
    square_image: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli(["explain", "-m", "toys:nan_model", "-i", str(square_image), "-q", "q?",
                            "--out", str(tmp_path / "o"), "--debug"])
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("NaN or infinite scores")


def test_console_script_and_module_run(square_image: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    for command in (["bbvqa"], [sys.executable, "-m", "blackbox_vqa"]):
        out = tmp_path / command[-1].replace(".", "_")
        proc = subprocess.run(
            [*command, "explain", "-m", "toys:negative_model", "-i", str(square_image),
             "-q", "q?", "--out", str(out)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().startswith("bbvqa: error: ")
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_markup_in_the_question_is_printed_as_text(
    square_image: Path, tmp_path: Path
) -> None:
    question = "is it [/bold] [red]bright[/red]?"
    code, stdout, stderr = run_cli(
        ["explain", "-m", "toys:brightness_model", "-i", str(square_image),
         "-q", question, "--grid", "2", "--out", str(tmp_path / "o")])
    assert code == 0, stderr
    assert "Q: is it [/bold] [red]bright[/red]?" in stdout
    assert "written to" in stdout and "report.html" in stdout

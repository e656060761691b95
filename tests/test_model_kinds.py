"""Model kinds are entries: a kind registered from this module, with one option of its own,
is used through ``--model``, through a model file, and refused where it does not apply; the
built-in kinds keep their matching order and messages."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.adapters.base import BaseAdapter
from blackbox_vqa.errors import InputError
from blackbox_vqa.specs import (
    KindOption,
    ModelKind,
    ModelOptions,
    kind_of,
    load_model,
    model_kinds,
    register_kind,
    unregister_kind,
)
from cli_runner import run_cli

QUESTION = "is it bright?"


class _Bright(BaseAdapter):
    """Answers ``(yes_word, no)``: p(yes_word) = mean brightness / 255 times ``scale``."""

    def __init__(self, yes_word: str, scale: float) -> None:
        super().__init__([yes_word, "no"], name=f"bright:{scale}")
        self.scale = scale

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        p = [self.scale * float(np.asarray(i, dtype=np.float64).mean()) / 255 for i in images]
        return np.asarray([[v, 1 - v] for v in p])


def _check_word(value: Any) -> None:
    if not str(value).isalpha():
        raise InputError(f"--yes-word must be letters only, got {value!r}")


YES_WORD = KindOption("yes_word", str, check=_check_word,
                      help="bright: models: the word they answer for a bright image.")


def _load(spec: str, options: ModelOptions) -> object:
    return _Bright(options.extra.get("yes_word", "yes"), float(spec.split(":", 1)[1]))


BRIGHT = ModelKind(name="bright", syntax="bright:SCALE", audience="bright:",
                   matches=lambda spec: spec.startswith("bright:"), load=_load,
                   options=(YES_WORD,), threads="none")


@pytest.fixture
def bright() -> Iterator[ModelKind]:
    register_kind(BRIGHT)
    try:
        yield BRIGHT
    finally:
        unregister_kind("bright")


@pytest.fixture
def grey_png(tmp_path: Path) -> Path:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32, 3), 204, np.uint8)).save(path)
    return path


def _flat(text: str) -> str:
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


def test_a_registered_kind_is_used_through_model_and_its_option(
    bright: ModelKind, grey_png: Path, tmp_path: Path
) -> None:
    for command in ("explain", "compare", "evaluate", "serve", "export"):
        code, out, err = run_cli([command, "--help"])
        assert code == 0 and "--yes-word" in _flat(out), (command, err)
    code, _, err = run_cli(["explain", "-m", "bright:1", "--yes-word", "sunny", "-i",
                            str(grey_png), "-q", QUESTION, "--grid", "2",
                            "--out", str(tmp_path / "a")])
    assert code == 0, err
    doc = json.loads((tmp_path / "a" / "explanation.json").read_text())
    assert doc["answer"] == "sunny" and doc["probability"] == pytest.approx(0.8)
    # one grey cell of four hidden behind the ImageNet-mean grey: p drops by a quarter of
    # the brightness difference (204 - mean of the baseline's channels) / 255
    baseline = (123.68 + 116.779 + 103.939) / 3
    np.testing.assert_allclose(doc["occlusion"]["image"],
                               np.full((2, 2), (204 - baseline) / 255 / 4), atol=1e-6)


def test_a_registered_kind_is_used_through_a_model_file(
    bright: ModelKind, grey_png: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[half]\nspec = "bright:0.5"\nyes-word = "light"\n'
                      '[bad]\nspec = "bright:0.5"\nyes_word = 7\n')
    code, _, err = run_cli(["explain", "-m", f"@{models}:half", "-i", str(grey_png), "-q",
                            QUESTION, "--grid", "2", "--out", str(tmp_path / "f")])
    assert code == 0, err
    doc = json.loads((tmp_path / "f" / "explanation.json").read_text())
    assert (doc["answer"], doc["probability"]) == ("no", pytest.approx(0.6))
    assert doc["top_answers"][1]["answer"] == "light" and doc["model"] == "half"
    code, _, err = run_cli(["explain", "-m", f"@{models}:bad", "-i", str(grey_png), "-q",
                            QUESTION, "--out", str(tmp_path / "g")])
    assert code == 2 and "yes_word must be a string, got 7" in err
    assert not (tmp_path / "g").exists()


def test_its_option_is_checked_and_refused_for_other_kinds(
    bright: ModelKind, grey_png: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli(["explain", "-m", "bright:1", "--yes-word", "not a word", "-i",
                            str(grey_png), "-q", QUESTION, "--out", str(tmp_path / "a")])
    assert code == 2 and "--yes-word must be letters only" in err and err.count("\n") == 1
    code, _, err = run_cli(["explain", "--yes-word", "sunny", "-i", str(grey_png), "-q",
                            QUESTION, "--out", str(tmp_path / "b")])
    assert code == 2 and "--yes-word: only for bright: models, not for 'easyvqa'" in err
    code, _, err = run_cli(["explain", "-m", "bright:1", "--threads", "2", "-i",
                            str(grey_png), "-q", QUESTION, "--out", str(tmp_path / "c")])
    assert code == 2 and "--threads: only for models that run here" in err
    for folder in "abc":
        assert not (tmp_path / folder).exists()


def test_kinds_keep_their_order_and_refuse_clashes(bright: ModelKind) -> None:
    assert [k.name for k in model_kinds()][:6] == ["easyvqa", "hf", "http", "onnx", "graph",
                                                  "factory"]
    assert kind_of("hf:x.onnx").name == "hf" and kind_of("http://h/m.onnx").name == "http"
    assert kind_of("m.ONNX").name == "onnx" and kind_of("pkg.mod:make?x=1").name == "factory"
    with pytest.raises(InputError, match="'nonsense' is not one of: easyvqa, hf:PATH_OR_ID"):
        kind_of("nonsense")
    with pytest.raises(InputError, match="already registered"):
        register_kind(BRIGHT)
    other = KindOption("yes_word", int, help="another meaning")
    with pytest.raises(InputError, match="option 'yes_word' is declared differently"):
        register_kind(ModelKind(name="dim", syntax="dim:", audience="dim:",
                                matches=lambda s: s.startswith("dim:"), load=_load,
                                options=(other,)))
    model = load_model("bright:0.25", ModelOptions({"yes_word": "pale"}))
    assert list(model.answers) == ["pale", "no"]

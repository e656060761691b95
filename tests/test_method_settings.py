"""Methods declare their own settings: a method registered from outside, with one setting,
gets its option in every command, its section in the JSON and its map in the report, with no
edit anywhere else; by a registry call and by an entry point (a real subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.errors import InputError
from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.registry import (
    Method,
    MethodRequest,
    MethodSettings,
    ModelContext,
    positive_int,
    register,
    setting,
    unregister,
)
from blackbox_vqa.explanation import Attribution
from cli_runner import run_cli

from toys import BrightnessModel

QUESTION = "is it bright?"


@dataclass(frozen=True)
class PowerSettings:
    """The one setting of the test method."""

    power: int = setting(1, flag="power-of-cells", help="Cell means: the power they are "
                         "raised to.")

    def __post_init__(self) -> None:
        positive_int("power", self.power)


def cell_means(image: np.ndarray) -> np.ndarray:
    """Mean brightness (0-1) of the four quadrants, computed independently of the method."""
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    return np.array([[pixels[:h, :w].mean(), pixels[:h, w:].mean()],
                     [pixels[h:, :w].mean(), pixels[h:, w:].mean()]])


class _Power:
    def __init__(self, context: ModelContext) -> None:
        self.power = context.settings.of("powered").power

    def explain(self, request: MethodRequest) -> Attribution:
        return Attribution(
            method="powered", key="powered_cells", signed=False, answer=request.answer,
            answer_index=request.answer_index,
            probability=float(request.scores[request.answer_index]),
            image_map=cell_means(request.image) ** self.power,
            word_map=np.zeros(len(request.question.split())),
            tokens=tuple(request.question.rstrip("?").split()), extras={"power": self.power})


POWERED = Method(name="powered", key="powered_cells", signed=False,
                 help="quadrant brightness raised to a power", bind=_Power,
                 image_label="brightness ** power", settings=PowerSettings, default=False)


@pytest.fixture
def powered() -> Iterator[Method]:
    register(POWERED)
    try:
        yield POWERED
    finally:
        unregister("powered")


@pytest.fixture
def square_png(tmp_path: Path) -> Path:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = 255
    path = tmp_path / "square.png"
    Image.fromarray(pixels).save(path)
    return path


def _flat(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


def test_its_option_appears_in_every_command(powered: Method) -> None:
    for command in ("explain", "compare", "evaluate"):
        code, out, err = run_cli([command, "--help"])
        assert code == 0, err
        out = _flat(out)
        assert "--power-of-cells" in out and "raised to" in out, command
        assert "powered (black-box)" in out, command  # the --method(s) help lists it
    unregister("powered")
    code, out, _ = run_cli(["explain", "--help"])
    assert "--power-of-cells" not in out and "powered" not in out


def test_its_setting_reaches_the_json_and_the_report(
    powered: Method, square_png: Path, tmp_path: Path
) -> None:
    image = np.asarray(Image.open(square_png))
    code, _, err = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(square_png),
                            "-q", QUESTION, "--method", "occlusion,powered",
                            "--power-of-cells", "3", "--out", str(tmp_path / "e")])
    assert code == 0, err
    doc = json.loads((tmp_path / "e" / "explanation.json").read_text())
    np.testing.assert_allclose(doc["powered_cells"]["image"], cell_means(image) ** 3,
                               atol=1e-12)
    assert doc["powered_cells"]["power"] == 3 and doc["timing"]["powered_cells_s"] >= 0
    html = (tmp_path / "e" / "report.html").read_text()
    assert 'data-method="powered"' in html and "raised to a power" in html

    code, _, err = run_cli(["compare", "-m", "toys:brightness_model", "-m", "easyvqa",
                            "-i", str(square_png), "-q", QUESTION, "--methods", "powered",
                            "--power-of-cells", "2", "--out", str(tmp_path / "c")])
    assert code == 0, err
    compared = json.loads((tmp_path / "c" / "comparison.json").read_text())
    for model in compared["models"]:
        np.testing.assert_allclose(model["explanation"]["powered_cells"]["image"],
                                   cell_means(image) ** 2, atol=1e-12)

    code, _, err = run_cli(["evaluate", "-m", "toys:brightness_model", "--dataset",
                            "easyvqa:test", "--limit", "2", "--methods", "powered",
                            "--power-of-cells", "2", "--out", str(tmp_path / "v")])
    assert code == 0, err
    settings = json.loads((tmp_path / "v" / "settings.json").read_text())
    assert settings["power_of_cells"] == 2


def test_its_setting_is_validated_and_reached_from_python(powered: Method) -> None:
    code, _, err = run_cli(["explain", "-i", "x.png", "-q", QUESTION, "--method", "powered",
                            "--power-of-cells", "0"])
    assert code == 2 and "power must be a positive integer, got 0" in err
    assert err.count("\n") == 1
    found = explain(BrightnessModel(), np.full((8, 8, 3), 51, np.uint8), QUESTION,
                    methods="powered", power=2)
    np.testing.assert_allclose(found.attributions["powered"].image_map, np.full((2, 2), 0.04))
    assert MethodSettings.create(power=4).of("powered") == PowerSettings(4)
    with pytest.raises(InputError, match="setting 'masks' \\(--masks\\) is taken by 'rise'"):
        register(Method(name="clash", key="clash", signed=False, help="", bind=_Power,
                        settings=_clashing_settings()))


def _clashing_settings() -> type:
    @dataclass(frozen=True)
    class Clash:
        masks: int = setting(3, help="clashes with RISE's --masks")

    return Clash


def test_a_method_with_a_wrong_key_or_sign_is_refused(powered: Method) -> None:
    register(Method(name="powered", key="powered_cells", signed=True, help="", bind=_Power,
                    settings=PowerSettings), replace=True)
    with pytest.raises(InputError, match="its entry says 'powered_cells' \\(signed=True\\)"):
        explain(BrightnessModel(), np.zeros((8, 8, 3), np.uint8), QUESTION,
                methods="powered")


PLUGIN = '''
from blackbox_vqa.explainers.registry import register
from test_method_settings import POWERED

register(POWERED)
'''


def test_an_entry_point_method_brings_its_option(tmp_path: Path, square_png: Path) -> None:
    (tmp_path / "powered_plugin.py").write_text(PLUGIN)
    info = tmp_path / "powered_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: powered-plugin\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[blackbox_vqa.methods]\npowered = "
                                           "powered_plugin\n")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), str(tests), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "blackbox_vqa", "explain", "--help"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0 and "--power-of-cells" in done.stdout, done.stderr
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "blackbox_vqa", "explain", "-m",
                           "toys:brightness_model", "-i", str(square_png), "-q", QUESTION,
                           "--method", "powered", "--power-of-cells", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    image = np.asarray(Image.open(square_png))
    doc = json.loads((out / "explanation.json").read_text())
    np.testing.assert_allclose(doc["powered_cells"]["image"], cell_means(image) ** 2,
                               atol=1e-12)

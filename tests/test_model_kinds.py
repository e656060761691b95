"""A model kind registered from a plug-in module (entry point), with one option, used
through ``--model`` and a model file; its option is refused for other kinds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.cli.model_options import ModelSettings, load
from blackbox_vqa.errors import InputError
from blackbox_vqa.kinds import KindOption, ModelKind, register_kind, unregister_kind
from blackbox_vqa.specs import spec_kind

from toys import BrightnessModel

GREY = 100  # every pixel: the toy answers bright with min(1, GREY * gain / 255)


class GainModel(BrightnessModel):
    """:class:`toys.BrightnessModel` with the image multiplied by ``gain`` (clipped)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        scaled = [np.minimum(np.asarray(i, dtype=np.float64) * self.gain, 255.0)
                  for i in images]
        return super()._predict_batch(scaled, questions)


def _load_gain(spec: str, options: Mapping[str, Any]) -> GainModel:
    return GainModel(options["gain"])


GAIN = ModelKind(
    name="gain", matches=lambda spec: spec.startswith("gain:"), load=_load_gain,
    options=(KindOption("gain", float, 1.0, "gain: models: brightness factor."),))

PLUGIN = "from test_model_kinds import GAIN\n"


@pytest.fixture()
def gain_kind() -> Iterator[ModelKind]:
    register_kind(GAIN)
    yield GAIN
    unregister_kind("gain")


@pytest.fixture()
def plugin_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "gain_plugin.py").write_text(PLUGIN)
    info = tmp_path / "gain_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gain-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[blackbox_vqa.model_kinds]\ngain = "
                                           "gain_plugin:GAIN\n")
    tests = Path(__file__).resolve().parent
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), str(tests), os.environ.get("PYTHONPATH", "")])}


def _explain(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32, 3), GREY, np.uint8)).save(image)
    return subprocess.run(
        [sys.executable, "-m", "blackbox_vqa", "explain", *args, "-i", str(image),
         "-q", "is it bright", "--method", "occlusion", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300, check=False)


def test_a_plugin_kind_runs_through_model_and_its_option(
        plugin_env: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "blackbox_vqa", "explain", "--help"],
                          capture_output=True, text=True, env=plugin_env, timeout=300,
                          check=False)
    assert done.returncode == 0 and "--gain" in done.stdout, done.stderr
    done = _explain(plugin_env, tmp_path, "-m", "gain:x", "--gain", "2")
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "run" / "explanation.json").read_text())
    assert doc["answer"] == "bright"
    assert doc["probability"] == pytest.approx(2 * GREY / 255, abs=1e-12)


def test_a_plugin_kind_reads_its_option_from_a_model_file(
        plugin_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text('[dim]\nspec = "gain:x"\ngain = 0.5\n')
    done = _explain(plugin_env, tmp_path, "-m", f"@{tmp_path / 'models.toml'}:dim")
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "run" / "explanation.json").read_text())
    assert doc["answer"] == "dark"
    assert doc["probability"] == pytest.approx(1 - 0.5 * GREY / 255, abs=1e-12)


def test_the_kind_option_is_refused_for_other_kinds(
        plugin_env: dict[str, str], tmp_path: Path) -> None:
    done = _explain(plugin_env, tmp_path, "-m", "toys:brightness_model", "--gain", "2")
    assert done.returncode == 2
    assert done.stderr.strip() == ("bbvqa: error: --gain: only for gain models, not for "
                                   "'toys:brightness_model'")
    assert not (tmp_path / "run").exists()


def test_in_process_registration_default_and_bad_file_value(
        gain_kind: ModelKind, tmp_path: Path) -> None:
    assert spec_kind("gain:anything") == "gain"
    loaded = load("gain:x", ModelSettings())
    assert loaded.model.gain == 1.0  # the declared default reaches the loader
    (tmp_path / "m.toml").write_text('[bad]\nspec = "gain:x"\ngain = "loud"\n')
    with pytest.raises(InputError, match=r"--model @.*m.toml:bad: gain must be float, "
                                         r"got 'loud'"):
        load(f"@{tmp_path / 'm.toml'}:bad", ModelSettings())
    with pytest.raises(ValueError, match="already registered"):
        register_kind(GAIN)
    with pytest.raises(ValueError, match="declared as float"):
        register_kind(ModelKind(name="other", matches=lambda s: False, load=_load_gain,
                                options=(KindOption("gain", int),)))

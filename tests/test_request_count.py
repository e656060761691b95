"""The model-input count ``bbvqa explain`` prints before a run, checked against what a real
HTTP endpoint (one input per request) then receives, and against the run's own records."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.run_cost import request_count, total_line
from blackbox_vqa.explainers.cost import CallEstimate
from blackbox_vqa.explainers.registry import Method, MethodSettings, register, unregister
from blackbox_vqa.models.reference import reference_adapter
from blackbox_vqa.server.app import create_app
from cli_runner import run_cli
from live_server import uvicorn_server

BLUE = Path(__file__).resolve().parents[1] / "examples" / "blue_circle.png"
QUESTION = "what color is the shape"  # 5 words; the image is 64 x 64


class CountingModel:
    """The reference model, counting the inputs it scores (the server's side)."""

    def __init__(self) -> None:
        self.inner = reference_adapter()
        self.answers = self.inner.answers
        self.inputs = 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def answer_probs_batch(self, images: Any, questions: Any) -> Any:
        with self.lock:
            self.inputs += len(images)
        return self.inner.answer_probs_batch(images, questions)


def _printed(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("total: "))
    found = re.search(r"gets at most (\d+) requests", line)
    assert found, line
    return int(found.group(1))


def _run(url: str, out: Path, *options: str) -> tuple[int, str]:
    code, stdout, stderr = run_cli(["explain", "-m", url, "-i", str(BLUE), "-q", QUESTION,
                                    "--out", str(out), *options])
    assert code == 0, stderr
    return code, stdout


@pytest.mark.parametrize("options, expected", [
    (("--grid", "4"), 1 + 16 + 5),
    (("--method", "rise", "--masks", "20"), 1 + 20),
    (("--method", "occlusion,rise", "--grid", "2", "--masks", "7"), 1 + 4 + 5 + 7),
])
def test_printed_count_equals_the_requests_an_endpoint_receives(
    tmp_path: Path, options: tuple[str, ...], expected: int
) -> None:
    model = CountingModel()
    with uvicorn_server(create_app(model, max_batch=1)) as url:
        _, dry = _run(url, tmp_path / "dry", *options, "--dry-run")
        assert model.inputs == 0 and not (tmp_path / "dry").exists()
        _, stdout = _run(url, tmp_path / "o", *options)
    assert _printed(dry) == _printed(stdout) == expected == model.inputs


def test_with_metrics_the_count_covers_them_and_bounds_the_requests(tmp_path: Path) -> None:
    model = CountingModel()
    options = ("--method", "occlusion,rise", "--grid", "4", "--masks", "20", "--metrics")
    with uvicorn_server(create_app(model, max_batch=1)) as url:
        _, dry = _run(url, tmp_path / "dry", *options, "--dry-run")
        _, stdout = _run(url, tmp_path / "o", *options)
    doc = json.loads((tmp_path / "o" / "explanation.json").read_text())
    scored = sum(entry["evaluations"] for entry in doc["metrics"].values())
    # occlusion 4x4: image 2 + 2*15*5 = 152, words 1 + 2*4*5 = 41; rise (a pixel map,
    # 20 steps): 2 + 2*19*5 = 192, no word map
    assert scored == 152 + 41 + 192
    printed = _printed(stdout)
    assert printed == _printed(dry) == 1 + 16 + 5 + 20 + scored
    assert "total: at most" in stdout
    # the client does not resend an input it has answered: the random orders repeat some
    assert printed - scored <= model.inputs <= printed


def test_the_count_adds_each_method_and_names_the_uncounted() -> None:
    settings = MethodSettings.create(grid=4, rise_masks=30, shap_permutations=2)
    count = request_count(64, 64, 5, ("occlusion", "gradient", "rise", "mm-shap"), settings,
                          metrics=False)
    # mm-shap: 21 players, 2 + 2 * 20 = 42 coalitions, the whole input being the original
    assert count.parts == (("original", 1), ("occlusion", 21), ("rise", 30), ("mm-shap", 41))
    assert count.total == 93 and not count.exact and count.uncounted == ("gradient",)
    assert total_line(count) == (
        "total: at most 93 model inputs (1 original + 21 occlusion + 30 rise + 41 mm-shap); "
        "an endpoint that takes one input per request gets at most 93 requests (not "
        "counted, no count stated: gradient)")
    windows = request_count(64, 64, 5, ("occlusion",), MethodSettings.create(
        window=(32, 32), stride=(16, 16)), metrics=True)
    # 3 x 3 windows; metrics on a pixel map (20 steps) and 5 words
    assert windows.parts == (("original", 1), ("occlusion", 9 + 5),
                             ("metrics", 2 + 2 * 19 * 5 + 1 + 2 * 4 * 5))


def test_a_plug_in_estimate_is_added_and_a_wrong_one_refused() -> None:
    def bind(context: Any) -> Any:
        raise AssertionError("not bound by a count")

    register(Method(name="counted", key="counted", signed=True, help="h", bind=bind,
                    default=False, calls=lambda query: CallEstimate(query.words * 3,
                                                                    image_units=4)))
    register(Method(name="liar", key="liar", signed=True, help="h", bind=bind,
                    default=False, calls=lambda query: 7))
    try:
        count = request_count(64, 64, 4, ("counted",), MethodSettings(), metrics=True)
        # metrics on a 2 x 2 map: 2 + 2*3*5; no word map
        assert count.parts == (("original", 1), ("counted", 12), ("metrics", 32))
        with pytest.raises(InputError, match="method 'liar': calls must return a "
                                             "CallEstimate, got 7"):
            request_count(64, 64, 4, ("liar",), MethodSettings(), metrics=False)
        with pytest.raises(InputError, match="inputs must be an integer >= 0, got -1"):
            CallEstimate(-1)
    finally:
        unregister("counted")
        unregister("liar")

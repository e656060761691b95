"""The explanation API: the library call, the method registry and the shared model options,
seen through every command (real servers on 127.0.0.1, real files)."""

from __future__ import annotations

import ast
import http.server
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.adapters.http.endpoint import HttpAdapter
from blackbox_vqa.adapters.http.wires import TopKWire
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.explain import Explainer, explain
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.explainers.registry import (
    Method,
    MethodRequest,
    ModelContext,
    get_method,
    method_keys,
    parse_methods,
    register,
    unregister,
)
from blackbox_vqa.explanation import Attribution, Explanation
from blackbox_vqa.text import split_words
from cli_runner import run_cli
from live_server import scripted_server, send_json, uvicorn_server

from toys import BrightnessModel, LinearVQANet, toy_tokenizer

QUESTION = "is it bright?"


# -- a method registered from outside the package -------------------------------------------

def quadrant_means(image: np.ndarray) -> np.ndarray:
    """Mean brightness (0-1) of the four quadrants, computed independently of the method."""
    pixels = np.asarray(image, dtype=np.float64)
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    return np.array([[pixels[:h, :w].mean(), pixels[:h, w:].mean()],
                     [pixels[h:, :w].mean(), pixels[h:, w:].mean()]]) / 255.0


class _Quadrants:
    """Image map: each quadrant's brightness times the answer's score; words: word length."""

    def __init__(self, context: ModelContext) -> None:
        if not context.model.answers:
            raise NotSupportedError("no answers")

    def explain(self, request: MethodRequest) -> Attribution:
        means = quadrant_means(request.image)
        words = split_words(request.question)
        return Attribution(
            method="quadrants", key="quadrants", signed=False, answer=request.answer,
            answer_index=request.answer_index,
            probability=float(request.scores[request.answer_index]),
            image_map=means * request.scores[request.answer_index],
            word_map=np.array([float(len(w)) for w in words]), tokens=tuple(words),
            extras={"unit": "brightness x score"}, stats={"cells": 4.0},
        )


@pytest.fixture
def quadrants() -> Iterator[Method]:
    method = Method(name="quadrants", key="quadrants", signed=False,
                    help="quadrant brightness times the answer's score", bind=_Quadrants,
                    image_label="brightness x score")
    register(method)
    try:
        yield method
    finally:
        unregister("quadrants")


def _square() -> np.ndarray:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = 255
    return pixels


def test_a_registered_method_runs_through_explain_compare_evaluate_json_and_html(
    quadrants: Method, square_image: Path, tmp_path: Path
) -> None:
    assert "quadrants" in parse_methods("all") and method_keys()["quadrants"] == \
        ("quadrants", False)
    expected = quadrant_means(_square()) * (1 - _square().mean() / 255.0)  # p("dark")

    code, _, err = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(square_image),
                            "-q", QUESTION, "--method", "occlusion,quadrants",
                            "--out", str(tmp_path / "e")])
    assert code == 0, err
    doc = json.loads((tmp_path / "e" / "explanation.json").read_text())
    np.testing.assert_allclose(doc["quadrants"]["image"], expected, atol=1e-12)
    assert doc["quadrants"]["words"] == [2.0, 2.0, 6.0] and doc["quadrants"]["unit"]
    html = (tmp_path / "e" / "report.html").read_text()
    assert 'data-method="quadrants"' in html and "quadrant brightness" in html
    assert (tmp_path / "e" / "quadrants.png").is_file()

    code, _, err = run_cli(["compare", "-m", "toys:brightness_model", "-m",
                            "test_explain_api:brightness_copy", "-i", str(square_image), "-q",
                            QUESTION, "--methods", "quadrants", "--out", str(tmp_path / "c")])
    assert code == 0, err
    compared = json.loads((tmp_path / "c" / "comparison.json").read_text())
    for model in compared["models"]:
        np.testing.assert_allclose(model["explanation"]["quadrants"]["image"], expected,
                                   atol=1e-12)
    assert [a["method"] for a in compared["agreement"]] == ["quadrants"]
    assert compared["agreement"][0]["rank_correlation"] == pytest.approx(1.0)
    assert 'data-method="quadrants"' in (tmp_path / "c" / "report.html").read_text()

    code, _, err = run_cli(["evaluate", "-m", "toys:brightness_model", "--dataset",
                            "easyvqa:test", "--limit", "2", "--methods", "occlusion,quadrants",
                            "--out", str(tmp_path / "v")])
    assert code == 0, err
    results = json.loads((tmp_path / "v" / "results.json").read_text())
    assert "quadrants" in json.dumps(results["human_attention"])
    stored = sorted((tmp_path / "v" / "items").glob("*.npz"))
    assert len(stored) == 2
    with np.load(stored[0]) as archive:
        assert archive["quadrants.image"].shape == (2, 2)


def brightness_copy() -> BrightnessModel:
    model = BrightnessModel()
    model.name = "brightness-copy"
    return model


def test_registry_refuses_bad_and_clashing_entries(quadrants: Method) -> None:
    with pytest.raises(InputError, match="already registered"):
        register(quadrants)
    with pytest.raises(InputError, match="key 'occlusion' is taken"):
        register(Method(name="other", key="occlusion", signed=True, help="", bind=_Quadrants))
    with pytest.raises(InputError, match="not 'all'"):
        Method(name="all", key="x", signed=True, help="", bind=_Quadrants)
    with pytest.raises(InputError, match="unknown method 'nope'; known: occlusion"):
        get_method("nope")
    with pytest.raises(InputError, match="methods: unknown method 'magic'"):
        parse_methods("occlusion,magic")


# -- the library call ------------------------------------------------------------------------

def test_explain_equals_the_explainers_and_reads_back_from_json() -> None:
    image = _square()
    found = explain(BrightnessModel(), image, QUESTION, grid=4, baseline="black",
                    label="brightness")
    direct = Occlusion(BrightnessModel(), grid=4, baseline="black").explain(image, QUESTION)
    occlusion = found.attribution("occlusion")
    assert occlusion is not None
    np.testing.assert_array_equal(occlusion.image_map, direct.image_map)
    np.testing.assert_array_equal(occlusion.word_map, direct.word_map)
    assert (found.answer, found.probability) == ("dark", pytest.approx(1 - image.mean() / 255))
    back = Explanation.from_dict(json.loads(json.dumps(found.to_dict())), method_keys())
    assert back.to_dict()["occlusion"] == found.to_dict()["occlusion"]
    assert back.attribution("occlusion").signed is True  # type: ignore[union-attr]


def test_explain_records_unavailable_methods_and_refuses_unknown_settings() -> None:
    found = explain(BrightnessModel(), _square(), QUESTION, methods="all", grid=2,
                    rise_masks=16, shap_permutations=2)
    assert set(found.attributions) == {"occlusion", "rise", "mm-shap"}  # the black-box ones
    assert "offers no gradients" in found.unavailable["guided-bp"].reason
    assert found.to_dict()["gradient"] == {"available": False,
                                           "reason": found.unavailable["gradient"].reason}
    with pytest.raises(InputError, match="unknown setting 'gird'"):
        explain(BrightnessModel(), _square(), QUESTION, gird=4)
    with pytest.raises(InputError, match="answer 'maybe' is not one of"):
        explain(BrightnessModel(), _square(), QUESTION, answer="maybe")
    with pytest.raises(InputError, match="grid must be a positive integer"):
        Explainer(BrightnessModel(), grid=0)


def _hf_handler(handler: http.server.BaseHTTPRequestHandler, method: str, body: bytes) -> None:
    """An ``hf``-format endpoint in front of BrightnessModel (PNG images)."""
    import base64
    import io

    request = json.loads(body)
    image = Image.open(io.BytesIO(base64.b64decode(request["inputs"]["image"])))
    scores = BrightnessModel().answer_probs(np.asarray(image.convert("RGB")),
                                            request["inputs"]["question"])
    answers = sorted(zip(["dark", "bright"], scores, strict=True), key=lambda p: -p[1])
    send_json(handler, 200, json.dumps(
        [{"answer": a, "score": float(s)} for a, s in answers]).encode())


def test_an_hf_endpoint_explains_from_python_without_prepare() -> None:
    image = _square()
    local = Occlusion(BrightnessModel(), grid=4, baseline="black").explain(image, QUESTION)
    with scripted_server(_hf_handler) as url, \
            HttpAdapter(url, wire_format=TopKWire(top_k=2)) as remote:
        result = Occlusion(remote, grid=4, baseline="black").explain(image, QUESTION)
        found = explain(remote, image, QUESTION, grid=4, baseline="black")
    assert result.answer == local.answer == found.answer
    np.testing.assert_allclose(result.image_map, local.image_map, atol=1e-12)
    np.testing.assert_allclose(result.word_map, local.word_map, atol=1e-12)
    assert found.sections["score_semantics"]["kind"] == "top_k"


# -- model options everywhere ----------------------------------------------------------------

def test_compare_a_token_endpoint_and_an_hf_endpoint_beside_local_models(
    square_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blackbox_vqa.server.app import create_app

    monkeypatch.setenv("TEST_BBVQA_TOKEN", "s3cret-token")
    with uvicorn_server(create_app(BrightnessModel(), token="s3cret-token")) as served, \
            scripted_server(_hf_handler) as vendor:
        models = tmp_path / "models.toml"
        models.write_text(
            f'[served]\nspec = "{served}"\n'
            'headers = ["Authorization: Bearer ${TEST_BBVQA_TOKEN}"]\n\n'
            f'[vendor]\nspec = "{vendor}"\nhttp-format = "hf"\n', encoding="utf-8")
        code, out, err = run_cli([
            "compare", "-m", "toys:brightness_model", "-m", "easyvqa",
            "-m", f"@{models}:served", "-m", f"@{models}:vendor",
            "-i", str(square_image), "-q", QUESTION, "--baseline", "black", "--grid", "8",
            "--out", str(tmp_path / "c")])
        # Without the token the endpoint refuses: the options really travel per model.
        bad = tmp_path / "bad.toml"
        bad.write_text(f'[served]\nspec = "{served}"\n', encoding="utf-8")
        refused = run_cli(["compare", "-m", "toys:brightness_model", "-m", f"@{bad}:served",
                           "-i", str(square_image), "-q", QUESTION,
                           "--out", str(tmp_path / "r")])
    assert code == 0, err
    doc = json.loads((tmp_path / "c" / "comparison.json").read_text())
    runs = {m["spec"]: m for m in doc["models"]}
    assert set(runs) == {"toys:brightness_model", "easyvqa", "served", "vendor"}
    assert all(m["status"] == "ok" for m in runs.values())
    local = np.asarray(runs["toys:brightness_model"]["explanation"]["occlusion"]["image"])
    for name in ("served", "vendor"):
        np.testing.assert_allclose(runs[name]["explanation"]["occlusion"]["image"], local,
                                   atol=1e-12)
    assert runs["vendor"]["explanation"]["score_semantics"]["kind"] == "top_k"
    for path in (tmp_path / "c").iterdir():
        assert "s3cret" not in path.read_text(errors="replace")
    assert "s3cret" not in out + err
    assert refused[0] == 1 and "401" in refused[2] and "s3cret" not in refused[2]


def test_evaluate_an_hf_endpoint_with_every_gradient_method_listed(tmp_path: Path) -> None:
    common = ["--dataset", "easyvqa:test", "--limit", "2", "--baseline", "black",
              "--grid", "4"]
    with scripted_server(_hf_handler) as url:
        code, _, err = run_cli(["evaluate", "-m", url, "--http-format", "hf",
                                "--methods", "occlusion,guided-bp,gradient",
                                "--out", str(tmp_path / "remote"), *common])
    assert code == 0, err
    assert "guided-bp skipped" in err or "guided-bp" in err
    code, _, err = run_cli(["evaluate", "-m", "toys:brightness_model",
                            "--methods", "occlusion", "--out", str(tmp_path / "local"),
                            *common])
    assert code == 0, err
    remote = sorted((tmp_path / "remote" / "items").glob("*.npz"))
    local = sorted((tmp_path / "local" / "items").glob("*.npz"))
    assert [p.name for p in remote] == [p.name for p in local] and len(remote) == 2
    for a, b in zip(remote, local, strict=True):
        with np.load(a) as left, np.load(b) as right:
            np.testing.assert_allclose(left["occlusion.image"], right["occlusion.image"],
                                       atol=1e-12)


def test_evaluate_runs_occlusion_guided_bp_and_gradient(tmp_path: Path) -> None:
    code, _, err = run_cli(["evaluate", "-m", "easyvqa", "--dataset", "easyvqa:test",
                            "--limit", "2", "--grid", "4",
                            "--methods", "occlusion,guided-bp,gradient",
                            "--out", str(tmp_path / "run")])
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["human_attention"]["rows"]) >= {"occlusion", "guided-bp",
                                                           "gradient"}


def test_model_options_are_refused_where_no_model_can_use_them(
    square_image: Path, tmp_path: Path
) -> None:
    cases = [
        (["explain", "-m", "toys:brightness_model", "--vocab", "v.txt"],
         "--vocab: only for .onnx models"),
        (["explain", "-m", "toys:brightness_model", "--http-format", "hf"],
         "--http-format: only for http:// models"),
        (["explain", "-m", "toys:brightness_model", "--threads", "0"], "--threads must be >= 1"),
        (["explain", "-m", "@missing.toml:x"], "model file not found"),
        (["explain", "-m", "@models.toml"], "@FILE:NAME"),
        (["compare", "-m", "toys:brightness_model", "-m", "easyvqa", "--methods", "magic"],
         "--methods: unknown method 'magic'"),
    ]
    for args, words in cases:
        code, _, err = run_cli([*args, "-i", str(square_image), "-q", QUESTION,
                                "--out", str(tmp_path / "o")])
        assert code == 2, (args, err)
        assert err.startswith("bbvqa: error: ") and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "o").exists()
    table = tmp_path / "m.toml"
    table.write_text('[a]\nspec = "easyvqa"\ncolour = "red"\n[b]\nport = 1\n', encoding="utf-8")
    for name, words in (("a", "unknown key 'colour'"), ("b", "'spec' (the model spec) is "
                                                       "missing"), ("c", "has no table [c]")):
        code, _, err = run_cli(["explain", "-m", f"@{table}:{name}", "-i", str(square_image),
                                "-q", QUESTION, "--out", str(tmp_path / "o")])
        assert code == 2 and words in err, err


def test_dry_run_prints_the_request_count_and_sends_nothing(
    square_image: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli(["explain", "-m", "http://127.0.0.1:9", "-i", str(square_image),
                              "-q", QUESTION, "--grid", "4", "--dry-run",
                              "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert "20 model inputs (1 original + 16 cells of the 4x4 grid + 3 words)" in out
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(["explain", "-i", str(square_image), "-q", QUESTION, "--grid",
                            "65", "--dry-run"])
    assert code == 2 and "65-cell grid" in err


# -- honest guided mode ----------------------------------------------------------------------

def linear_model() -> Any:
    """A ReLU-free TorchAdapter (its guided gradient is the plain one)."""
    from blackbox_vqa.adapters.torch.module import TorchAdapter

    return TorchAdapter(LinearVQANet(), ["red", "green", "blue"], toy_tokenizer(),
                        image_size=16, device="cpu", name="linear")


def test_guided_mode_says_when_it_met_no_relu(square_image: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(["explain", "-m", "test_explain_api:linear_model", "-i",
                              str(square_image), "-q", "what color is the shape",
                              "--method", "guided-bp,gradient", "--out", str(tmp_path / "g")])
    assert code == 0, err
    doc = json.loads((tmp_path / "g" / "explanation.json").read_text())
    guided = doc["guided_backprop"]
    assert guided["relus_guided"] == 0 and "equals the plain gradient" in guided["note"]
    np.testing.assert_array_equal(guided["image"], doc["gradient"]["image"])
    assert "note" not in doc["gradient"] and "equals the plain gradient" in out
    code, _, err = run_cli(["explain", "-i", str(square_image), "-q",
                            "what color is the shape?", "--method", "guided-bp",
                            "--out", str(tmp_path / "r")])
    assert code == 0, err
    relu = json.loads((tmp_path / "r" / "explanation.json").read_text())["guided_backprop"]
    assert relu["relus_guided"] > 0 and "note" not in relu


# -- layering --------------------------------------------------------------------------------

LAYERS = {
    **dict.fromkeys(("errors", "version", "text", "images", "sizes", "bounded_files", "wire",
                     "metadata", "preprocess", "resize", "outputs", "explanation"), 0),
    "adapters": 1, "models": 2, "datasets": 2, "exporters": 3, "specs": 4, "kinds": 4,
    "gradient_source": 4, "explainers": 5, "explain": 6, "evaluation": 7, "comparison": 7,
    "server": 8, "report": 9, "cli": 10, "__main__": 11,
}
"""Each top-level module or sub-package of blackbox_vqa and its floor (ARCHITECTURE.md)."""


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_imports_point_down_only() -> None:
    package = Path(__file__).resolve().parents[1] / "src" / "blackbox_vqa"
    wrong: list[str] = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts == ("__init__",):
            continue
        floor = parts[0]
        assert floor in LAYERS, f"{floor} has no floor in LAYERS"
        for name in _imports(path):
            if not name.startswith("blackbox_vqa"):
                continue
            target = name.split(".")
            if len(target) == 1:
                wrong.append(f"{'/'.join(parts)} imports the package root")
                continue
            if LAYERS[target[1]] > LAYERS[floor]:
                wrong.append(f"{'/'.join(parts)} -> {name}")
            command = parts[1] if floor == "cli" and len(parts) > 1 else None
            shared = ("model_options", "method_options", "option_groups", "executor_options",
                      "progress", "app")
            if (command and command != "app" and target[1] == "cli" and len(target) > 2
                    and target[2] not in (command, *shared)):
                wrong.append(f"command {command} imports command {target[2]}")
    assert wrong == []


@pytest.mark.parametrize(("extra", "words"), [
    (["--incremental", "fast"],
     "incremental must be exact, off, approx or approx:TAU, got 'fast'"),
    (["--ig-baseline", "pink", "--method", "integrated-gradients"],
     "baseline must be one of imagenet-mean"),
    (["-m", "http://127.0.0.1:9", "--http-total-timeout", "0"],
     "(--http-total-timeout) must be a finite number of seconds > 0"),
    (["-m", "http://127.0.0.1:9", "--http-max-response-mb", "0"],
     "(--http-max-response-mb) must be an integer >= 1"),
    (["--remote-model", "x"], "--remote-model: only for http:// models"),
])
def test_new_options_refuse_bad_values(
    extra: list[str], words: str, square_image: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli(["explain", "-i", str(square_image), "-q", "what color?",
                            "--out", str(tmp_path / "o"), *extra])
    assert code == 2 and words in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()

"""``bbvqa evaluate`` end to end: VQA-HAT fixture, resume after SIGKILL, settings, workers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from math import lcm
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from blackbox_vqa.evaluation.pos import nltk_tagger_available
from blackbox_vqa.evaluation.runner import item_rng
from blackbox_vqa.evaluation.runstore import RunStore
from blackbox_vqa.explainers.occlusion import Occlusion
from cli_runner import run_cli
from vqa_fixture import build_vqa_fixture, square_image

from toys import BrightnessModel

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def resize14(values: np.ndarray) -> np.ndarray:
    """Area averaging to 14 x 14 by repeating pixels and averaging blocks; rounded to 12
    decimals so that cells equal but for round-off stay tied."""
    rows, cols = values.shape
    up_r, up_c = lcm(rows, 14), lcm(cols, 14)
    big = np.repeat(np.repeat(values, up_r // rows, axis=0), up_c // cols, axis=1)
    return big.reshape(14, up_r // 14, 14, up_c // 14).mean(axis=(1, 3)).round(12)


def rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(resize14(np.abs(a)).ravel(), resize14(b).ravel()).statistic)


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0


def test_vqa_hat_run_reports_correlations_computed_independently(
    tmp_path: Path
) -> None:
    fx = build_vqa_fixture(tmp_path / "data")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["evaluate", "--model", "toys:brightness_model", *fx.options(),
                               "--grid", "4", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "blackbox_vqa.evaluation/1"
    assert results["items"]["planned"] == results["items"]["evaluated"] == 2
    assert results["items"]["skipped_in_dataset"] == {
        "no image": 1, "no human map": 1, "no annotation": 1}
    gbp = results["methods"]["guided-bp"]
    assert gbp["available"] is False and "offers no gradients" in gbp["reason"]

    # Recompute every number with the explainer, scipy and the maps read by PIL.
    model = BrightnessModel()
    occlusion = Occlusion(model, grid=4)
    image2 = np.asarray(Image.open(fx.images / "COCO_val2014_000000000002.jpg").convert("RGB"))
    map1 = occlusion.explain(square_image(), "Is the square bright?").image_map
    map2 = occlusion.explain(image2, "Is it not dark?").image_map
    hat = {name: grey(fx.hat / f"{name}.png") for name in ("1001_1", "1001_2", "1002_1")}
    assert rho(map1, hat["1001_1"]) == pytest.approx(1.0)  # the square, at both resolutions
    per_item = [(rho(map1, hat["1001_1"]) + rho(map1, hat["1001_2"])) / 2,
                rho(map2, hat["1002_1"])]
    row = results["human_attention"]["rows"]["occlusion"]
    assert row["mean"] == pytest.approx(np.mean(per_item), abs=1e-9)
    assert row["sem"] == pytest.approx(np.std(per_item, ddof=1) / math.sqrt(2), abs=1e-9)
    chance = [np.mean([spearmanr(item_rng(0, "1001").random((14, 14)).ravel(),
                                 resize14(hat[n]).ravel()).statistic
                       for n in ("1001_1", "1001_2")]),
              spearmanr(item_rng(0, "1002").random((14, 14)).ravel(),
                        resize14(hat["1002_1"]).ravel()).statistic]
    assert results["human_attention"]["rows"]["random"]["mean"] == pytest.approx(
        np.mean(chance), abs=1e-9)
    inter = results["human_attention"]["rows"]["inter-human"]
    assert inter["n"] == 1
    assert inter["mean"] == pytest.approx(rho(hat["1001_1"], hat["1001_2"]), abs=1e-9)

    # 1001: "bright" is right; 1002: "not" swaps the scores, "dark" is wrong (2 of 10 said it).
    assert results["accuracy"] == {"judged": 2, "accuracy": 0.5,
                                   "vqa_accuracy": pytest.approx((1 + 2 / 3) / 2)}
    assert results["failure_prediction"]["reason"].startswith("needs at least two")
    assert results["pos"]["tagger"] in ("textblob-pattern", "nltk-averaged-perceptron")
    settings = json.loads((out / "settings.json").read_text())
    assert settings["dataset"]["hat"] == str(fx.hat.resolve()) and settings["items"] == 2
    settings.pop("schema")
    with RunStore.open(out, settings) as store:  # the lock was released
        assert store.done_keys() == {"1001", "1002"}
    assert "| occlusion |" in stdout and "`guided-bp` not available" in stdout
    assert (out / "results.md").read_text() in stdout
    assert (out / "pos.png").read_bytes().startswith(b"\x89PNG")


def _item_files(run: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (run / "items").glob("*.npz")}


def test_a_run_killed_with_sigkill_resumes_and_does_every_item_once(
    tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ["evaluate", "--model", "eval_toys:slow_brightness", "--dataset", "easyvqa:test",
            "--limit", "6", "--grid", "4", "--methods", "occlusion", "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
    child = subprocess.Popen([sys.executable, "-m", "blackbox_vqa", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(_item_files(run)) < 2 and child.poll() is None:
            assert time.monotonic() < deadline, "no items stored within 60 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
        assert child.stderr is not None
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    before = _item_files(run)
    assert 2 <= len(before) < 6
    settings = json.loads((run / "settings.json").read_text())
    settings.pop("schema")
    with RunStore.open(run, settings) as store:  # every stored item is whole
        assert all(store.read(name[:-4]).meta["status"] == "done" for name in before)

    code, _, err = run_cli(args)
    assert code == 0, err
    assert f"{len(before)} stored earlier, {6 - len(before)} to evaluate" in err
    after = _item_files(run)
    assert len(after) == 6
    assert {k: after[k] for k in before} == before  # not one earlier item was redone
    assert not [p for p in (run / "items").iterdir() if p.suffix != ".npz"]
    results = json.loads((run / "results.json").read_text())
    assert results["items"]["evaluated"] == 6
    assert results["timing"]["items_this_run"] == 6 - len(before)


def test_rerunning_with_other_settings_is_refused(
    tmp_path: Path
) -> None:
    base = ["evaluate", "--model", "toys:brightness_model", "--dataset", "easyvqa:test",
            "--methods", "occlusion", "--grid", "2", "--out", str(tmp_path)]
    assert run_cli([*base, "--limit", "2"])[0] == 0
    code, out, err = run_cli([*base, "--limit", "3"])
    assert code == 2 and out == ""
    assert err.startswith("bbvqa: error: ") and err.count("\n") == 1
    assert "other settings" in err and "limit: 2 there, 3 now" in err
    again, _, err = run_cli([*base, "--limit", "2"])  # same settings: nothing to do
    assert again == 0 and "2 stored earlier, 0 to evaluate" in err


def assert_close(got: object, expected: object, *, atol: float = 1e-6) -> None:
    """``got == expected`` for JSON-like values, floats within ``atol`` (float32 round-off
    between computations ordered differently); everything else exactly."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected)
        for key, value in expected.items():
            assert_close(got[key], value, atol=atol)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert_close(a, b, atol=atol)
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert got == pytest.approx(expected, rel=0, abs=atol, nan_ok=True)
    else:
        assert got == expected


def _load_run(run: Path) -> dict[str, tuple[dict[str, object], dict[str, np.ndarray]]]:
    out = {}
    for path in sorted((run / "items").glob("*.npz")):
        with np.load(path) as archive:
            meta = json.loads(str(archive["meta"][()]))
            meta.pop("seconds")
            out[path.name] = (meta, {k: archive[k] for k in archive.files
                                    if k not in ("meta", "item_key")})
    return out


def test_parallel_workers_give_results_identical_to_a_serial_run(
    tmp_path: Path
) -> None:
    base = ["evaluate", "--model", "eval_toys:torch_toy", "--dataset", "easyvqa:test",
            "--limit", "4", "--seed", "3", "--grid", "4", "--methods", "occlusion"]
    assert run_cli([*base, "--out", str(tmp_path / "serial")])[0] == 0
    code, _, err = run_cli([*base, "--workers", "2", "--out", str(tmp_path / "parallel")])
    assert code == 0, err
    serial, parallel = _load_run(tmp_path / "serial"), _load_run(tmp_path / "parallel")
    assert list(serial) == list(parallel) and len(serial) == 4
    # Same items, answers and words; numbers equal to float32 round-off: a worker process
    # may run torch with another thread count, whose kernels sum in another order.
    for name, (meta, arrays) in serial.items():
        assert_close(parallel[name][0], meta)
        assert set(arrays) == {"occlusion.image", "occlusion.words"}
        for key, array in arrays.items():
            np.testing.assert_allclose(parallel[name][1][key], array, rtol=0, atol=1e-6)
    results = [json.loads((tmp_path / r / "results.json").read_text())
               for r in ("serial", "parallel")]
    for key in ("human_attention", "pos", "accuracy", "failure_prediction"):
        assert_close(results[1][key], results[0][key])
    assert results[1]["timing"]["workers"] == 2


def test_guided_backprop_maps_are_stored_and_correlated(
    tmp_path: Path
) -> None:
    from blackbox_vqa.datasets.easyvqa import list_easyvqa, shape_map
    from blackbox_vqa.explainers.guided_backprop import GuidedBackprop
    from blackbox_vqa.images import load_image
    from eval_toys import torch_toy

    out = tmp_path / "run"
    code, _, err = run_cli(["evaluate", "--model", "eval_toys:torch_toy", "--dataset",
                            "easyvqa:test", "--limit", "2", "--grid", "4", "--methods",
                            "guided-bp", "--out", str(out)])
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == {"guided-bp": {"available": True, "reason": None}}
    items = {item.key: item for item in list_easyvqa("test").items}
    explainer = GuidedBackprop(torch_toy())
    values = []
    for key, (meta, arrays) in _load_run(out).items():
        item = items[key[:-4]]
        pixels = load_image(item.image)
        expected = explainer.explain(pixels, item.question)
        assert meta["answer"] == expected.answer
        np.testing.assert_allclose(arrays["guided-bp.image"], expected.image_map, rtol=1e-6)
        np.testing.assert_allclose(arrays["guided-bp.words"], expected.word_map, rtol=1e-6)
        assert arrays["guided-bp.image"].shape == (16, 16)  # the model's input size
        values.append(spearmanr(resize14(expected.image_map).ravel(),
                                resize14(shape_map(pixels)).ravel()).statistic)
    row = results["human_attention"]["rows"]["guided-bp"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(np.mean(values), abs=1e-6)


def test_a_model_that_fails_to_load_in_the_workers_is_one_line_exit_1(
    tmp_path: Path
) -> None:
    spec = "blackbox_vqa.specs:no_such_factory"  # fails in the workers, not here
    code, _, err = run_cli(["evaluate", "--model", spec, "--dataset", "easyvqa:test",
                            "--limit", "2", "--workers", "2", "--out", str(tmp_path)])
    assert code == 1
    assert err.splitlines()[-1] == (
        "bbvqa: error: 'blackbox_vqa.specs' has no attribute 'no_such_factory' "
        f"(spec {spec!r})")


def test_a_model_without_gradients_and_only_guided_bp_is_refused(
    tmp_path: Path
) -> None:
    code, _, err = run_cli(["evaluate", "--model", "toys:brightness_model", "--dataset",
                            "easyvqa:test", "--limit", "1", "--methods", "guided-bp",
                            "--out", str(tmp_path)])
    assert code == 2
    assert "none of the methods can run on this model: guided-bp is not available" in err
    assert "offers no gradients" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--grid", "0"], "--grid must be >= 1, got 0"),
        (["--folds", "1"], "--folds must be >= 2, got 1"),
        (["--methods", "occlusion,lime"], "--methods: unknown method 'lime'"),
        (["--methods", ","], "--methods must name at least one of"),
        (["--batch-size", "zero"], "batch size must be 'auto' or a positive integer"),
        (["--baseline", "grey"], "baseline must be one of imagenet-mean, black, blur"),
        (["--tagger", "spacy"], "tagger must be one of auto, nltk, pattern"),
        (["--model", "not a spec"], "model spec 'not a spec' is not one of"),
        (["--dataset", "coco"], "--dataset must be one of easyvqa:train, easyvqa:test, vqa"),
        (["--dataset", "vqa"], "--dataset vqa needs --questions FILE and --images DIR"),
        (["--hat", "somewhere"], "--hat only apply to --dataset vqa"),
    ],
)
def test_bad_options_are_one_line_exit_2(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    args = ["evaluate", "--model", "toys:brightness_model", "--dataset", "easyvqa:test",
            "--out", str(tmp_path / "run")]
    code, out, err = run_cli([*args, *extra])
    assert code == 2 and out == ""
    assert err.startswith("bbvqa: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "run").exists()


def test_vqa_files_that_are_missing_are_named(
    tmp_path: Path
) -> None:
    fx = build_vqa_fixture(tmp_path)
    code, _, err = run_cli(["evaluate", "--dataset", "vqa", "--questions",
                            str(tmp_path / "missing.json"), "--images", str(fx.images),
                            "--out", str(tmp_path / "run")])
    assert code == 2 and f"--questions file not found: {tmp_path / 'missing.json'}" in err


@pytest.mark.skipif(nltk_tagger_available(), reason="nltk's tagger data is installed here")
def test_asking_for_the_nltk_tagger_without_its_data_is_refused(
    tmp_path: Path
) -> None:
    code, _, err = run_cli(["evaluate", "--dataset", "easyvqa:test", "--tagger", "nltk",
                            "--out", str(tmp_path)])
    assert code == 2 and "the nltk tagger needs its data" in err


def test_resuming_with_another_model_under_the_same_name_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[m]\nspec = "toys:brightness_model"\n', encoding="utf-8")
    base = ["evaluate", "--model", f"@{models}:m", "--dataset", "easyvqa:test",
            "--methods", "occlusion", "--grid", "2", "--limit", "2",
            "--out", str(tmp_path / "run")]
    assert run_cli(base)[0] == 0
    models.write_text('[m]\nspec = "eval_toys:torch_toy"\n', encoding="utf-8")
    code, _, err = run_cli(base)
    assert code == 2 and err.count("\n") == 1, err
    assert "model_identity.spec: 'toys:brightness_model' there, 'eval_toys:torch_toy' now" \
        in err


def test_the_run_identity_holds_every_scoring_option_and_no_secret() -> None:
    from blackbox_vqa.cli.evaluate import _model_identity

    spec = "http://user:pw-secret@127.0.0.1:9/m"
    extra = {"http_headers": ["Authorization: Bearer tok-secret"], "prompt": "Q: {question}",
             "remote_model": "vlm-a", "http_format": "openai", "max_tokens": 8}
    first = _model_identity(spec, extra)
    text = json.dumps(first)
    assert "pw-secret" not in text and "tok-secret" not in text
    assert first["spec"] == "http://127.0.0.1:9/m"
    assert first["options"]["prompt"] == "Q: {question}"
    assert first["options"]["remote_model"] == "vlm-a"
    for key, value in [("remote_model", "vlm-b"), ("prompt", "other {question}"),
                       ("http_headers", ["Authorization: Bearer other"])]:
        assert _model_identity(spec, {**extra, key: value}) != first, key
    assert _model_identity(spec.replace("pw-secret", "other"), extra) != first

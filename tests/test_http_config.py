"""The HTTP adapter's configuration objects, and the wire-format strategy registry (a format
registered here is spoken to a real server on 127.0.0.1)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest

from blackbox_vqa.adapters.http.config import (
    ChatOptions,
    Headers,
    Limits,
    RetryPolicy,
    Timeouts,
)
from blackbox_vqa.adapters.http.endpoint import HttpAdapter
from blackbox_vqa.adapters.http.formats import OTHER_ANSWER, Item, Raw, WireError, load_json
from blackbox_vqa.adapters.http.transport import RetryingClient
from blackbox_vqa.adapters.http.wires import (
    ChatWire,
    OursWire,
    TopKWire,
    Wire,
    register_wire_format,
    resolve_wire,
    unregister_wire_format,
    wire_formats,
)
from blackbox_vqa.errors import InputError, ModelError, ModelLoadError
from blackbox_vqa.specs import ModelOptions, load_model
from live_server import scripted_server, send_json


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Timeouts(read=0), "http timeout (--http-timeout) must be a finite number of "
         "seconds > 0, got 0"),
        (lambda: Timeouts(read=float("nan")), "http timeout (--http-timeout) must be a finite"),
        (lambda: Timeouts(connect=-1), "connect timeout must be a finite number of seconds > 0"),
        (lambda: Timeouts(total=float("inf")), "http total timeout (--http-total-timeout) must "
         "be a finite number of seconds > 0, got inf"),
        (lambda: Limits(concurrency=0), "http concurrency (--http-concurrency) must be an "
         "integer >= 1, got 0"),
        (lambda: Limits(concurrency=True), "http concurrency (--http-concurrency) must be an "
         "integer >= 1, got True"),
        (lambda: Limits(max_response_bytes=0), "http max response bytes "
         "(--http-max-response-mb) must be an integer >= 1, got 0"),
        (lambda: Limits(batch_size=2.5), "batch_size must be an integer >= 1, got 2.5"),
        (lambda: RetryPolicy(retries=-1), "retries must be an integer >= 0, got -1"),
        (lambda: RetryPolicy(backoff=-0.1), "backoff must be a finite number of seconds >= 0"),
        (lambda: RetryPolicy(max_retry_after=float("inf")), "max_retry_after must be a finite"),
        (lambda: Headers.parse(["Authorization Bearer x"]),
         "--header #1 must look like 'Name: value' (no ':' found)"),
        (lambda: Headers.parse({"X-A": "1\r\nX-B: 2"}), "--header #1 has a line break"),
        (lambda: Headers((("Bad Name", "v"),)), "--header #1 has an invalid name"),
        (lambda: ChatOptions(score="best"), "answer score (--answer-score) must be one of "
         "auto, sequence, first-token; got 'best'"),
        (lambda: ChatOptions(prompt="no placeholder"), "prompt (--prompt) must contain the "
         "placeholder {question}, got 'no placeholder'"),
        (lambda: ChatOptions(max_tokens=0), "max tokens (--max-tokens) must be an integer >= "
         "1, got 0"),
        (lambda: ChatOptions(top_logprobs=-1), "top_logprobs must be an integer >= 0, got -1"),
        (lambda: ChatOptions(remote_seed=1.5), "remote seed must be an integer or None, got "
         "1.5"),
        (lambda: ChatOptions(remote_model=""), "remote model (--remote-model) must be a model "
         "name, got ''"),
        (lambda: TopKWire(top_k=0), "top_k must be an integer >= 1, got 0"),
        (lambda: resolve_wire("grpc"), "http format (--http-format) must be one of ours, hf, "
         "answer-only, openai; got 'grpc'"),
    ],
)
def test_each_config_object_refuses_bad_values_by_name(build: Any, message: str) -> None:
    with pytest.raises(InputError) as info:
        build()
    assert message in str(info.value)


def test_config_objects_are_frozen_and_keep_their_defaults() -> None:
    assert (Timeouts().read, Timeouts().connect, Timeouts().total) == (60.0, 10.0, 300.0)
    assert (Limits().concurrency, Limits().max_response_bytes, Limits().batch_size) == \
        (4, 64 * 2**20, None)
    assert RetryPolicy() == RetryPolicy(retries=3, backoff=0.25, max_backoff=8.0,
                                        max_retry_after=60.0)
    assert Timeouts(read=5).read == 5.0 and isinstance(Timeouts(read=5).read, float)
    chat = ChatOptions()
    assert (chat.prompt_text.count("{question}"), chat.token_limit, chat.alternatives,
            chat.score_mode, chat.remote_seed) == (1, 8, 20, "auto", 0)
    with pytest.raises(AttributeError):
        Limits().concurrency = 2  # type: ignore[misc]


def test_headers_never_show_their_values() -> None:
    headers = Headers.parse({"Authorization": "Bearer sk-secret", "X-Trace": "1"})
    assert headers.as_dict() == {"Authorization": "Bearer sk-secret", "X-Trace": "1"}
    assert "sk-secret" not in repr(headers) and "Authorization: ***" in repr(headers)
    assert Headers.parse(headers) is headers and Headers.parse(None).pairs == ()


def test_chat_options_are_refused_by_other_formats_by_flag() -> None:
    with pytest.raises(InputError, match=r"^prompt \(--prompt\) is only for --http-format "
                       r"openai$"):
        HttpAdapter("http://127.0.0.1:9", wire_format="hf", chat=ChatOptions(prompt="{question}"))
    # Through the model options (what the CLI passes): named before the value is checked.
    with pytest.raises(InputError, match=r"^max_tokens \(--max-tokens\) is only for "):
        HttpAdapter.from_options("http://127.0.0.1:9", {"http_format": "answer-only",
                                                        "max_tokens": 0})
    with pytest.raises(InputError, match="timeouts must be a Timeouts, got dict"):
        HttpAdapter("http://127.0.0.1:9", wire_format="hf", timeouts={"read": 1})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="answers= is only for the hf and answer-only"):
        HttpAdapter("http://127.0.0.1:9", answers=["yes"])


def test_the_built_in_strategies_place_their_requests() -> None:
    base = httpx.URL("http://h:1/api/")
    assert str(OursWire().endpoint(base, "/v1/info")) == "http://h:1/api/v1/info"
    assert str(TopKWire().endpoint(base, "/v1/info")) == "http://h:1/api/"
    chat = httpx.URL("http://h:1/v1/chat/completions")
    assert str(ChatWire().endpoint(chat, "/models")) == "http://h:1/v1/models"
    assert "the API's base (ending in /v1)" in ChatWire().hint()
    assert wire_formats()[:4] == ("ours", "hf", "answer-only", "openai")
    with pytest.raises(InputError, match="registered already"):
        register_wire_format("hf", TopKWire)


# ------------------------------------------------------------------ a format of one's own


@dataclass(frozen=True)
class MeanFormat:
    """Sends the image's mean brightness; the server answers ``{"top": [[answer, p]]}``."""

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        (image, question), = items
        payload = {"question": question, "mean": float(np.mean(image)) / 255}
        return json.dumps(payload).encode(), "application/json"

    def parse(self, content: bytes, content_type: str, n: int) -> list[Raw]:
        data = load_json(content)
        if not isinstance(data, dict) or not isinstance(data.get("top"), list):
            raise WireError("answered without a 'top' list")
        return [tuple((str(a), float(p)) for a, p in data["top"])]

    def semantics(self) -> dict[str, Any]:
        return {"kind": "top_k", "format": "mean-json", "maps": "upper_bounds",
                "other_answer": OTHER_ANSWER, "note": "toy"}


@dataclass(frozen=True)
class MeanWire(Wire):
    name: ClassVar[str] = "mean-json"
    request_path: ClassVar[str] = "/ask"

    def endpoint(self, url: httpx.URL, path: str) -> httpx.URL:
        return url.copy_with(path=url.path.rstrip("/") + path)

    def open(self, http: RetryingClient, url: httpx.URL, chat: ChatOptions) -> MeanFormat:
        return MeanFormat()


@pytest.fixture
def mean_format() -> Iterator[str]:
    register_wire_format("mean-json", MeanWire)
    try:
        yield "mean-json"
    finally:
        unregister_wire_format("mean-json")


def _mean_server(seen: list[tuple[str, str]]) -> Any:
    def handle(handler: Any, method: str, body: bytes) -> None:
        seen.append((method, handler.path))
        if handler.path != "/api/ask":
            send_json(handler, 404, b'{"error": "no such path"}')
            return
        mean = json.loads(body)["mean"]
        send_json(handler, 200, json.dumps({"top": [["bright", mean],
                                                    ["dark", 1 - mean]]}).encode())
    return handle


def test_a_registered_wire_format_is_spoken_to_a_real_server(mean_format: str) -> None:
    seen: list[tuple[str, str]] = []
    grey = np.full((8, 8, 3), 51, dtype=np.uint8)  # mean 0.2
    white = np.full((8, 8, 3), 255, dtype=np.uint8)
    with scripted_server(_mean_server(seen)) as url:
        with HttpAdapter(url + "/api", wire_format=mean_format,
                         limits=Limits(concurrency=2)) as remote:
            assert remote.wire_format == "mean-json" and isinstance(remote.wire, MeanWire)
            remote.prepare(grey, "bright?")
            assert list(remote.answers) == ["bright", "dark", OTHER_ANSWER]
            scores = remote.answer_probs_batch([grey, white], ["bright?"] * 2)
            np.testing.assert_allclose(scores, [[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]], atol=1e-12)
            assert remote.score_semantics == MeanFormat().semantics()
        # What `bbvqa explain --model URL --http-format mean-json` builds.
        model = load_model(url + "/api", ModelOptions(extra={"http_format": "mean-json"}))
        assert isinstance(model, HttpAdapter) and model.wire_format == "mean-json"
        model.close()
        with HttpAdapter(url + "/elsewhere", wire_format=MeanWire()) as lost, \
                pytest.raises(ModelError, match=r"does it speak the 'mean-json' format "
                              r"\(--http-format\)"):
            lost.answer_probs(grey, "bright?")
    assert seen[:2] == [("POST", "/api/ask"), ("POST", "/api/ask")]  # the repeat is cached
    assert ("POST", "/elsewhere/ask") in seen


def test_an_unregistered_name_is_refused_again(mean_format: str) -> None:
    unregister_wire_format(mean_format)
    with pytest.raises(InputError, match="must be one of ours, hf, answer-only, openai; "):
        HttpAdapter("http://127.0.0.1:9", wire_format=mean_format)
    register_wire_format(mean_format, MeanWire)  # the fixture removes it again
    with pytest.raises(InputError, match="is built in"):
        unregister_wire_format("ours")
    with pytest.raises(ModelLoadError):
        HttpAdapter("http://127.0.0.1:9", wire_format="ours",
                    timeouts=Timeouts(connect=0.5), retries=RetryPolicy(retries=0))

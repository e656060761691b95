"""``--http-format openai``: a toy vision-language model behind a real chat-completions server
on 127.0.0.1 (``openai_server``), explained through the HTTP adapter and ``bbvqa explain``.

Expected maps are computed here from the toy's own log-probabilities, not through the adapter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.adapters.http.config import ChatOptions, Limits, RetryPolicy, Timeouts
from blackbox_vqa.adapters.http.endpoint import HttpAdapter
from blackbox_vqa.adapters.http.formats import OTHER_ANSWER
from blackbox_vqa.adapters.http.openai import (
    DEFAULT_PROMPT,
    ChatFormat,
    render_prompt,
    token_key,
)
from blackbox_vqa.adapters.http.ratelimit import parse_duration, rate_limit_wait
from blackbox_vqa.errors import InputError, ModelError, ModelLoadError, ModelOutputError
from blackbox_vqa.explainers.masks import grid_boxes, occlusion_evaluations
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.text import drop_word, split_words
from cli_runner import run_cli
from live_server import scripted_server
from openai_server import ChatServer, toy_logprobs

QUESTION = "is the red square bright?"
GRID = 4


@pytest.fixture
def image() -> np.ndarray:
    """32x32, gray 100; the toy's region (rows and columns 0-15) is white on the left
    half (columns 0-7) and black on the right: brightness 1/2, so the toy answers "Yes"."""
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    pixels[0:16, 0:8] = 255
    pixels[0:16, 8:16] = 0
    return pixels


@pytest.fixture
def server() -> Iterator[tuple[str, ChatServer]]:
    chat = ChatServer()
    with scripted_server(chat) as url:
        yield url + "/v1", chat


FAST = RetryPolicy(backoff=0.01, max_backoff=0.05)


def adapter(url: str, **options: Any) -> HttpAdapter:
    delays: list[float] = []
    options.setdefault("sleep", delays.append)
    options.setdefault("retries", FAST)
    options.setdefault("timeouts", Timeouts(read=5))
    remote = HttpAdapter(url, wire_format="openai", **options)
    remote.delays = delays  # type: ignore[attr-defined]
    return remote


# ------------------------------------------------------------------ the toy, read directly


def listed(image: np.ndarray, question: str, top: int) -> dict[str, float]:
    """The probabilities the server lists: its ``top`` best tokens and the chosen one."""
    logprobs = toy_logprobs(image, question)
    order = sorted(logprobs, key=lambda token: -logprobs[token])
    return {token: math.exp(logprobs[token]) for token in order[: max(top, 1)]}


def first_token_score(image: np.ndarray, question: str, key: str, top: int = 20) -> float:
    """The score of the answer whose first token normalises to ``key`` (0 if unlisted)."""
    scores = [p for token, p in listed(image, question, top).items()
              if token.strip().lower() == key]
    return max(scores, default=0.0)


def occluded(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = box
    out = image.copy()
    out[top:bottom, left:right] = 0  # baseline "black": whole numbers, exact as PNG
    return out


def expected_maps(image: np.ndarray, key: str, top: int = 20) -> tuple[np.ndarray, np.ndarray]:
    original = first_token_score(image, QUESTION, key, top)
    cells = [original - first_token_score(occluded(image, box), QUESTION, key, top)
             for box in grid_boxes(32, 32, GRID)]
    words = [original - first_token_score(image, drop_word(QUESTION, i), key, top)
             for i in range(len(split_words(QUESTION)))]
    return np.reshape(cells, (GRID, GRID)), np.asarray(words)


# ------------------------------------------------------------------ scores and maps


def test_maps_are_the_toys_first_token_probabilities_without_a_prepare_call(
    image: np.ndarray, server: tuple[str, ChatServer]
) -> None:
    url, chat = server
    with adapter(url, chat=ChatOptions(remote_model="toy-vlm")) as remote:
        assert list(remote.answers) == [OTHER_ANSWER]  # nothing learned yet
        result = Occlusion(remote, grid=GRID, baseline="black").explain(image, QUESTION)
        answers = list(remote.answers)
        semantics = remote.score_semantics
    image_map, word_map = expected_maps(image, "yes")
    assert result.answer == "yes"  # "Yes." normalised
    np.testing.assert_allclose(result.image_map, image_map, rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.word_map, word_map, rtol=0, atol=1e-15)
    assert result.image_map[0, 0] > 0.3 and result.word_map[2] > 0.5  # region cell, "red"
    assert np.count_nonzero(result.image_map) == 2 and np.count_nonzero(result.word_map) == 1
    # The first input fixed the answers: its answer, then the other first tokens, best first.
    assert answers == ["yes", "no", "maybe", "2", "blue", OTHER_ANSWER]
    # Occluding a black region cell leaves the image as it was: not sent again.
    assert occlusion_evaluations(32, 32, 5, grid=GRID) == 22 and len(chat.posts) == 22 - 2
    assert (result.image_flips, result.word_flips) == (2, 1)
    assert semantics is not None and (semantics["kind"], semantics["scores"],
                                      semantics["maps"]) == ("first_token", "lower_bounds",
                                                             "upper_bounds")
    request = chat.requests[0]
    assert {k: v for k, v in request.items() if k != "messages"} == {
        "model": "toy-vlm", "temperature": 0, "max_tokens": 8, "logprobs": True,
        "top_logprobs": 20, "seed": 0}
    (message,) = request["messages"]
    text, picture = message["content"]
    assert message["role"] == "user" and text == {"type": "text",
                                                  "text": render_prompt(DEFAULT_PROMPT, QUESTION)}
    assert picture["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    assert chat.texts[0] == QUESTION + "\nAnswer the question with a single word or number."


def test_a_short_top_list_gives_lower_bounds_and_an_other_column(
    image: np.ndarray, server: tuple[str, ChatServer]
) -> None:
    url, chat = server
    with adapter(url, chat=ChatOptions(top_logprobs=3, max_tokens=3, remote_seed=None)) as remote:
        result = Occlusion(remote, grid=GRID, baseline="black").explain(image, QUESTION)
        answers = list(remote.answers)
        without_red = remote.answer_probs(image, drop_word(QUESTION, 2))
    assert answers == ["yes", "no", OTHER_ANSWER]  # listed: "Yes", " Yes" (also "yes"), "No"
    image_map, word_map = expected_maps(image, "yes", top=3)
    np.testing.assert_allclose(result.image_map, image_map, rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.word_map, word_map, rtol=0, atol=1e-15)
    # Without "red", "Yes" falls out of the top 3: it scores 0, below its probability.
    truth = math.exp(toy_logprobs(image, drop_word(QUESTION, 2))["Yes"])
    assert without_red[0] == 0.0 < truth and result.word_map[2] == result.scores[0]
    top3 = listed(image, drop_word(QUESTION, 2), 3)
    assert without_red[1] == top3["No"] and without_red[2] == top3["maybe"]  # (other)
    assert chat.requests[0]["top_logprobs"] == 3 and chat.requests[0]["max_tokens"] == 3
    assert "seed" not in chat.requests[0]


def test_prepare_adds_answers_and_columns_never_move(
    image: np.ndarray, server: tuple[str, ChatServer]
) -> None:
    url, chat = server
    dark = np.zeros_like(image)
    with adapter(url, chat=ChatOptions(top_logprobs=1)) as remote:
        assert remote.answer_probs(image, QUESTION).shape == (2,)  # learned: yes, (other)
        remote.prepare(dark, QUESTION)  # answers "No."
        assert list(remote.answers) == ["yes", "no", OTHER_ANSWER]
        remote.prepare(image, QUESTION)  # known: nothing added, nothing sent
        scores = remote.answer_probs_batch([image, dark], [QUESTION, QUESTION])
    assert list(remote.answers) == ["yes", "no", OTHER_ANSWER] and len(chat.posts) == 2
    assert scores[0, 0] == first_token_score(image, QUESTION, "yes", 1) and scores[0, 1] == 0
    assert scores[1, 1] == first_token_score(dark, QUESTION, "no", 1) and scores[1, 0] == 0


def test_a_server_without_logprobs_gives_flip_maps(image: np.ndarray) -> None:
    chat = ChatServer(logprobs=False)
    with scripted_server(chat) as url, adapter(url + "/v1") as remote:
        result = Occlusion(remote, grid=GRID, baseline="black").explain(image, QUESTION)
        semantics = remote.score_semantics
    assert semantics is not None and (semantics["kind"], semantics["maps"],
                                      semantics["format"]) == ("answer_only", "flip", "openai")
    assert "no logprobs" in semantics["note"]
    # Independent: the toy's best token on each perturbed input, against the original's.
    def best(pixels: np.ndarray, question: str) -> str:
        logprobs = toy_logprobs(pixels, question)
        return max(logprobs, key=lambda token: logprobs[token])

    flips = [float(best(occluded(image, box), QUESTION) != "Yes")
             for box in grid_boxes(32, 32, GRID)]
    words = [float(best(image, drop_word(QUESTION, i)) != "Yes") for i in range(5)]
    assert sum(flips) == 2 and sum(words) == 1
    np.testing.assert_array_equal(result.image_map, np.reshape(flips, (GRID, GRID)))
    np.testing.assert_array_equal(result.word_map, words)
    assert result.answer == "yes" and result.probability == 1.0


def test_the_model_name_comes_from_the_server_or_the_option(image: np.ndarray) -> None:
    with scripted_server(ChatServer(models=("a", "b"))) as url:
        with pytest.raises(ModelLoadError, match=r"/v1/models serves 2 models: a, b; choose "
                           "one with --remote-model"):
            adapter(url + "/v1")
        full = url + "/v1/chat/completions"  # the chat URL itself
        with adapter(full, chat=ChatOptions(remote_model="b")) as remote:
            assert remote.answer_probs(image, QUESTION).shape == (6,)
        with adapter(url + "/v1", chat=ChatOptions(remote_model="c")) as remote, \
                pytest.raises(ModelError, match=r"/v1/chat/completions answered HTTP 404 \(The "
                              "model `c` does not exist\\); is the URL right, the API's base"):
            remote.answer_probs(image, QUESTION)


def test_api_keys_reach_the_server_and_are_never_shown(image: np.ndarray) -> None:
    secret = "sk-s3cret-123"
    chat = ChatServer(api_key=secret)
    with scripted_server(chat) as url:
        with adapter(url + "/v1", headers=[f"Authorization: Bearer {secret}"]) as remote:
            assert remote.answer_probs(image, QUESTION)[0] > 0.5
        with pytest.raises(ModelLoadError) as info:
            adapter(f"http://user:{secret}@" + url[len("http://"):] + f"/v1?key={secret}")
    message = str(info.value)
    assert "HTTP 401 (Incorrect API key provided)" in message and "--header" in message
    assert secret not in message


@pytest.mark.parametrize(
    ("chat", "other", "words"),
    [
        ({"prompt": "Answer in one word."}, {}, "must contain the placeholder {question}"),
        ({"max_tokens": 0}, {}, "max tokens (--max-tokens) must be an integer >= 1, got 0"),
        ({"top_logprobs": -1}, {}, "top_logprobs must be an integer >= 0, got -1"),
        ({"remote_model": " "}, {}, "remote model (--remote-model) must be a model name"),
        ({}, {"answers": ["yes"]}, "answers= is not for the openai format"),
        ({"remote_model": "m"}, {"wire_format": "hf"}, "only for --http-format openai"),
    ],
)
def test_bad_options_are_refused_by_name(chat: dict[str, Any], other: dict[str, Any],
                                         words: str) -> None:
    other.setdefault("wire_format", "openai")
    with pytest.raises(InputError) as info:
        HttpAdapter("http://127.0.0.1:9/v1", chat=ChatOptions(**chat), **other)
    assert words in str(info.value)


def test_token_keys_and_prompts() -> None:
    # White space is no answer, so it stays itself (a key no answer has).
    assert [token_key(t) for t in (" Yes", "Yes.", "2", " ", "\n")] == ["yes", "yes", "2", " ",
                                                                      "\n"]
    assert render_prompt("Q: {question} {x}", "why?") == "Q: why? {x}"


# ------------------------------------------------------------------ rate limits


def test_rate_limit_headers_are_read() -> None:
    assert [parse_duration(t) for t in ("1s", "6m0s", "20ms", "1h2m3.5s", "0.25", "2m59.56s")] \
        == [1.0, 360.0, 0.02, 3723.5, 0.25, 179.56]
    assert parse_duration("soon") is None and parse_duration("5x") is None
    assert parse_duration(None) is None and parse_duration("-1") is None
    exhausted = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
                 "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "1m"}
    assert rate_limit_wait(exhausted, refused=False) == 2.0
    assert rate_limit_wait({**exhausted, "x-ratelimit-remaining-tokens": "0"},
                           refused=False) == 60.0
    assert rate_limit_wait({"x-ratelimit-reset-requests": "3s"}, refused=False) is None
    assert rate_limit_wait({"x-ratelimit-reset-requests": "3s"}, refused=True) == 3.0
    assert rate_limit_wait({}, refused=True) is None


def test_a_429_with_rate_limit_headers_waits_for_the_bucket(
    image: np.ndarray, server: tuple[str, ChatServer]
) -> None:
    url, chat = server
    chat.faults = ["429-limits", "429-limits"]
    with adapter(url) as remote:
        scores = remote.answer_probs(image, QUESTION)
    # The requests bucket refills in 50 ms (the tokens bucket is not empty: its 6 min do
    # not count), and no Retry-After was sent.
    assert remote.delays == [0.05, 0.05] and len(chat.posts) == 3  # type: ignore[attr-defined]
    assert scores[0] == first_token_score(image, QUESTION, "yes")


def test_an_empty_bucket_holds_later_requests_back(image: np.ndarray) -> None:
    chat = ChatServer(limited={"x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-reset-requests": "200ms"})
    images = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (0, 80, 160)]
    with scripted_server(chat) as url, adapter(url + "/v1", limits=Limits(concurrency=1),
                                               sleep=None) as remote:
        remote.answer_probs_batch(images, [QUESTION] * 3)
    gaps = np.diff(chat.posts)
    assert len(chat.posts) == 3 and gaps.min() >= 0.19  # each answer said: wait 200 ms


def test_requests_in_flight_stay_within_the_concurrency(image: np.ndarray) -> None:
    chat = ChatServer(always="slow", sleep=0.15)
    images = [np.full((32, 32, 3), v, dtype=np.uint8) for v in range(6)]
    with scripted_server(chat) as url, adapter(url + "/v1", limits=Limits(concurrency=3)) as remote:
        remote.prepare(image, QUESTION)  # the first input is asked alone (what does it take?)
        chat.posts.clear()
        remote.answer_probs_batch(images, [QUESTION] * 6)
    starts = sorted(chat.posts)
    assert len(starts) == 6
    assert starts[2] - starts[0] < 0.15  # three at once, before the first was answered ...
    assert starts[3] - starts[0] >= 0.14  # ... and the 4th waited for a free slot


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize("first", ["500", "503", "drop", "half"])
def test_a_failed_request_is_retried(first: str, image: np.ndarray,
                                     server: tuple[str, ChatServer]) -> None:
    url, chat = server
    chat.faults = [first]
    with adapter(url) as remote:
        scores = remote.answer_probs(image, QUESTION)
    assert len(chat.posts) == 2 and chat.answered == 1
    assert len(remote.delays) == 1 and 0.005 <= remote.delays[0] < 0.01  # type: ignore[attr-defined]
    assert scores[0] == first_token_score(image, QUESTION, "yes")


def test_retry_after_is_honoured_and_a_far_one_fails_at_once(
    image: np.ndarray, server: tuple[str, ChatServer]
) -> None:
    url, chat = server
    chat.faults = ["429", "429"]
    with adapter(url) as remote:
        remote.answer_probs(image, QUESTION)
        assert remote.delays == [0.05, 0.05]  # type: ignore[attr-defined]
    assert len(chat.posts) == 3
    chat.always = "429"
    with adapter(url, retries=replace(FAST, max_retry_after=0.01)) as remote, \
            pytest.raises(ModelError, match=r"asked to retry after 0.05 s \(more than 0.01 s\)"):
        remote.answer_probs(image, "is it red?")
    assert len(chat.posts) == 4


def test_a_slow_answer_is_retried_after_the_read_timeout(image: np.ndarray) -> None:
    chat = ChatServer(faults=["slow"], sleep=0.6)
    with scripted_server(chat) as url, adapter(url + "/v1", timeouts=Timeouts(read=0.2),
                                               chat=ChatOptions(remote_model="toy-vlm")) as remote:
        scores = remote.answer_probs(image, QUESTION)
    assert len(chat.posts) == 2 and len(remote.delays) == 1  # type: ignore[attr-defined]
    assert scores[0] == first_token_score(image, QUESTION, "yes")


@pytest.mark.parametrize(
    ("fault", "kind", "words", "posts"),
    [
        ("500", ModelError, "answered HTTP 500 (scripted 500); gave up after 4 attempts", 4),
        ("drop", ModelError, "closed the connection without a complete answer", 4),
        ("400", ModelError, "refused the request: HTTP 400 (scripted 400)", 1),
        ("413", ModelError, "refused a single input as too large (HTTP 413: scripted 413)", 1),
        ("malformed", ModelOutputError, "returned malformed JSON", 1),
        ("no-choices", ModelOutputError, "answered without a 'choices' list", 1),
        ("nan", ModelOutputError, "logprob that is not a number <= 0: nan", 1),
        ("positive", ModelOutputError, "logprob that is not a number <= 0: 0.5", 1),
        ("empty", ModelOutputError, "answered with an empty answer", 1),
        ("refusal", ModelOutputError, "without message content (refusal: 'I cannot help", 1),
        ("error", ModelOutputError, "answered with an error: {'message': 'model overloaded'", 1),
    ],
)
def test_unusable_answers_raise_one_clear_error(
    fault: str, kind: type[Exception], words: str, posts: int, image: np.ndarray,
    server: tuple[str, ChatServer]
) -> None:
    url, chat = server
    chat.always = fault
    with adapter(url) as remote, pytest.raises(
            kind, match=r"^HTTP endpoint http://127\.0\.0\.1:\d+/v1/chat/completions ") as info:
        remote.answer_probs(image, QUESTION)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert len(chat.posts) == posts


def test_logprobs_that_stop_mid_explanation_are_an_error(
    image: np.ndarray, server: tuple[str, ChatServer]
) -> None:
    url, chat = server
    chat.faults = ["ok", "no-logprobs"]
    with adapter(url, limits=Limits(concurrency=1)) as remote, \
            pytest.raises(ModelOutputError, match="answered without logprobs, after answering"):
        Occlusion(remote, grid=GRID, baseline="black").explain(image, QUESTION)


def test_unreachable_endpoint_fails_in_one_line() -> None:
    with scripted_server(ChatServer()) as url:
        pass  # the port is closed again
    with pytest.raises(ModelLoadError, match=r"/v1/models cannot be connected to .*4 attempts"):
        adapter(url + "/v1")
    with adapter(url + "/v1", chat=ChatOptions(remote_model="m")) as remote, \
            pytest.raises(ModelError, match=r"/v1/chat/completions cannot be connected to"):
        remote.answer_probs(np.zeros((8, 8, 3), dtype=np.uint8), "q")


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def image_file(image: np.ndarray, tmp_path: Path) -> Path:
    path = tmp_path / "region.png"
    Image.fromarray(image).save(path)
    return path


def test_cli_explains_a_chat_endpoint_and_records_the_semantics(
    image: np.ndarray, image_file: Path, tmp_path: Path
) -> None:
    secret = "sk-cli-secret"
    chat = ChatServer(api_key=secret)
    out = tmp_path / "chat"
    with scripted_server(chat) as url:
        code, stdout, err = run_cli([
            "explain", "-m", url + "/v1", "--http-format", "openai", "--header",
            f"Authorization: Bearer {secret}", "-i", str(image_file), "-q", QUESTION,
            "--grid", str(GRID), "--baseline", "black", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    image_map, word_map = expected_maps(image, "yes")
    np.testing.assert_allclose(doc["occlusion"]["image"], image_map, rtol=0, atol=1e-12)
    np.testing.assert_allclose(doc["occlusion"]["words"], word_map, rtol=0, atol=1e-12)
    assert doc["answer"] == "yes" and doc["score_semantics"]["kind"] == "first_token"
    written = "".join(p.read_bytes().decode("latin-1") for p in out.iterdir())
    assert secret not in written + stdout + err


def test_cli_reports_a_failing_chat_endpoint_in_one_line(
    image_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fail"
    with scripted_server(ChatServer(always="500")) as url:
        code, _, err = run_cli(["explain", "-m", url + "/v1", "--http-format", "openai",
                                "-i", str(image_file), "-q", QUESTION, "--out", str(out)])
    assert code == 1 and not out.exists()
    assert err.startswith(f"bbvqa: error: HTTP endpoint {url}/v1/chat/completions answered "
                          "HTTP 500 (scripted 500); gave up after 4 attempts")
    assert err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------ the test server itself


def test_the_test_server_is_as_strict_as_the_real_api(image: np.ndarray,
                                                      server: tuple[str, ChatServer]) -> None:
    """What the adapter sends passes; what the hosted API refuses is refused here too."""
    url, chat = server
    good = ChatFormat("toy-vlm").request(image, QUESTION)
    part = good["messages"][0]["content"]

    def refused(body: dict[str, Any]) -> str:
        response = httpx.post(url + "/chat/completions", json=body, timeout=5)
        assert response.status_code == 400, response.text
        return str(response.json()["error"]["message"])

    assert httpx.post(url + "/chat/completions", json=good, timeout=5).status_code == 200
    assert "model" in refused({k: v for k, v in good.items() if k != "model"})
    assert "extra" in refused({**good, "temprature": 0}).lower()
    assert "role" in refused({**good, "messages": [{"role": "robot", "content": part}]})
    assert "top_logprobs requires logprobs" in refused({**good, "logprobs": False})
    bad_part = [part[0], {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    assert "data URL" in refused({**good, "messages": [{"role": "user", "content": bad_part}]})
    bad_b64 = [part[0], {"type": "image_url",
                         "image_url": {"url": "data:image/png;base64,@@@"}}]
    assert "invalid image" in refused({**good, "messages": [{"role": "user",
                                                             "content": bad_b64}]})
    unknown = [part[0], {"type": "audio", "audio": "x"}]
    refused({**good, "messages": [{"role": "user", "content": unknown}]})
    assert "top_logprobs" in refused({**good, "top_logprobs": 21})
    assert chat.answered == 1

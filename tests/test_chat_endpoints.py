"""Chat endpoints for real: whole-answer (``sequence``) scores, what real servers refuse,
answer-only made visible, resumable runs, reproducible files and the messages a user sees.

The server is the toy of ``openai_server`` on 127.0.0.1, in the shapes of vLLM 0.32,
llama-server and the hosted API. Expected scores are computed here from the toy's own
functions, token by token, not through the adapter.
"""

from __future__ import annotations

import http.server
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.adapters.http.config import ChatOptions, RetryPolicy, Timeouts
from blackbox_vqa.adapters.http.endpoint import HttpAdapter
from blackbox_vqa.adapters.http.formats import OTHER_ANSWER, WireError
from blackbox_vqa.adapters.http.openai import ChatFormat, ChatVocabulary
from blackbox_vqa.adapters.http.sequence import (
    AnswerToken,
    NextToken,
    SequenceScore,
    answer_logprob,
    check_by_token,
    prefix_text,
)
from blackbox_vqa.errors import ModelError, ModelLoadError
from blackbox_vqa.explainers.masks import grid_boxes
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.text import drop_word, split_words
from cli_runner import run_cli
from live_server import scripted_server
from openai_server import ChatServer, toy_id, toy_logprobs, toy_second_logprobs

QUESTION = "is the red square bright?"
GRID = 4
ANSWER_ONLY = "answer-only: maps show answer flips, not probabilities"


@pytest.fixture
def image() -> np.ndarray:
    """32x32 gray 100; the toy's region (rows and columns 0-15) half white, half black."""
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    pixels[0:16, 0:8] = 255
    pixels[0:16, 8:16] = 0
    return pixels


@pytest.fixture
def image_file(image: np.ndarray, tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(image).save(path)
    return path


FAST = RetryPolicy(backoff=0.01, max_backoff=0.05)


def adapter(url: str, **options: Any) -> HttpAdapter:
    options.setdefault("sleep", lambda _: None)
    options.setdefault("retries", FAST)
    options.setdefault("timeouts", Timeouts(read=5))
    return HttpAdapter(url, wire_format="openai", **options)


def occluded(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = box
    out = image.copy()
    out[top:bottom, left:right] = 0
    return out


def by_hand(image: np.ndarray, question: str) -> float:
    """p("Yes.") token by token: p("Yes" first) * p("." second)."""
    return math.exp(toy_logprobs(image, question)["Yes"]) * \
        math.exp(toy_second_logprobs(image, question)["."])


def hand_maps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    original = by_hand(image, QUESTION)
    cells = [original - by_hand(occluded(image, box), QUESTION)
             for box in grid_boxes(32, 32, GRID)]
    words = [original - by_hand(image, drop_word(QUESTION, i))
             for i in range(len(split_words(QUESTION)))]
    return np.reshape(cells, (GRID, GRID)), np.asarray(words)


def flat(text: str) -> str:
    """Terminal text with rich's line wrapping undone."""
    return " ".join(text.split())


def explain(url: str, image_file: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(["explain", "-m", url + "/v1", "--http-format", "openai",
                    "-i", str(image_file), "-q", QUESTION, "--grid", str(GRID),
                    "--baseline", "black", "--out", str(out), *extra])


# ------------------------------------------------------------------ sequence scores


def test_sequence_scores_are_the_whole_answers_probability(image: np.ndarray) -> None:
    chat = ChatServer(flavour="vllm")
    with scripted_server(chat) as url, adapter(url + "/v1") as remote:
        result = Occlusion(remote, grid=GRID, baseline="black").explain(image, QUESTION)
        semantics = remote.score_semantics
        answers = list(remote.answers)
        row = remote.answer_probs(image, QUESTION)
    image_map, word_map = hand_maps(image)
    assert answers == ["yes", OTHER_ANSWER] and result.answer == "yes"
    p = by_hand(image, QUESTION)
    assert 0.05 < p < 0.9 and row[0] == pytest.approx(p, abs=1e-12)
    assert row[1] == 0.0
    np.testing.assert_allclose(result.image_map, image_map, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.word_map, word_map, rtol=0, atol=1e-12)
    # the second token matters: the sequence map is not the first token's map
    first_only = math.exp(toy_logprobs(image, QUESTION)["Yes"])
    assert abs(first_only - p) > 0.05
    assert semantics is not None and semantics["kind"] == "sequence"
    assert semantics["request"]["score"] == "sequence" and "notes" not in semantics
    # the first POST generated the answer; the original's score was checked token by
    # token (two prefixes: the generation prompt, then "Yes" continued, each asking the
    # next token by id); every other POST scored the answer, continuing it
    generate, *rest = chat.requests
    checks = [r for r in rest if "logprob_token_ids" in r]
    scoring = [r for r in rest if "logprob_token_ids" not in r]
    assert "prompt_logprobs" not in generate and "logprob_token_ids" not in generate
    assert [(r["add_generation_prompt"], r["messages"][1:], r["logprob_token_ids"])
            for r in checks] == [
        (True, [], [toy_id("Yes")]),
        (False, [{"role": "assistant", "content": "Yes"}], [toy_id(".")])]
    assert all(r["return_tokens_as_token_ids"] is True and r["return_token_ids"] is True
               and r["max_tokens"] == 1 for r in checks)
    assert all(r["prompt_logprobs"] == 0 and r["continue_final_message"] is True
               and r["add_generation_prompt"] is False and r["max_tokens"] == 1
               and r["return_token_ids"] is True
               and r["messages"][-1] == {"role": "assistant", "content": "Yes."}
               for r in scoring)


def test_the_cli_gives_a_sequence_map_and_records_what_determines_it(
    image: np.ndarray, image_file: Path, tmp_path: Path
) -> None:
    secret = "sk-do-not-record"
    chat = ChatServer(flavour="vllm", api_key=secret)
    out = tmp_path / "seq"
    with scripted_server(chat) as url:
        code, stdout, err = explain(url, image_file, out, "--header",
                                    f"Authorization: Bearer {secret}", "--max-tokens", "6")
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    image_map, word_map = hand_maps(image)
    np.testing.assert_allclose(doc["occlusion"]["image"], image_map, rtol=0, atol=1e-12)
    np.testing.assert_allclose(doc["occlusion"]["words"], word_map, rtol=0, atol=1e-12)
    assert doc["probability"] == pytest.approx(by_hand(image, QUESTION), abs=1e-12)
    request = doc["score_semantics"]["request"]
    assert request == {"remote_model": "toy-vlm", "prompt": chat.requests[0]["messages"][0]
                       ["content"][0]["text"].replace(QUESTION, "{question}"),
                       "max_tokens": 6, "token_parameter": "max_tokens", "seed": 0,
                       "temperature": 0, "top_logprobs": 20, "score": "sequence",
                       "server_model": "toy-vlm"}
    written = "".join(p.read_bytes().decode("latin-1") for p in out.iterdir())
    assert secret not in written + stdout + err and "Authorization" not in written
    assert not (tmp_path / ".seq.requests").exists()  # the staged cache is gone


def test_a_server_without_prompt_logprobs_falls_back_to_the_first_token_with_a_note(
    image: np.ndarray, image_file: Path, tmp_path: Path
) -> None:
    chat = ChatServer()  # the hosted API's shapes: no prompt_logprobs key
    out = tmp_path / "first"
    with scripted_server(chat) as url:
        code, stdout, err = explain(url, image_file, out)
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["score_semantics"]["kind"] == "first_token"
    note = "first-token scores: the server offers no whole-answer likelihood " \
        "(prompt_logprobs)"
    assert doc["score_semantics"]["notes"] == [note]
    assert f"note: {note}" in flat(stdout) and note in (out / "report.html").read_text()
    assert not any("prompt_logprobs" in r for r in chat.requests)  # never asked


def test_a_refused_scoring_request_falls_back_or_fails_when_sequence_is_asked(
    image: np.ndarray
) -> None:
    chat = ChatServer(flavour="vllm", faults=["ok", "400"])
    with scripted_server(chat) as url, adapter(url + "/v1") as remote:
        remote.prepare(image, QUESTION)
        assert remote.mode == "first_token" and remote.notes == [
            "first-token scores: the server refused to score the whole answer "
            "(prompt_logprobs)"]
    with scripted_server(ChatServer()) as url, \
            adapter(url + "/v1", chat=ChatOptions(score="sequence")) as remote, \
            pytest.raises(ModelError, match=r"HTTP 400 .*prompt_logprobs: Extra inputs"):
        remote.prepare(image, QUESTION)
    with scripted_server(ChatServer(flavour="vllm")) as url, \
            adapter(url + "/v1", chat=ChatOptions(score="first-token")) as remote:
        remote.prepare(image, QUESTION)
        assert remote.mode == "first_token" and remote.notes == []


def test_an_answer_tokenised_otherwise_than_generated_is_scored_as_the_server_tokenises_it(
    image: np.ndarray,
) -> None:
    chat = ChatServer(flavour="vllm", template_space=True)  # " Yes" is another token
    with scripted_server(chat) as url, adapter(url + "/v1") as remote:
        remote.prepare(image, QUESTION)
        assert remote.mode == "sequence"
        row = remote.answer_probs(occluded(image, (0, 8, 0, 8)), QUESTION)
        (note,) = remote.notes
    generated = toy_logprobs(image, QUESTION)["Yes"] + toy_second_logprobs(image, QUESTION)["."]
    given = toy_logprobs(image, QUESTION)[" Yes"] + toy_second_logprobs(image, QUESTION)["."]
    assert note == ("the answer is scored as the server tokenises it (2 tokens, "
                    f"log-probability {given:.4g}); the model generated it as other tokens "
                    f"(log-probability {generated:.4g})")
    perturbed = occluded(image, (0, 8, 0, 8))
    expected = toy_logprobs(perturbed, QUESTION)[" Yes"] + \
        toy_second_logprobs(perturbed, QUESTION)["."]
    assert row[0] == pytest.approx(math.exp(expected), abs=1e-12)


def test_a_score_that_fails_the_token_by_token_check_falls_back_with_a_note(
    image: np.ndarray,
) -> None:
    chat = ChatServer(flavour="vllm", prompt_drift=-0.01)  # prompt scoring drifts
    with scripted_server(chat) as url, adapter(url + "/v1") as remote:
        remote.prepare(image, QUESTION)
        assert remote.mode == "first_token"
        (note,) = remote.notes
        assert remote.score_semantics["kind"] == "first_token"  # type: ignore[index]
    by_token = toy_logprobs(image, QUESTION)["Yes"] + toy_second_logprobs(image, QUESTION)["."]
    assert note == (f"first-token scores: the server scores the answer {by_token - 0.02:.6g} "
                    f"as a whole but {by_token:.6g} token by token")
    with scripted_server(chat) as url, \
            adapter(url + "/v1", chat=ChatOptions(score="sequence")) as remote, \
            pytest.raises(ModelError, match=r"as a whole but .* token by token"):
        remote.prepare(image, QUESTION)


@pytest.mark.parametrize(("server", "note"), [
    ({"refuses": ("logprob_token_ids",)}, "the server refused the token-by-token check "
     "(HTTP 400)"),
    ({"token_ids": False}, "the server sent no prompt token ids, so the score cannot be "
     "checked"),
])
def test_a_score_that_cannot_be_checked_token_by_token_falls_back_with_a_note(
    image: np.ndarray, server: dict[str, Any], note: str
) -> None:
    chat = ChatServer(flavour="vllm", **server)
    with scripted_server(chat) as url, adapter(url + "/v1") as remote:
        remote.prepare(image, QUESTION)
        assert remote.mode == "first_token"
        assert remote.notes == [f"first-token scores: {note}"]


def test_the_token_by_token_check_sums_per_position_logprobs_aligned_by_id() -> None:
    tokens = (AnswerToken(7, 4, " light", -1.0), AnswerToken(8, 9, " blue", -0.5))
    score = SequenceScore(-1.5, tokens, tuple(range(9)))
    assert check_by_token(score, [NextToken(-1.0, None), NextToken(-0.50005, None)]) is None
    assert check_by_token(score, [NextToken(-1.0, None), NextToken(-0.4, None)]) == (
        "the server scores the answer -1.5 as a whole but -1.4 token by token")
    assert check_by_token(score, [NextToken(-1.0, None), None]) == (
        "no prompt reproduces the first 1 of the answer's 2 tokens, so its score cannot be "
        "checked token by token")
    # the template's space sits inside the first token: prefixes are the message's text
    assert [prefix_text(tokens, k, "light blue") for k in range(3)] == \
        ["", "light", "light blue"]
    assert [prefix_text(tokens, k, " light blue") for k in range(3)] == \
        ["", " light", " light blue"]


def test_prompt_logprobs_are_read_by_token_id_and_aligned_on_the_answer() -> None:
    entry = {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "Yes"},
             "9": {"logprob": -0.1, "rank": 2, "decoded_token": "No"}}
    dot = {"7": {"logprob": -0.25, "rank": 1, "decoded_token": "."}}
    head = {"3": {"logprob": -1.0, "rank": 1, "decoded_token": ":"}}
    data = {"prompt_logprobs": [None, head, entry, dot], "prompt_token_ids": [1, 3, 5, 7]}
    assert answer_logprob(data, "Yes.") == -0.75
    assert answer_logprob(data, " Yes.") == -0.75  # a template that trims the message
    with pytest.raises(WireError, match="prompt_token_ids"):
        answer_logprob({"prompt_logprobs": [None, head, entry, dot]}, "Yes.")
    with pytest.raises(WireError, match="do not end in the answer"):
        answer_logprob(data, "No.")
    with pytest.raises(WireError, match="without a 'prompt_logprobs' list"):
        answer_logprob({"prompt_logprobs": None}, "Yes.")


# ------------------------------------------------------------------ what servers refuse


def test_a_lower_top_logprobs_cap_is_taken_and_said(
    image: np.ndarray, image_file: Path, tmp_path: Path
) -> None:
    chat = ChatServer(flavour="vllm", max_logprobs=5)
    with scripted_server(chat) as url:
        code, stdout, err = explain(url, image_file, tmp_path / "cap")
    assert code == 0, err
    assert "note: the server allows at most 5 top_logprobs: asked for 5 instead of 20" \
        in flat(stdout)
    # the first POST was refused (400, not recorded), the retry and every later one asked 5
    assert len(chat.posts) == len(chat.requests) + 1
    assert chat.requests[0]["top_logprobs"] == 5
    doc = json.loads((tmp_path / "cap" / "explanation.json").read_text())
    assert doc["score_semantics"]["request"]["top_logprobs"] == 5


def test_top_logprobs_from_the_command_line_and_a_model_file(
    image_file: Path, tmp_path: Path
) -> None:
    chat = ChatServer()
    with scripted_server(chat) as url:
        code, _, err = explain(url, image_file, tmp_path / "a", "--top-logprobs", "3")
        assert code == 0, err
        assert {r["top_logprobs"] for r in chat.requests} == {3}
        models = tmp_path / "models.toml"
        models.write_text(f'[chat]\nspec = "{url}/v1"\nhttp_format = "openai"\n'
                          'top_logprobs = 2\n')
        chat.requests.clear()
        code, _, err = run_cli(["explain", "-m", f"@{models}:chat", "-i", str(image_file),
                                "-q", QUESTION, "--grid", "2", "--out", str(tmp_path / "b")])
    assert code == 0, err
    assert {r["top_logprobs"] for r in chat.requests} == {2}
    code, _, err = run_cli(["explain", "-m", "http://127.0.0.1:9/v1", "--http-format",
                            "openai", "-i", str(image_file), "-q", QUESTION,
                            "--top-logprobs", "-1", "--out", str(tmp_path / "c")])
    assert code == 2 and "top_logprobs must be an integer >= 0, got -1" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("refuses, kind", [
    (("max_tokens", "temperature", "logprobs"), "answer_only"),
    (("max_tokens",), "first_token"),
])
def test_hosted_models_get_max_completion_tokens_and_lose_what_they_refuse(
    image: np.ndarray, refuses: tuple[str, ...], kind: str
) -> None:
    chat = ChatServer(refuses=refuses)
    with scripted_server(chat) as url, adapter(url + "/v1") as remote:
        Occlusion(remote, grid=2, baseline="black").explain(image, QUESTION)
        semantics = remote.score_semantics
    assert semantics is not None and semantics["kind"] == kind
    last = chat.requests[-1]
    assert last["max_completion_tokens"] == 8 and "max_tokens" not in last
    assert ("logprobs" in last) == (kind == "first_token")
    assert ("temperature" in last) == (kind == "first_token")
    notes = semantics.get("notes", [])
    assert "the server refuses max_tokens: sent max_completion_tokens" in notes
    if kind == "answer_only":
        assert notes[-3:] == ["the server refuses temperature: sent none (the server's "
                              "default)", "the server refuses logprobs: answer-only",
                              ANSWER_ONLY]


# ------------------------------------------------------------------ answer-only made visible


def test_answer_only_is_said_in_the_terminal_report_and_figures(
    image_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "flips"
    with scripted_server(ChatServer(logprobs=False)) as url:
        code, stdout, err = explain(url, image_file, out)
    assert code == 0, err
    assert ANSWER_ONLY in flat(stdout) and "(answer-only)" in stdout and "p = " not in stdout
    assert "importance: 1 where the answer flips" in flat(stdout)
    assert ANSWER_ONLY in (out / "report.html").read_text()
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["score_semantics"]["kind"] == "answer_only"
    assert ANSWER_ONLY in doc["score_semantics"]["notes"]


def test_require_logprobs_makes_answer_only_an_error(image_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    with scripted_server(ChatServer(logprobs=False)) as url:
        code, _, err = explain(url, image_file, out, "--require-logprobs")
    assert code == 1 and not out.exists() and "Traceback" not in err
    assert err.startswith(f"bbvqa: error: HTTP endpoint {url}/v1/chat/completions answered "
                          "without logprobs, and --require-logprobs was given")
    assert err.count("\n") == 1


def test_a_server_ignoring_the_image_gets_a_warning(image_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "blind"
    with scripted_server(ChatServer()) as url:  # without "red" the toy ignores the image
        code, stdout, err = run_cli(["explain", "-m", url + "/v1", "--http-format",
                                     "openai", "-i", str(image_file), "-q", "is it bright?",
                                     "--grid", "2", "--out", str(out)])
    assert code == 0, err
    warning = "every image cell scores exactly like the original: the server may be " \
        "ignoring the image"
    assert f"warning: {warning}" in flat(stdout)
    assert json.loads((out / "explanation.json").read_text())["warnings"] == [warning]
    assert warning in (out / "report.html").read_text()
    with scripted_server(ChatServer()) as url:  # with "red" it does not
        code, stdout, _ = explain(url, image_file, tmp_path / "sees")
    assert code == 0 and "warning" not in stdout


# ------------------------------------------------------------------ resumable runs


def test_a_run_stopped_by_the_server_resumes_without_sending_anything_twice(
    image: np.ndarray, image_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    first = ChatServer(flavour="vllm", stop_after=9)
    with scripted_server(first) as url:
        code, _, err = explain(url, image_file, out, "--http-concurrency", "1")
    assert code == 1 and not out.exists()
    cache = tmp_path / ".resumed.requests"
    assert "9 completed requests are kept in" in err and str(cache) in err
    assert err.count("\n") == 1
    assert len(list(cache.glob("*/*.json"))) == 9
    second = ChatServer(flavour="vllm")
    with scripted_server(second) as url:
        code, _, err = explain(url, image_file, out, "--http-concurrency", "1")
    assert code == 0, err
    assert "request cache: reused 9 completed requests" in err
    answered = [json.dumps(r, sort_keys=True) for r in first.requests[:9]]
    again = [json.dumps(r, sort_keys=True) for r in second.requests]
    assert not set(answered) & set(again)  # nothing completed was sent twice
    assert not cache.exists()
    clean = ChatServer(flavour="vllm")
    with scripted_server(clean) as url:
        code, _, err = explain(url, image_file, tmp_path / "clean", "--request-cache", "off")
    assert code == 0, err
    assert len(second.requests) + 9 == len(clean.requests)
    resumed = np.asarray(json.loads((out / "explanation.json").read_text())["occlusion"]["image"])
    redone = json.loads((tmp_path / "clean" / "explanation.json").read_text())
    np.testing.assert_array_equal(resumed, np.asarray(redone["occlusion"]["image"]))
    np.testing.assert_allclose(resumed, hand_maps(image)[0], rtol=0, atol=1e-12)


def test_a_named_request_cache_is_kept_and_never_holds_the_key(
    image_file: Path, tmp_path: Path
) -> None:
    secret = "sk-never-in-the-cache"
    cache = tmp_path / "requests"
    chat = ChatServer(flavour="vllm", api_key=secret)
    args = ("--request-cache", str(cache), "--header", f"Authorization: Bearer {secret}")
    with scripted_server(chat) as url:
        assert explain(url, image_file, tmp_path / "a", *args)[0] == 0
        sent = len(chat.requests)
        code, _, err = explain(url, image_file, tmp_path / "b", *args)
    assert code == 0 and len(chat.requests) == sent  # all reused
    assert f"request cache: reused {sent} completed requests" in err
    stored = b"".join(p.read_bytes() for p in cache.glob("*/*.json"))
    assert len(list(cache.glob("*/*.json"))) == sent and secret.encode() not in stored


# ------------------------------------------------------------------ messages


def test_a_401_names_header_only_and_never_echoes_the_key(image: np.ndarray) -> None:
    secret = "sk-echoed-by-the-server"
    with scripted_server(ChatServer(api_key="right", echo_key=True)) as url:
        with pytest.raises(ModelLoadError) as info:
            adapter(url + "/v1", headers=[f"Authorization: Bearer {secret}"])
        with adapter(url + "/v1", chat=ChatOptions(remote_model="toy-vlm"),
                     headers=[f"Authorization: Bearer {secret}"]) as remote, \
                pytest.raises(ModelError) as posted:
            remote.prepare(image, QUESTION)
    for message in (str(info.value), str(posted.value)):
        assert secret not in message and "Incorrect API key provided: ***" in message
        assert "--header" in message and "--remote-model" not in message


def _hang(handler: http.server.BaseHTTPRequestHandler, method: str, body: bytes) -> None:
    time.sleep(1.0)


def test_a_timeout_names_http_timeout_only() -> None:
    with scripted_server(_hang) as url, pytest.raises(ModelLoadError) as info:
        adapter(url + "/v1", timeouts=Timeouts(read=0.2), retries=RetryPolicy(retries=0))
    message = str(info.value)
    assert "--http-timeout" in message and "--remote-model" not in message


def test_a_v1_url_without_a_format_suggests_openai(image_file: Path, tmp_path: Path) -> None:
    with scripted_server(ChatServer()) as url:
        code, _, err = run_cli(["explain", "-m", url + "/v1", "-i", str(image_file), "-q",
                                QUESTION, "--out", str(tmp_path / "x")])
    assert code == 1 and err.count("\n") == 1
    assert err.rstrip().endswith("use --http-format openai")


def test_an_unknown_answer_lists_the_answers_the_endpoint_can_score(
    image_file: Path, tmp_path: Path
) -> None:
    with scripted_server(ChatServer()) as url:
        code, _, err = explain(url, image_file, tmp_path / "x", "--answer", "purple")
    assert code == 2 and err.count("\n") == 1
    assert "answer 'purple' is not one of the model's answers; it can score 'yes', 'no', " \
        "'maybe', '2', 'blue', '(other)'" in err


# ------------------------------------------------------------------ bounded work (issue 23)


def _completion(alternatives: list[dict[str, Any]]) -> bytes:
    return json.dumps({"model": "m", "choices": [{"message": {"content": "Yes."}, "logprobs": {
        "content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": alternatives}]}}]}
    ).encode()


def test_a_top_logprobs_list_is_cut_to_the_size_asked_for() -> None:
    alternatives = [{"token": f"t{i}", "logprob": -1.0 - i / 1e5} for i in range(80_000)]
    (answer,) = ChatFormat("m", top_logprobs=20).parse(_completion(alternatives), "", 1)
    assert answer.first is not None and len(answer.first) == 21  # the token and 20 listed
    vocabulary = ChatVocabulary()
    vocabulary.learn(answer)
    assert len(vocabulary.names) == 21 and len(vocabulary.named) == 21


def test_a_logprob_too_large_for_a_float_is_probability_zero(image: np.ndarray) -> None:
    huge = [{"token": "No", "logprob": -10**400}, {"token": "Big", "logprob": 10**400}]
    (answer,) = ChatFormat("m").parse(_completion(huge[:1]), "", 1)
    assert answer.first == (("yes", math.exp(-0.1)), ("no", 0.0))
    with pytest.raises(WireError, match="not a number <= 0"):
        ChatFormat("m").parse(_completion(huge[1:]), "", 1)
    with scripted_server(ChatServer(always="huge")) as url, adapter(url + "/v1") as remote:
        row = remote.answer_probs(image, QUESTION)
    assert row[list(remote.answers).index("no")] == 0.0


@pytest.mark.parametrize("extra, words", [
    (["--answer-score", "whole"], "--answer-score must be one of auto, sequence, "
     "first-token, got 'whole'"),
    (["--top-logprobs", "-1"], "top_logprobs must be an integer >= 0, got -1"),
])
def test_bad_chat_options_are_one_line_and_exit_2(image_file: Path, tmp_path: Path,
                                                  extra: list[str], words: str) -> None:
    with scripted_server(ChatServer()) as url:
        code, _, err = explain(url, image_file, tmp_path / "x", *extra)
    assert code == 2 and err.count("\n") == 1 and words in err
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.requests").exists()


def test_a_request_cache_that_is_a_file_is_refused(image_file: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with scripted_server(ChatServer()) as url:
        code, _, err = explain(url, image_file, tmp_path / "x", "--request-cache",
                               str(tmp_path / "file"))
    assert code == 2 and err.count("\n") == 1 and "is not a folder" in err
    assert (tmp_path / "file").read_text() == "not a folder"

"""Whole-answer (``sequence``) scores against token-by-token ones on a real chat server
(issue 21): for every input of an occlusion explanation (the original, each grid cell
blacked out, each word dropped), the answer's log-probability read through
``prompt_logprobs`` (one request, :class:`~blackbox_vqa.adapters.http.sequence.SequenceFormat`)
and summed one position at a time (one request per answer token,
:class:`~blackbox_vqa.adapters.http.sequence.PrefixFormat`, each prompt's ids checked
against the scoring prompt's). Prints the largest difference and the time per request.

Start the server first, e.g. ``RS_DIR=/tmp/rs_http bash
/work/shared/vlm-servers/start_vllm.sh 8001 --max-logprobs 5``; then
``python benchmarks/chat_sequence_check.py --url http://127.0.0.1:8001/v1``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import httpx
import numpy as np

from blackbox_vqa.adapters.http.openai import ChatFormat
from blackbox_vqa.adapters.http.sequence import (
    NextToken,
    PrefixFormat,
    SequenceFormat,
    SequenceScore,
    prefix_text,
)
from blackbox_vqa.explainers.masks import grid_boxes
from blackbox_vqa.text import drop_word, split_words

QUESTIONS = ("what color is the square?", "is there a square?", "how many squares are there?")


def picture() -> np.ndarray:
    """32 x 32 gray with a red square (the real-server test's image)."""
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    pixels[4:20, 6:22] = (200, 40, 40)
    return pixels


def post(client: httpx.Client, url: str, fmt: object, image: np.ndarray,
         question: str) -> tuple[object, float]:
    """One request in ``fmt``: its parsed answer and its seconds."""
    body, kind = fmt.body([(image, question)])  # type: ignore[attr-defined]
    start = time.perf_counter()
    response = client.post(url, content=body, headers={"content-type": kind})
    seconds = time.perf_counter() - start
    response.raise_for_status()
    (parsed,) = fmt.parse(response.content, kind, 1)  # type: ignore[attr-defined]
    return parsed, seconds


def check(client: httpx.Client, url: str, chat: ChatFormat, answer: str, image: np.ndarray,
          question: str) -> tuple[float, float, int, float, float]:
    """``(whole, by_token, tokens, whole_s, by_token_s)`` for one input."""
    score, whole_s = post(client, url, SequenceFormat(chat, answer), image, question)
    assert isinstance(score, SequenceScore) and score.prompt_ids is not None
    by_token, by_token_s = 0.0, 0.0
    for k, token in enumerate(score.tokens):
        want = score.prompt_ids[:token.position]
        for prefix in ([None, ""] if k == 0 else [prefix_text(score.tokens, k, answer)]):
            found, seconds = post(client, url, PrefixFormat(chat, prefix, token.token_id or 0),
                                  image, question)
            by_token_s += seconds
            assert isinstance(found, NextToken)
            if found.prompt_ids == want:
                by_token += found.logprob
                break
        else:
            raise SystemExit(f"no prompt reproduces answer token {k} of {question!r}")
    return score.logprob, by_token, len(score.tokens), whole_s, by_token_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8001/v1", help="the API's base")
    parser.add_argument("--grid", type=int, default=4, help="occlusion grid (cells a side)")
    parser.add_argument("--top-logprobs", type=int, default=5, help="the server's cap")
    args = parser.parse_args()
    with httpx.Client(timeout=120) as client:
        model = client.get(args.url + "/models").json()["data"][0]["id"]
        chat = ChatFormat(model, top_logprobs=args.top_logprobs)
        url = args.url + "/chat/completions"
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.1f}; server model {model}")
        worst, inputs, requests, whole_t, token_t = 0.0, 0, 0, 0.0, 0.0
        image = picture()
        for question in QUESTIONS:
            answer, _ = post(client, url, chat, image, question)
            raw = answer.raw  # type: ignore[attr-defined]
            cases = [(image, question)]
            for top, bottom, left, right in grid_boxes(32, 32, args.grid):
                cell = image.copy()
                cell[top:bottom, left:right] = 0
                cases.append((cell, question))
            cases += [(image, drop_word(question, i)) for i in range(len(split_words(question)))]
            found = [check(client, url, chat, raw, pixels, asked) for pixels, asked in cases]
            for whole, by_token, n, whole_s, by_token_s in found:
                worst = max(worst, abs(whole - by_token))
                inputs, requests = inputs + 1, requests + 1 + n
                whole_t, token_t = whole_t + whole_s, token_t + by_token_s
            print(f"{question!r}: answer {raw!r} ({found[0][2]} tokens), {len(cases)} "
                  f"inputs, log p(original) {found[0][0]:.6g}")
        print(f"{inputs} inputs: largest |whole - token by token| = {worst:.3g} "
              f"(log-probability); mean whole-answer request "
              f"{whole_t / inputs * 1000:.1f} ms, token-by-token "
              f"{token_t / max(1, requests - inputs) * 1000:.1f} ms a request")


if __name__ == "__main__":
    main()

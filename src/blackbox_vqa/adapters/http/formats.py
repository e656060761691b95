"""The request formats of the HTTP adapter's wire formats: request bodies and response
parsing (the strategy objects that choose them, by format name, are in
:mod:`blackbox_vqa.adapters.http.wires`).

- ``ours``: the ``blackbox_vqa.http/1`` protocol that ``bbvqa serve`` speaks (batches,
  full score rows, exact float images as ``.npy``).
- ``hf``: the Hugging Face visual-question-answering inference format, one input per
  request, answering a top-k list of ``{"answer", "score"}``.
- ``answer-only``: an endpoint that answers only the answer text.
- ``openai``: a chat-completions endpoint, in :mod:`blackbox_vqa.adapters.http.openai`.

Parsers raise :class:`WireError` with a message about the response; the adapter adds the
endpoint's name and turns it into a :class:`~blackbox_vqa.errors.ModelOutputError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.text import OTHER_ANSWER, terminal_safe
from blackbox_vqa.wire import (
    BINARY_CONTENT_TYPE,
    PROTOCOL,
    answers_digest,
    encode_binary_batch,
    encode_image,
    image_file,
)

__all__ = [
    "OTHER_ANSWER",
    "AnswerOnlyFormat",
    "OursFormat",
    "Raw",
    "ServerInfo",
    "TopKFormat",
    "WireError",
    "load_json",
    "parse_info",
    "vocabulary_row",
]

_SNIPPET = 120
JSON_CONTENT_TYPE = "application/json"

Item = tuple[NDArray[Any], str]
# What one input's answer is, before it becomes a score row: a full row (ours), a
# top-k list of (answer, score) pairs (hf) or one answer (answer-only).
Raw = NDArray[np.float64] | tuple[tuple[str, float], ...] | str


class WireError(Exception):
    """A response that does not follow the wire format."""


def load_json(content: bytes) -> Any:
    """Parse a JSON body or raise :class:`WireError` quoting its start (escaped, so
    the quote is safe on a terminal)."""
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        snippet = content[:_SNIPPET].decode("utf-8", errors="replace")
        raise WireError(f"returned malformed JSON ({exc}): {snippet!r}") from exc
    except RecursionError as exc:
        raise WireError("returned JSON nested too deeply to read") from exc


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


@dataclass(frozen=True)
class ServerInfo:
    """What ``GET /v1/info`` said: answers, their digest, limits, whether ``.npy`` images
    and binary batches are accepted."""

    name: str
    answers: tuple[str, ...]
    digest: str
    max_batch: int | None
    max_body_bytes: int | None
    npy: bool
    binary: bool


def _limit(limits: Any, key: str) -> int | None:
    value = limits.get(key) if isinstance(limits, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def parse_info(content: bytes) -> ServerInfo:
    """Read a ``/v1/info`` body (only ``answers`` is required)."""
    data = load_json(content)
    if not isinstance(data, dict):
        raise WireError(f"/v1/info returned {type(data).__name__}, expected an object")
    protocol = data.get("protocol", PROTOCOL)
    if protocol != PROTOCOL:
        raise WireError(f"/v1/info speaks protocol {protocol!r}, expected {PROTOCOL!r}")
    answers = data.get("answers")
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) for a in answers):
        raise WireError("/v1/info has no non-empty 'answers' list of strings")
    if len(set(answers)) != len(answers):
        raise WireError("/v1/info lists the same answer twice")
    caps = data.get("capabilities")
    encodings = caps.get("image_encodings") if isinstance(caps, dict) else None
    formats = caps.get("request_formats") if isinstance(caps, dict) else None
    limits = data.get("limits")
    return ServerInfo(
        name=str(data.get("name") or ""),
        answers=tuple(answers),
        digest=answers_digest(answers),
        max_batch=_limit(limits, "max_batch"),
        max_body_bytes=_limit(limits, "max_body_bytes"),
        npy=isinstance(encodings, list) and "npy" in encodings,
        binary=isinstance(formats, list) and "binary" in formats,
    )


@dataclass(frozen=True)
class OursFormat:
    """``POST /v1/answer_probs``: a binary batch when the server takes one, else
    ``{"items": [{"image": <base64>, "question"}]}``."""

    info: ServerInfo
    name: str = "ours"

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        """The request body and its content type."""
        if self.info.binary:
            files = [image_file(image, npy=self.info.npy) for image, _ in items]
            return encode_binary_batch(files, [q for _, q in items]), BINARY_CONTENT_TYPE
        payload = {"items": [{"image": encode_image(image, npy=self.info.npy),
                              "question": question} for image, question in items]}
        return json.dumps(payload).encode("utf-8"), JSON_CONTENT_TYPE

    def item_bytes(self, image: NDArray[Any]) -> int:
        """An upper estimate of one item's share of the body, in bytes."""
        itemsize = 4 if self.info.npy and image.dtype != np.uint8 else 1
        raw = image.size * itemsize + 200
        return raw + 64 if self.info.binary else raw * 4 // 3 + 64

    def parse(self, content: bytes, content_type: str, n: int) -> list[Raw]:
        data = load_json(content)
        if not isinstance(data, dict) or not isinstance(data.get("scores"), list):
            raise WireError("answered without a 'scores' list")
        digest = data.get("answers_sha256")
        if digest is not None and digest != self.info.digest:
            raise WireError("answered for another answer list than /v1/info announced "
                            "(answers_sha256 differs): was the model replaced?")
        scores = data["scores"]
        if len(scores) != n:
            raise WireError(f"returned {len(scores)} score rows for {n} inputs")
        width = len(self.info.answers)
        for i, row in enumerate(scores):
            if not isinstance(row, list) or len(row) != width:
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise WireError(f"score row {i} has {got} values, expected {width} "
                                "(one per answer)")
            if not all(_is_number(v) for v in row):
                raise WireError(f"score row {i} holds something that is not a number")
        try:
            array = np.asarray(scores, dtype=np.float64)
        except OverflowError as exc:
            raise WireError("returned a score too large for a 64-bit float") from exc
        return list(array)


def _score(value: object, where: str) -> float:
    if not _is_number(value):
        raise WireError(f"{where} has a score that is not a number: {value!r}")
    try:
        score = float(value)  # type: ignore[arg-type]
    except OverflowError as exc:
        raise WireError(f"{where} has a score too large for a 64-bit float") from exc
    if not math.isfinite(score) or score < 0:
        raise WireError(f"{where} has a score of {score}; scores must be finite and >= 0")
    return score


def _hf_image(image: NDArray[Any]) -> str:
    return encode_image(image, npy=False)


@dataclass(frozen=True)
class TopKFormat:
    """Hugging Face VQA: ``{"inputs": {"image", "question"}, "parameters": {"top_k"}}``."""

    top_k: int
    name: str = "hf"

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        (image, question), = items
        payload = {"inputs": {"image": _hf_image(image), "question": question},
                   "parameters": {"top_k": self.top_k}}
        return json.dumps(payload).encode("utf-8"), JSON_CONTENT_TYPE

    def semantics(self) -> dict[str, Any]:
        """``score_semantics``: lower-bound scores from top-k lists."""
        return {
            "kind": "top_k",
            "format": "hf",
            "top_k": self.top_k,
            "scores": "lower_bounds",
            "maps": "upper_bounds",
            "other_answer": OTHER_ANSWER,
            "note": "The endpoint returns only its top-k answers; an answer missing from "
            "a list scores 0, so every score is a lower bound of the model's, and an "
            "importance p(a|original) - p(a|perturbed) is an upper bound wherever the "
            "answer fell out of the top-k. The answers are those the endpoint gave for "
            "the original input; '(other)' holds the best score of any other answer.",
        }

    def parse(self, content: bytes, content_type: str, n: int) -> list[Raw]:
        data = load_json(content)
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
            data = data[0]
        if isinstance(data, dict) and "error" in data:
            message = terminal_safe(str(data["error"])[:_SNIPPET])
            raise WireError(f"answered with an error: {message}")
        if not isinstance(data, list) or not data:
            raise WireError("answered with no list of {\"answer\", \"score\"} objects")
        pairs = []
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("answer"), str):
                raise WireError(f"entry {i} of the top-k list has no 'answer' string")
            pairs.append((entry["answer"], _score(entry.get("score"), f"entry {i}")))
        return [tuple(pairs)]


@dataclass(frozen=True)
class AnswerOnlyFormat:
    """An endpoint answering only the answer: JSON ``"text"``, ``{"answer": ...}``,
    ``[{"answer": ...}, ...]`` (the first counts) or a plain-text body."""

    name: str = "answer-only"

    def semantics(self) -> dict[str, Any]:
        """``score_semantics``: flip maps."""
        return {
            "kind": "answer_only",
            "format": "answer-only",
            "maps": "flip",
            "other_answer": OTHER_ANSWER,
            "note": "The endpoint returns only its answer, which scores 1 (every other "
            "answer 0); an importance is 1 where the perturbation changed the answer and "
            "0 where it did not: the maps are flip maps.",
        }

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        (image, question), = items
        payload = {"inputs": {"image": _hf_image(image), "question": question}}
        return json.dumps(payload).encode("utf-8"), JSON_CONTENT_TYPE

    def parse(self, content: bytes, content_type: str, n: int) -> list[Raw]:
        if "json" in content_type.lower():
            data = load_json(content)
            if isinstance(data, list) and data:
                data = data[0]
            if isinstance(data, dict):
                data = data.get("answer")
            if not isinstance(data, str):
                raise WireError("answered JSON without an answer string")
            answer = data.strip()
        else:
            answer = content.decode("utf-8", errors="replace").strip()
        if not answer:
            raise WireError("answered with an empty answer")
        return [answer]


def vocabulary_row(raw: Raw, index: dict[str, int], width: int) -> NDArray[np.float64]:
    """A score row over a learned vocabulary plus a last ``(other)`` column.

    A top-k list puts each listed score in its answer's column (answers it does not list
    score 0); an answer outside the vocabulary counts in the ``(other)`` column, which
    holds the best such score. A single answer scores 1 in its column, 0 elsewhere.
    """
    row = np.zeros(width, dtype=np.float64)
    pairs = ((raw, 1.0),) if isinstance(raw, str) else raw
    for answer, score in pairs:  # type: ignore[misc]
        column = index.get(answer, width - 1)
        row[column] = max(row[column], score)
    return row

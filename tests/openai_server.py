"""A chat-completions server on 127.0.0.1 around a toy vision-language model, for the tests.

:func:`toy_logits` is deterministic and computable by hand: its answer depends on the mean
brightness of one image region (rows and columns 0-15) and on one word (``red``).
:class:`ChatServer` is a scripted ``http.server`` handler (see ``live_server``) speaking the
OpenAI chat-completions schema, with request validation as strict as the hosted API's
(pydantic models that forbid unknown fields, known roles and content-part types only, a
base64 ``data:`` URL that decodes as an image, ``top_logprobs`` only with ``logprobs``),
OpenAI-shaped errors, and scripted faults.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.server
import io
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blackbox_vqa.text import split_words
from live_server import send_json

REGION = (slice(0, 16), slice(0, 16))
WORD = "red"
TOKENS = ("Yes", " Yes", "No", "maybe", "blue", "2")


def toy_logits(image: np.ndarray, question: str) -> dict[str, float]:
    """Logits of the first generated token. ``r``: mean of the region / 255; the word
    ``red`` in the question lets ``r`` speak, else the answer leans to ``No``."""
    r = float(np.asarray(image, dtype=np.float64)[REGION].mean()) / 255.0
    k = 1.0 if WORD in [w.lower() for w in split_words(question)] else 0.0
    return {"Yes": 6.0 * r * k, " Yes": 6.0 * r * k - 1.5, "No": 3.0 - 3.0 * r * k,
            "maybe": 1.0, "blue": 0.5 - 2.0 * k, "2": -1.0}


def toy_logprobs(image: np.ndarray, question: str) -> dict[str, float]:
    """Log-softmax of :func:`toy_logits`."""
    logits = toy_logits(image, question)
    top = max(logits.values())
    total = math.log(sum(math.exp(v - top) for v in logits.values())) + top
    return {token: value - total for token, value in logits.items()}


# ------------------------------------------------------------------ the request schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None


class RequestError(Exception):
    """A request the real API would refuse (status, message)."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def decode_data_url(url: str) -> np.ndarray:
    """The RGB pixels of a ``data:image/png;base64,...`` URL, or :class:`RequestError`."""
    head, sep, data = url.partition(",")
    if not sep or head not in ("data:image/png;base64", "data:image/jpeg;base64"):
        raise RequestError(400, "image_url must be a base64 data URL of a PNG or JPEG image")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert("RGB"))
    except (binascii.Error, ValueError, OSError) as exc:
        raise RequestError(400, f"invalid image data: {exc}") from exc


def read_request(body: bytes) -> tuple[ChatRequest, np.ndarray, str]:
    """Validate a chat request: the request, its one image and its text."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RequestError(400, f"{where}: {first['msg']}") from exc
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError(400, "top_logprobs requires logprobs to be true")
    users = [m for m in request.messages if m.role == "user"]
    if len(users) != 1 or isinstance(users[0].content, str):
        raise RequestError(400, "expected one user message with content parts")
    parts = users[0].content
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    images = [decode_data_url(p.image_url.url) for p in parts if isinstance(p, ImagePart)]
    if len(texts) != 1 or len(images) != 1:
        raise RequestError(400, "expected one text part and one image_url part")
    return request, images[0], texts[0]


# ------------------------------------------------------------------ the server


def completion(model: str, logprobs: dict[str, float] | None, top: int) -> dict[str, Any]:
    """A chat completion answering the most likely token, then ``.``."""
    scores = toy_logprobs_order(logprobs) if logprobs else []
    chosen = scores[0][0] if scores else "No"
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": f"{chosen}.", "refusal": None},
        "finish_reason": "stop",
        "logprobs": None,
    }
    if logprobs is not None:
        listed = [{"token": t, "logprob": v, "bytes": list(t.encode())}
                  for t, v in scores[:top]]
        dot = {"token": ".", "logprob": -0.01, "bytes": [46]}
        choice["logprobs"] = {"content": [
            {"token": chosen, "logprob": logprobs[chosen], "bytes": list(chosen.encode()),
             "top_logprobs": listed},
            {**dot, "top_logprobs": [dot][:top]},
        ], "refusal": None}
    return {"id": "chatcmpl-toy", "object": "chat.completion", "created": 0, "model": model,
            "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                           "total_tokens": 3}}


def toy_logprobs_order(logprobs: dict[str, float]) -> list[tuple[str, float]]:
    """Tokens best first (ties: the toy's order)."""
    return sorted(logprobs.items(), key=lambda pair: -pair[1])


@dataclass
class ChatServer:
    """``GET /v1/models`` and ``POST /v1/chat/completions`` around the toy's logits.

    ``faults[i]`` is what the ``i``-th POST gets (then ``"ok"``), ``always`` applies to
    every POST. ``logprobs=False``: a server that never returns logprobs. ``limited``:
    headers added to every successful answer (rate-limit buckets).
    """

    name: str = "toy-vlm"
    models: tuple[str, ...] = ("toy-vlm",)
    api_key: str | None = None
    logprobs: bool = True
    faults: list[str] = field(default_factory=list)
    always: str | None = None
    sleep: float = 1.0
    limited: dict[str, str] = field(default_factory=dict)
    posts: list[float] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, handler: http.server.BaseHTTPRequestHandler, method: str,
                 body: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            try:
                self._check_key(handler)
                if method == "GET" and handler.path == "/v1/models":
                    listing = [{"id": m, "object": "model", "owned_by": "toy"}
                               for m in self.models]
                    self._send(handler, 200, {"object": "list", "data": listing})
                elif method == "POST" and handler.path == "/v1/chat/completions":
                    self._chat(handler, body)
                else:
                    raise RequestError(404, f"Unknown request URL: {method} {handler.path}",
                                       "unknown_url")
            except RequestError as exc:
                self._send(handler, exc.status, {"error": {
                    "message": exc.message, "type": "invalid_request_error",
                    "param": None, "code": exc.code}})

    def _check_key(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        if self.api_key is not None and \
                handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            raise RequestError(401, "Incorrect API key provided", "invalid_api_key")

    def _send(self, handler: Any, status: int, body: Any,
              headers: dict[str, str] | None = None) -> None:
        send_json(handler, status, json.dumps(body).encode(), headers)

    def _chat(self, handler: Any, body: bytes) -> None:
        with self.lock:
            index = len(self.posts)
            self.posts.append(time.monotonic())
        fault = self.always or (self.faults[index] if index < len(self.faults) else "ok")
        request, image, text = read_request(body)
        if request.model not in self.models:
            raise RequestError(404, f"The model `{request.model}` does not exist",
                               "model_not_found")
        with self.lock:
            self.requests.append(json.loads(body))
            self.texts.append(text)
        if self._fault(handler, fault):
            return
        logprobs = toy_logprobs(image, text) if self.logprobs and request.logprobs else None
        answer = completion(request.model, logprobs, request.top_logprobs or 0)
        if not self.logprobs:  # the answer is still the toy's
            best = toy_logprobs_order(toy_logprobs(image, text))[0][0]
            answer["choices"][0]["message"]["content"] = f"{best}."
        payload = json.dumps(self._spoil(fault, answer)).encode()
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        if fault == "half":  # promise the whole body, send half, hang up
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload[: len(payload) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        with self.lock:
            self.answered += 1
        send_json(handler, 200, payload, self.limited)

    def _fault(self, handler: Any, fault: str) -> bool:
        """Answer a fault that replaces the answer; True when done."""
        if fault == "drop":  # read the request, then close without a word
            handler.close_connection = True
            return True
        if fault == "slow":
            time.sleep(self.sleep)
        statuses = {"500": {}, "503": {}, "400": {}, "413": {},
                    "429": {"Retry-After": "0.05"},
                    "429-limits": {"x-ratelimit-limit-requests": "60",
                                   "x-ratelimit-remaining-requests": "0",
                                   "x-ratelimit-reset-requests": "50ms",
                                   "x-ratelimit-limit-tokens": "1000",
                                   "x-ratelimit-remaining-tokens": "990",
                                   "x-ratelimit-reset-tokens": "6m0s"}}
        if fault in statuses:
            status = int(fault[:3])
            self._send(handler, status, {"error": {
                "message": f"scripted {status}", "type": "x", "param": None, "code": None}},
                statuses[fault])
            return True
        return False

    @staticmethod
    def _spoil(fault: str, answer: dict[str, Any]) -> Any:
        choice = answer["choices"][0]
        first = (choice["logprobs"] or {"content": [{}]})["content"][0]
        if fault == "no-choices":
            answer["choices"] = []
        elif fault == "nan":
            first["top_logprobs"][1]["logprob"] = float("nan")
        elif fault == "positive":
            first["logprob"] = 0.5
        elif fault == "empty":
            choice["message"]["content"] = " . "
        elif fault == "refusal":
            choice["message"] = {"role": "assistant", "content": None,
                                 "refusal": "I cannot help with that."}
        elif fault == "error":
            return {"error": {"message": "model overloaded", "type": "server_error"}}
        elif fault == "no-logprobs":
            choice["logprobs"] = None
        return answer

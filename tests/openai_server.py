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


def _log_softmax(logits: dict[str, float]) -> dict[str, float]:
    top = max(logits.values())
    total = math.log(sum(math.exp(v - top) for v in logits.values())) + top
    return {token: value - total for token, value in logits.items()}


def toy_logprobs(image: np.ndarray, question: str) -> dict[str, float]:
    """Log-softmax of :func:`toy_logits`."""
    return _log_softmax(toy_logits(image, question))


SECOND = (".", "!", " indeed")


def toy_second_logprobs(image: np.ndarray, question: str) -> dict[str, float]:
    """Log-probabilities of the second generated token (whatever the first): ``.`` is
    always the most likely, the more so the brighter the region (``2 r + 1`` against
    ``0.5`` and ``-r``)."""
    r = float(np.asarray(image, dtype=np.float64)[REGION].mean()) / 255.0
    return _log_softmax({".": 2.0 * r + 1.0, "!": 0.5, " indeed": -r})


VOCAB = ("<s>", "USER:", "<image>", " ASSISTANT:", *TOKENS, *SECOND)


def toy_tokens(text: str) -> list[str]:
    """Greedy longest-match tokens of ``text`` over the toy's vocabulary; any other
    character is a token of its own."""
    known = sorted(set(TOKENS) | set(SECOND), key=len, reverse=True)
    out: list[str] = []
    i = 0
    while i < len(text):
        match = next((t for t in known if text.startswith(t, i)), text[i])
        out.append(match)
        i += len(match)
    return out


def toy_answer_logprob(image: np.ndarray, question: str, answer: str) -> float:
    """The toy's log-probability of generating ``answer`` token by token (the first two
    positions as generated; any later token -5; a token the position cannot produce
    -30): what a ``prompt_logprobs`` request returns for the answer's positions."""
    return sum(_answer_position_logprobs(image, question, toy_tokens(answer)))


def _answer_position_logprobs(image: np.ndarray, question: str,
                              tokens: list[str]) -> list[float]:
    tables = [toy_logprobs(image, question), toy_second_logprobs(image, question)]
    return [tables[i].get(t, -30.0) if i < 2 else -5.0 for i, t in enumerate(tokens)]


def toy_id(token: str) -> int:
    """A token's id: its index in :data:`VOCAB`, else ``1000 +`` its first character's."""
    return VOCAB.index(token) if token in VOCAB else 1000 + ord(token[0])


def toy_token(token_id: int) -> str:
    """The token of an id (:func:`toy_id` undone)."""
    return VOCAB[token_id] if token_id < len(VOCAB) else chr(token_id - 1000)


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
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    # vLLM's extensions (refused by the other flavours, as the hosted API refuses them)
    prompt_logprobs: int | None = Field(default=None, ge=0)
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    logprob_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None


VLLM_FIELDS = ("prompt_logprobs", "continue_final_message", "add_generation_prompt",
               "logprob_token_ids", "return_tokens_as_token_ids", "return_token_ids")


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


def read_request(body: bytes, flavour: str = "openai") -> tuple[ChatRequest, np.ndarray, str]:
    """Validate a chat request: the request, its one image and its text (and, for the
    ``vllm`` flavour, a final assistant message to continue)."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RequestError(400, f"{where}: {first['msg']}") from exc
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError(400, "top_logprobs requires logprobs to be true")
    extras = [f for f in VLLM_FIELDS if f in request.model_fields_set]
    if extras and flavour != "vllm":
        raise RequestError(400, f"{extras[0]}: Extra inputs are not permitted")
    if request.continue_final_message and request.add_generation_prompt is not False:
        raise RequestError(400, "Cannot set both `continue_final_message` and "
                           "`add_generation_prompt` to True.")
    if request.continue_final_message and (request.messages[-1].role != "assistant"):
        raise RequestError(400, "continue_final_message needs a final assistant message")
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


def completion(model: str, logprobs: dict[str, float] | None, top: int,
               second: dict[str, float] | None = None) -> dict[str, Any]:
    """A chat completion answering the most likely token, then ``.`` (with ``second``,
    :func:`toy_second_logprobs`, its logprob from there)."""
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
        dot = {"token": ".", "logprob": (second or {}).get(".", -0.01), "bytes": [46]}
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

    ``flavour``: ``"openai"`` (the hosted API's shapes, vLLM's fields refused), ``"vllm"``
    (the shapes of vLLM 0.32 in /work/shared/vlm-servers/response_shapes.json, its
    ``prompt_logprobs`` with a continued assistant message, and its ``max_logprobs`` cap
    and message), ``"llama"`` (llama-server's shapes: token ids in the logprobs, the
    model file as the model id). ``refuses``: parameters refused as a hosted reasoning
    model refuses them (``max_tokens``, ``temperature``, ``logprobs``; ``logprob_token_ids``
    as a vLLM without that field does). ``prompt_drift``: added to every answer token's
    ``prompt_logprobs`` value (a server whose prompt scores drift from its generation).
    ``stop_after``: answer this many POSTs, then stop (every later one is dropped).
    """

    name: str = "toy-vlm"
    models: tuple[str, ...] = ("toy-vlm",)
    api_key: str | None = None
    logprobs: bool = True
    faults: list[str] = field(default_factory=list)
    always: str | None = None
    sleep: float = 1.0
    limited: dict[str, str] = field(default_factory=dict)
    flavour: str = "openai"
    max_logprobs: int = 20
    refuses: tuple[str, ...] = ()
    stop_after: int | None = None
    echo_key: bool = False
    template_space: bool = False  # vllm: the chat template puts a space before the message
    prompt_drift: float = 0.0  # vllm: added to each answer token's prompt logprob
    token_ids: bool = True  # vllm: False ignores return_token_ids (sends no prompt ids)
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
            given = handler.headers.get("Authorization", "")
            echo = f": {given.removeprefix('Bearer ')}" if self.echo_key else ""
            raise RequestError(401, f"Incorrect API key provided{echo}", "invalid_api_key")

    def _send(self, handler: Any, status: int, body: Any,
              headers: dict[str, str] | None = None) -> None:
        send_json(handler, status, json.dumps(body).encode(), headers)

    def _chat(self, handler: Any, body: bytes) -> None:
        with self.lock:
            index = len(self.posts)
            self.posts.append(time.monotonic())
        fault = self.always or (self.faults[index] if index < len(self.faults) else "ok")
        if self.stop_after is not None and index >= self.stop_after:
            fault = "drop"
        request, image, text = read_request(body, self.flavour)
        self._refuse(request)
        if request.model not in self.models:
            raise RequestError(404, f"The model `{request.model}` does not exist",
                               "model_not_found")
        with self.lock:
            self.requests.append(json.loads(body))
            self.texts.append(text)
        if self._fault(handler, fault):
            return
        scoring = (self._next_token if request.logprob_token_ids is not None
                   else self._score if request.prompt_logprobs is not None else None)
        if scoring is not None:  # a next-token-by-id or a whole-answer scoring request
            answer = scoring(request, image, text)
            with self.lock:
                self.answered += 1
            send_json(handler, 200, json.dumps(answer).encode(), self.limited)
            return
        logprobs = toy_logprobs(image, text) if self.logprobs and request.logprobs else None
        answer = completion(request.model, logprobs, request.top_logprobs or 0,
                            toy_second_logprobs(image, text))
        self._shape(answer)
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

    def _refuse(self, request: ChatRequest) -> None:
        """Refuse what this server refuses, in its own words."""
        asked = request.model_fields_set
        if "max_tokens" in self.refuses and "max_tokens" in asked:
            raise RequestError(400, "Unsupported parameter: 'max_tokens' is not supported "
                               "with this model. Use 'max_completion_tokens' instead.",
                               "unsupported_parameter")
        if "temperature" in self.refuses and "temperature" in asked:
            raise RequestError(400, "Unsupported value: 'temperature' does not support 0 "
                               "with this model. Only the default (1) value is supported.",
                               "unsupported_value")
        if "logprobs" in self.refuses and "logprobs" in asked:
            raise RequestError(400, "Unsupported parameter: 'logprobs' is not supported "
                               "with this model.", "unsupported_parameter")
        if "logprob_token_ids" in self.refuses and "logprob_token_ids" in asked:
            raise RequestError(400, "logprob_token_ids: Extra inputs are not permitted")
        if self.flavour == "vllm" and (request.top_logprobs or 0) > self.max_logprobs:
            raise RequestError(400, f"Requested sample logprobs of {request.top_logprobs}, "
                               f"which is greater than max allowed: {self.max_logprobs}",
                               "BadRequestError")
        if self.flavour == "vllm" and (request.prompt_logprobs or 0) > self.max_logprobs:
            raise RequestError(400, f"Requested prompt logprobs of {request.prompt_logprobs}"
                               f", which is greater than max allowed: {self.max_logprobs}",
                               "BadRequestError")

    def _shape(self, answer: dict[str, Any]) -> None:
        """The keys a real server adds (vLLM: ``prompt_logprobs`` and more, all null;
        llama-server: token ids, the model file as the model)."""
        if self.flavour == "vllm":
            answer.update({"service_tier": None, "system_fingerprint": "vllm-toy",
                           "prompt_logprobs": None, "prompt_token_ids": None,
                           "kv_transfer_params": None})
            answer["choices"][0].update({"stop_reason": None, "token_ids": None})
        elif self.flavour == "llama":
            answer["model"] = "gguf/toy-vlm-f32.gguf"
            content = (answer["choices"][0]["logprobs"] or {}).get("content", [])
            for entry in content:
                entry["id"] = VOCAB.index(entry["token"]) if entry["token"] in VOCAB else 0
                for alt in entry.get("top_logprobs", []):
                    alt["id"] = VOCAB.index(alt["token"]) if alt["token"] in VOCAB else 0

    def _score(self, request: ChatRequest, image: np.ndarray, text: str) -> dict[str, Any]:
        """vLLM's answer with ``prompt_logprobs``: the rendered prompt is ``<s> USER:``,
        the prompt text's characters, ``<image>``, `` ASSISTANT:`` and the continued
        assistant message's tokens; every position but the first gets a logprob (the
        answer's positions the toy's own, the others -1), and ``prompt_logprobs: k`` adds
        ``k`` alternatives with logprob -9."""
        head, tokens = self._prompt(request, text)
        values = [-1.0] * (len(head) - 1) + [
            v + self.prompt_drift for v in _answer_position_logprobs(image, text, tokens)]
        entries: list[Any] = [None]
        ids = [toy_id(t) for t in head + tokens]
        for position, (token, value) in enumerate(zip(head[1:] + tokens, values,
                                                      strict=True), start=1):
            entry = {str(ids[position]): {"logprob": value, "rank": 1,
                                          "decoded_token": token}}
            for k in range(request.prompt_logprobs or 0):
                entry[str(2000 + k)] = {"logprob": -9.0, "rank": k + 2,
                                        "decoded_token": f"<alt{k}>"}
            entries.append(entry)
        answer_body = completion(request.model, None, 0)
        answer_body["choices"][0]["message"]["content"] = ""
        answer_body["choices"][0]["finish_reason"] = "length"
        self._shape(answer_body)
        answer_body["prompt_logprobs"] = entries
        if request.return_token_ids and self.token_ids:
            answer_body["prompt_token_ids"] = ids
        return answer_body

    def _prompt(self, request: ChatRequest, text: str) -> tuple[list[str], list[str]]:
        """The rendered prompt's tokens: the head (through `` ASSISTANT:``) and those of
        a continued assistant message (none for the generation prompt)."""
        head = ["<s>", "USER:", *list(text), "<image>", " ASSISTANT:"]
        final = request.messages[-1]
        if not request.continue_final_message or final.role != "assistant":
            return head, []
        answer = final.content if isinstance(final.content, str) else ""
        answer = " " + answer if self.template_space else answer
        return head, toy_tokens(answer)

    def _next_token(self, request: ChatRequest, image: np.ndarray,
                    text: str) -> dict[str, Any]:
        """vLLM's answer to ``logprob_token_ids`` (tokens as ``token_id:N``): the
        log-probability of each listed token at the position after the prompt (the
        toy's own for the answer's first two positions, -5 after)."""
        head, tokens = self._prompt(request, text)
        asked = request.logprob_token_ids or []
        position = len(tokens)
        listed = [{"token": f"token_id:{i}", "bytes": [],
                   "logprob": _answer_position_logprobs(
                       image, text, [""] * position + [toy_token(i)])[position]}
                  for i in asked]
        answer = completion(request.model, None, 0)
        choice = answer["choices"][0]
        choice["message"]["content"] = ""
        choice["finish_reason"] = "length"
        choice["logprobs"] = {"content": [{**listed[0], "top_logprobs": listed}]
                              if listed else [], "refusal": None}
        self._shape(answer)
        if request.return_token_ids and self.token_ids:
            answer["prompt_token_ids"] = [toy_id(t) for t in head + tokens]
        return answer

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
        elif fault == "huge":  # -10**400: a number JSON holds and a float does not
            for entry in first["top_logprobs"]:
                if entry["token"] == "No":
                    entry["logprob"] = -10**400
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

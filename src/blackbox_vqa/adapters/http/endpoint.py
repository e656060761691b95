"""HttpAdapter: a model on another machine, reached over HTTP, behind the model protocol.

Inputs go out in batches, several requests in flight at once (bounded), over one
keep-alive client with finite timeouts that retries what is worth retrying
(:mod:`blackbox_vqa.adapters.http.transport`). A 413 answer splits the batch in halves
and goes on. An input already
answered (same pixels, same question) is not sent again. Every response is validated, and
every failure becomes one :class:`~blackbox_vqa.errors.ModelError` naming the endpoint.

Four wire formats (see :mod:`blackbox_vqa.adapters.http.formats`): ``ours`` (what
``bbvqa serve`` speaks), ``hf`` (Hugging Face VQA inference, top-k lists),
``answer-only`` and ``openai`` (chat completions with logprobs,
:mod:`blackbox_vqa.adapters.http.openai`). With the last three the answer vocabulary is
learned from the endpoint's answers (:meth:`HttpAdapter.prepare`; an ``openai`` adapter
also learns it from the first input it is asked about) plus an ``(other)`` column, and
:attr:`HttpAdapter.score_semantics` says what the scores mean.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_pairs, check_scores
from blackbox_vqa.adapters.http.formats import (
    FORMATS,
    OTHER_ANSWER,
    AnswerOnlyFormat,
    Item,
    OursFormat,
    Raw,
    ServerInfo,
    TopKFormat,
    WireError,
    WireFormat,
    parse_info,
    vocabulary_row,
)
from blackbox_vqa.adapters.http.openai import (
    CHAT_PATH,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPT,
    DEFAULT_SEED,
    DEFAULT_TOP_LOGPROBS,
    MODELS_PATH,
    ChatAnswer,
    ChatFormat,
    ChatVocabulary,
    adapt_to_refusal,
    chat_semantics,
    check_chat_options,
    parse_model_list,
)
from blackbox_vqa.adapters.http.request_cache import RequestCache
from blackbox_vqa.adapters.http.sequence import SequenceFormat, SequenceScore, sequence_semantics
from blackbox_vqa.adapters.http.transport import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_TOTAL_TIMEOUT,
    AbortedError,
    HttpStatusError,
    ResponseLimits,
    RetryingClient,
    RetryPolicy,
    TooLargeError,
    display_url,
    parse_headers,
)
from blackbox_vqa.errors import InputError, ModelError, ModelLoadError, ModelOutputError
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.wire import ANSWER_PROBS_PATH, INFO_PATH

__all__ = [
    "DEFAULT_CONCURRENCY",
    "OPTION_KEYS",
    "HttpAdapter",
]

DEFAULT_CONCURRENCY = 4
# A request carries at least this many inputs, or as many as make _REQUEST_BYTES of float32
# pixels if fewer (measured on loopback: a request costs the server a few milliseconds of
# its own, so many small requests cost more than they gain in overlap).
MIN_REQUEST_ITEMS = 32
_REQUEST_BYTES = 4 * 2**20
# ``ModelOptions.extra`` keys (what ``bbvqa explain --http-...`` passes) -> parameters.
OPTION_KEYS = {
    "http_format": "wire_format",
    "http_headers": "headers",
    "http_concurrency": "concurrency",
    "http_timeout": "timeout",
    "remote_model": "remote_model",
    "prompt": "prompt",
    "max_tokens": "max_tokens",
    "http_total_timeout": "total_timeout",
    "http_max_response_bytes": "max_response_bytes",
    "top_logprobs": "top_logprobs",
    "answer_score": "score",
    "require_logprobs": "require_logprobs",
    "request_cache": "request_cache",
}
SCORES = ("auto", "sequence", "first-token")
# Two log-probabilities of one answer that agree (the server's own float noise is ~1e-6).
_SAME_LOGPROB = 1e-3
# Options of the openai format alone (None: the format's default).
_CHAT_OPTIONS = {"remote_model": "--remote-model", "prompt": "--prompt",
                 "max_tokens": "--max-tokens", "top_logprobs": "--top-logprobs",
                 "score": "--answer-score", "require_logprobs": "--require-logprobs"}
# An upper estimate of one score's share of an 'ours' JSON answer ("1.2345678901234567e-05, ").
_SCORE_JSON_BYTES = 25
_CACHE_BYTES = 64 * 2**20
_BODY_FILL = 0.9
# What one input's answer is before it becomes a score row (see http_formats.Raw).
Answer = Raw | ChatAnswer | SequenceScore


def _image_key(image: NDArray[Any]) -> bytes:
    values = image if image.dtype == np.float32 else image.astype(np.float32)
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(values).data)
    return digest.digest()


def _positive_int(value: object, name: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _seconds(value: object, name: str, *, zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        bound = ">= 0" if zero else "> 0"
        raise InputError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


class HttpAdapter:
    """A model behind an HTTP endpoint.

    Args:
        url: ``http(s)://host:port[/path]``; for ``ours`` the base of ``/v1/...``, for
            ``hf`` and ``answer-only`` the URL to POST to, for ``openai`` the API's base
            (``.../v1``, to which ``/chat/completions`` is added).
        wire_format: ``"ours"``, ``"hf"``, ``"answer-only"`` or ``"openai"``.
        headers: extra headers (``{"Name": "value"}`` or ``["Name: value"]``), e.g. an API
            key; never shown in messages or outputs.
        concurrency: most requests in flight at once.
        timeout: read (and write) timeout per request, seconds: the longest wait for the
            next piece of an answer; ``connect_timeout`` for opening a connection.
        total_timeout: the longest one request may take, from sending it to the last byte
            of its answer, seconds (checked as the answer arrives, so at most one read
            timeout more); passed: an error, not retried.
        max_response_bytes: the largest answer body accepted, counted after
            decompression; larger: an error, not retried. For ``ours`` the adapter sends
            few enough inputs per request that an honest answer fits in half of it.
        retries: retries after the first attempt, on connection errors, timeouts, 5xx and
            429; ``backoff`` and ``max_backoff`` shape the waits (seconds), and a
            ``Retry-After`` above ``max_retry_after`` seconds fails at once.
        batch_size: most inputs per request (``ours``; default: a batch shared out over
            ``concurrency`` requests of at least 32 inputs, within the server's announced
            limits).
        top_k: ``top_k`` asked of an ``hf`` endpoint.
        answers: a known vocabulary for ``hf``/``answer-only`` (else learned).
        remote_model: ``openai``: the request's ``model`` (default: the only model the
            server lists at ``GET {url}/models``).
        prompt: ``openai``: the text sent with the image; ``{question}`` is replaced by
            the question (default :data:`~blackbox_vqa.adapters.http.openai.DEFAULT_PROMPT`).
        max_tokens: ``openai``: most tokens generated (default 8).
        top_logprobs: ``openai``: alternatives asked for at each position (default 20,
            OpenAI's maximum; a server may allow more).
        remote_seed: ``openai``: the request's ``seed`` (None: none sent).
        score: ``openai``: ``"auto"`` (whole-answer likelihood where the server offers
            it, else first token), ``"sequence"`` (an error where it does not) or
            ``"first-token"``.
        require_logprobs: ``openai``: a server answering without logprobs is an error
            instead of answer-only flip maps.
        request_cache: a folder keeping every completed chat request's answer, so that a
            rerun sends nothing twice (None: none; the other formats keep none, and
            ignore it).
        cache: do not send an input already answered.
        transport: an ``httpx`` transport (the I/O seam for tests and proxies).
        sleep: called with each retry wait in seconds (default: wait on an event).
        seed: seed of the jitter's random numbers.
        name: display name (default: the URL without credentials or query).
    """

    def __init__(
        self,
        url: str,
        *,
        wire_format: str = "ours",
        headers: Mapping[str, str] | Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        max_retry_after: float = 60.0,
        batch_size: int | None = None,
        top_k: int = 10,
        answers: Sequence[str] | None = None,
        remote_model: str | None = None,
        prompt: str | None = None,
        max_tokens: int | None = None,
        top_logprobs: int | None = None,
        remote_seed: int | None = DEFAULT_SEED,
        score: str | None = None,
        require_logprobs: bool | None = None,
        request_cache: str | Path | None = None,
        cache: bool = True,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        self.url = self._parse_url(url)
        if wire_format not in FORMATS:
            raise InputError(f"http format (--http-format) must be one of "
                             f"{', '.join(FORMATS)}; got {wire_format!r}")
        self.wire_format = wire_format
        self.concurrency = _positive_int(concurrency, "http concurrency (--http-concurrency)")
        self.timeout = _seconds(timeout, "http timeout (--http-timeout)")
        self.connect_timeout = _seconds(connect_timeout, "connect timeout")
        self.limits = ResponseLimits(
            max_bytes=_positive_int(max_response_bytes,
                                    "http max response bytes (--http-max-response-mb)"),
            total=_seconds(total_timeout, "http total timeout (--http-total-timeout)"),
        )
        self.policy = RetryPolicy(
            retries=_positive_int(retries, "retries", low=0),
            backoff=_seconds(backoff, "backoff", zero=True),
            max_backoff=_seconds(max_backoff, "max_backoff", zero=True),
            max_retry_after=_seconds(max_retry_after, "max_retry_after", zero=True),
        )
        self.batch_size = None if batch_size is None else _positive_int(batch_size, "batch_size")
        self.top_k = _positive_int(top_k, "top_k")
        self.cache = cache
        self.name = name or display_url(self.url)
        self._lock = threading.Lock()
        self._cache: dict[tuple[bytes, str], Answer] = {}
        self._http = RetryingClient(
            headers=parse_headers(headers), timeout=self.timeout,
            connect_timeout=self.connect_timeout, connections=self.concurrency,
            policy=self.policy, limits=self.limits, transport=transport, sleep=sleep,
            seed=seed,
            tls=self.url.scheme == "https",
            hint=_hint(wire_format),
        )
        self._image_bytes: int | None = None
        self._vocab: list[str] = []
        self._index: dict[str, int] = {}
        self.info: ServerInfo | None = None
        self._chat: ChatVocabulary | None = None
        self._format: WireFormat | ChatFormat | SequenceFormat
        chat = {"remote_model": remote_model, "prompt": prompt, "max_tokens": max_tokens,
                "top_logprobs": top_logprobs, "score": score,
                "require_logprobs": require_logprobs or None}
        self.score = "auto" if score is None else score
        if self.score not in SCORES:
            raise InputError(f"answer score (--answer-score) must be one of "
                             f"{', '.join(SCORES)}; got {score!r}")
        self.require_logprobs = bool(require_logprobs)
        self.notes: list[str] = []
        self.mode: str | None = None  # openai: sequence, first_token or answer_only
        self.server_model: str | None = None
        self.requests = RequestCache(request_cache) if request_cache is not None and \
            wire_format == "openai" else None
        if wire_format != "openai":
            for key, value in chat.items():
                if value is not None:
                    raise InputError(f"{key} ({_CHAT_OPTIONS[key]}) is only for "
                                     "--http-format openai")
        if wire_format == "openai":
            if answers is not None:
                raise InputError("answers= is not for the openai format: its answers are "
                                 "identified by their first token, learned from the endpoint")
            self._format = self._chat_format(remote_model, prompt, max_tokens, top_logprobs,
                                             remote_seed)
            self._chat = ChatVocabulary()
            self._max_items = 1
        elif wire_format == "ours":
            if answers is not None:
                raise InputError("answers= is only for the hf and answer-only formats; "
                                 "an 'ours' endpoint announces its answers")
            self.info = self._fetch_info()
            self._format = OursFormat(self.info)
            self._max_items = self.info.max_batch or 2**31
        else:
            self._format = TopKFormat(self.top_k) if wire_format == "hf" else AnswerOnlyFormat()
            self._max_items = 1
            for answer in answers or ():
                self._learn(answer)

    @property
    def _chat_settings(self) -> ChatFormat:
        fmt = self._format
        return fmt.chat if isinstance(fmt, SequenceFormat) else fmt  # type: ignore[return-value]

    def _chat_format(self, remote_model: str | None, prompt: str | None,
                     max_tokens: int | None, top_logprobs: int | None,
                     seed: int | None) -> ChatFormat:
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        top_logprobs = DEFAULT_TOP_LOGPROBS if top_logprobs is None else top_logprobs
        check_chat_options(prompt, max_tokens, top_logprobs, seed)
        if remote_model is None:
            remote_model = self._only_model()
        elif not isinstance(remote_model, str) or not remote_model.strip():
            raise InputError(f"remote model (--remote-model) must be a model name, "
                             f"got {remote_model!r}")
        return ChatFormat(remote_model, prompt, max_tokens, top_logprobs, seed)

    @classmethod
    def from_options(cls, url: str, extra: Mapping[str, Any]) -> HttpAdapter:
        """Build from a model spec's options: ``http_format``, ``http_headers``,
        ``http_concurrency``, ``http_timeout``, ``http_total_timeout``,
        ``http_max_response_bytes``, and for ``openai`` ``remote_model``, ``prompt``,
        ``max_tokens`` (a missing or None value keeps the default)."""
        settings: dict[str, Any] = {}
        for key, param in OPTION_KEYS.items():
            if extra.get(key) is not None:
                settings[param] = extra[key]
        return cls(url, **settings)

    @staticmethod
    def _parse_url(url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url.strip())
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise InputError(f"invalid endpoint URL: {exc}") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InputError("endpoint URL must look like http://host:port[/path]")
        return parsed

    # ----------------------------------------------------------------- the protocol

    @property
    def answers(self) -> Sequence[str]:
        """The answer vocabulary; for ``hf``/``answer-only``/``openai`` the learned one plus
        ``(other)``."""
        if self.info is not None:
            return self.info.answers
        if self._chat is not None:
            return (*self._chat.names, OTHER_ANSWER)
        return (*self._vocab, OTHER_ANSWER)

    @property
    def score_semantics(self) -> dict[str, Any] | None:
        """What the scores mean when they are not the model's own (None for ``ours``)."""
        if self._chat is not None:
            chat = self._chat_settings
            found = sequence_semantics() if self.mode == "sequence" else \
                chat_semantics(chat.top_logprobs, self._chat.logprobs)
            found["request"] = {**chat.settings(), "score": found["kind"],
                                "server_model": self.server_model}
            if self.notes:
                found["notes"] = list(self.notes)
            return found
        if isinstance(self._format, (TopKFormat, AnswerOnlyFormat)):
            return self._format.semantics()
        return None

    def answer_probs(self, image: ImageInput, question: str) -> NDArray[np.float64]:
        """Scores ``[A]`` for one image and question."""
        return self.answer_probs_batch([image], [question])[0]

    def answer_probs_batch(
        self, images: Sequence[ImageInput], questions: Sequence[str]
    ) -> NDArray[np.float64]:
        """Scores ``[B, A]`` (``float64``, finite, >= 0) for ``B`` images and questions."""
        check_pairs(images, questions)
        if self._chat is not None:
            return self._chat_scores(self._chat, images, questions)
        if self.info is None and not self._vocab and images:
            # Prepares itself on first use: the first input (an explanation's original)
            # gives the vocabulary, which stays fixed from here on.
            self.prepare(images[0], str(questions[0]))
        width = len(self.answers)
        arrays = [to_rgb_array(img) for img in images]
        self._note_sizes(arrays)
        raws = self._raw(arrays, [str(q) for q in questions])
        if not raws:
            return np.zeros((0, width), dtype=np.float64)
        rows: list[Any] = raws  # full rows (ours), or:
        if self.info is None:
            rows = [vocabulary_row(raw, self._index, width) for raw in raws]  # type: ignore[arg-type]
        return check_scores(np.stack(rows), len(raws), width, source=f"HTTP endpoint {self.name}")

    def _chat_scores(
        self, chat: ChatVocabulary, images: Sequence[ImageInput], questions: Sequence[str]
    ) -> NDArray[np.float64]:
        """``openai``: with no answers learned yet, the first input learns them (as
        :meth:`prepare` does) before any row is built."""
        arrays = [to_rgb_array(img) for img in images]
        self._note_sizes(arrays)
        if self.mode is None and arrays:
            self._negotiate(arrays[0], str(questions[0]))
        raws = [raw for raw in self._raw(arrays, [str(q) for q in questions])
                if isinstance(raw, (ChatAnswer, SequenceScore))]
        width = len(self.answers)
        if not raws:
            return np.zeros((0, width), dtype=np.float64)
        try:
            rows = [_sequence_row(raw, width) if isinstance(raw, SequenceScore)
                    else chat.row(raw, width) for raw in raws]
        except WireError as exc:
            url = display_url(self._endpoint(CHAT_PATH))
            raise ModelOutputError(f"HTTP endpoint {url} {exc}") from exc
        return check_scores(np.stack(rows), len(raws), width, source=f"HTTP endpoint {self.name}")

    def prepare(self, image: ImageInput, question: str) -> None:
        """Get ready to explain this input (``bbvqa explain`` calls it first).

        Notes the image size, which sizes :attr:`preferred_batch_size`; for ``hf`` and
        ``answer-only``, adds the answers the endpoint gives for this input to the
        vocabulary (which does not grow otherwise, so score rows keep one width through an
        explanation). For ``openai``, adds the answer generated for this input and the
        alternatives to its first token. Sends nothing for ``ours``.
        """
        array = to_rgb_array(image)
        self._note_sizes([array])
        if self.info is not None:
            return
        if self._chat is not None and self.mode is None:
            self._negotiate(array, str(question))
            return
        if self.mode == "sequence":
            return  # one answer, fixed by the first input
        (raw,) = self._raw([array], [str(question)])
        if isinstance(raw, ChatAnswer):
            if self._chat is not None:
                self._chat.learn(raw)
        elif isinstance(raw, str):
            self._learn(raw)
        elif not isinstance(raw, SequenceScore):
            for answer, _ in raw:  # type: ignore[misc]
                self._learn(answer)

    def clear_cache(self) -> None:
        """Forget every answer received (the next explanation asks again)."""
        self._cache.clear()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> HttpAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    @property
    def preferred_batch_size(self) -> int | None:
        """Inputs an explainer should hand over per call (``ours``, once an image size is
        known): enough for ``concurrency`` requests in flight; None: let it choose."""
        if self.info is None or self._image_bytes is None:
            return None
        if self.batch_size is not None:
            return self.batch_size * self.concurrency
        return self._min_request_items() * self.concurrency

    def _note_sizes(self, arrays: Sequence[NDArray[Any]]) -> None:
        for array in arrays:
            size = array.shape[0] * array.shape[1] * 3 * 4
            self._image_bytes = max(size, self._image_bytes or 0)

    def _min_request_items(self) -> int:
        """The fewest inputs a request carries (when there are that many): each request
        costs the server some milliseconds, so few large ones beat many small ones."""
        if self._image_bytes is None:
            return MIN_REQUEST_ITEMS
        return max(1, min(MIN_REQUEST_ITEMS, _REQUEST_BYTES // self._image_bytes))

    def _max_answer_items(self) -> int:
        """The most inputs whose 'ours' answer (JSON score rows) fills half of the
        response limit at most."""
        row = _SCORE_JSON_BYTES * len(self.answers) + 16
        return max(1, self.limits.max_bytes // 2 // row)

    def _learn(self, answer: str) -> None:
        if answer != OTHER_ANSWER and answer not in self._index:
            self._index[answer] = len(self._vocab)
            self._vocab.append(answer)

    def _raw(self, arrays: list[NDArray[Any]], questions: list[str]) -> list[Answer]:
        """The endpoint's answer for each input, from the cache or by asking."""
        keys = [(_image_key(a), q) for a, q in zip(arrays, questions, strict=True)]
        found: dict[tuple[bytes, str], Answer] = {}
        todo: dict[tuple[bytes, str], Item] = {}
        for key, array, question in zip(keys, arrays, questions, strict=True):
            if self.cache and key in self._cache:
                found[key] = self._cache[key]
            elif key not in todo:
                todo[key] = (array, question)
        if todo:
            answers = self._fetch_all(list(todo.values()))
            for key, raw in zip(todo, answers, strict=True):
                found[key] = raw
                if self.cache:
                    self._remember(key, raw)
        return [found[key] for key in keys]

    def _remember(self, key: tuple[bytes, str], raw: Answer) -> None:
        width = len(self.info.answers) if self.info is not None else 16
        limit = max(1024, _CACHE_BYTES // (8 * width + 100))
        while len(self._cache) >= limit:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = raw

    def _chunks(self, items: list[Item]) -> list[list[Item]]:
        if not isinstance(self._format, OursFormat):
            return [[item] for item in items]
        per = self.batch_size or max(-(-len(items) // self.concurrency),
                                     self._min_request_items())
        per = min(per, self._max_items, self._max_answer_items())
        if self.info is not None and self.info.max_body_bytes:
            largest = max(self._format.item_bytes(image) for image, _ in items)
            per = min(per, max(1, int(self.info.max_body_bytes * _BODY_FILL) // largest))
        return [items[i:i + per] for i in range(0, len(items), per)]

    def _fetch_all(self, items: list[Item]) -> list[Answer]:
        chunks = self._chunks(items)
        abort = threading.Event()
        if len(chunks) == 1:
            return self._fetch_chunk(chunks[0], abort)
        workers = min(self.concurrency, len(chunks))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bbvqa-http") as pool:
            futures = [pool.submit(self._fetch_chunk, chunk, abort) for chunk in chunks]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: stop retrying, cut requests in flight short
                abort.set()
                for future in futures:
                    future.cancel()
                self.close()
                raise
            failed = _first_failure(futures, done)
            if failed is not None:
                abort.set()
                for future in futures:
                    future.cancel()
                raise failed
        return [raw for future in futures for raw in future.result()]

    def _fetch_chunk(self, items: list[Item], abort: threading.Event) -> list[Answer]:
        limit = self._max_items
        if len(items) > limit:
            return [raw for i in range(0, len(items), limit)
                    for raw in self._fetch_chunk(items[i:i + limit], abort)]
        url = self._endpoint(CHAT_PATH if self._chat is not None else ANSWER_PROBS_PATH)
        try:
            return self._ask(self._format, items, abort)
        except TooLargeError as exc:
            if len(items) == 1:
                raise ModelError(f"HTTP endpoint {display_url(url)} refused a single input as "
                                 f"too large (HTTP 413: {exc})") from exc
            with self._lock:
                self._max_items = min(self._max_items, (len(items) + 1) // 2)
            return self._fetch_chunk(items, abort)

    def _ask(self, fmt: WireFormat | ChatFormat | SequenceFormat, items: list[Item],
             abort: threading.Event) -> list[Answer]:
        """Send ``items`` in ``fmt`` (or read the answer from the request cache) and parse
        the answer; a parsed answer is kept in the request cache."""
        url = self._endpoint(CHAT_PATH if self._chat is not None else ANSWER_PROBS_PATH)
        body = fmt.body(items)
        key = None if self.requests is None else self.requests.key(url.path, body[0])
        content = None if key is None or self.requests is None else self.requests.get(key)
        content_type = "application/json"
        if content is None:
            response = self._http.send(url, body, abort)
            content = response.content
            content_type = response.headers.get("content-type", "")
        try:
            parsed = list(fmt.parse(content, content_type, len(items)))
        except WireError as exc:
            raise ModelOutputError(f"HTTP endpoint {display_url(url)} {exc}") from exc
        if key is not None and self.requests is not None:
            self.requests.put(key, content)
        return parsed

    def _ask_one(self, fmt: ChatFormat | SequenceFormat, items: list[Item]) -> list[Answer]:
        try:
            return self._ask(fmt, items, threading.Event())
        except TooLargeError as exc:
            url = display_url(self._endpoint(CHAT_PATH))
            raise ModelError(f"HTTP endpoint {url} refused a single input as too large "
                             f"(HTTP 413: {exc})") from exc

    def _negotiate(self, array: NDArray[Any], question: str) -> None:
        """``openai``: ask about the first input, learning what the server refuses
        (a lower ``top_logprobs`` cap, ``max_tokens``, ``temperature``, ``logprobs``) and
        whether it can score a whole answer; fixes :attr:`mode` and the columns."""
        assert self._chat is not None and isinstance(self._format, ChatFormat)
        fmt = self._format
        items = [(array, question)]
        url = display_url(self._endpoint(CHAT_PATH))
        for _ in range(8):
            try:
                (answer,) = self._ask_one(fmt, items)
                break
            except HttpStatusError as exc:
                adapted = adapt_to_refusal(fmt, exc.status, exc.detail)
                if adapted is None:
                    raise
                fmt, note = adapted
                self.notes.append(note)
        else:  # pragma: no cover - each adaptation changes one setting once
            raise ModelError(f"HTTP endpoint {url} refused every request")
        assert isinstance(answer, ChatAnswer)
        self._format = fmt
        self.server_model = answer.model
        if answer.first is None:
            if self.require_logprobs or self.score == "sequence":
                why = "--require-logprobs" if self.require_logprobs else \
                    "--answer-score sequence"
                raise ModelError(f"HTTP endpoint {url} answered without logprobs, and "
                                 f"{why} was given")
            self.mode = "answer_only"
            self.notes.append("answer-only: maps show answer flips, not probabilities")
        elif self.score != "first-token" and (answer.prompt_logprobs
                                                or self.score == "sequence"):
            self._try_sequence(fmt, answer, items, url)
        else:
            self.mode = "first_token"
            if self.score == "auto":
                self.notes.append("first-token scores: the server offers no whole-answer "
                                  "likelihood (prompt_logprobs)")
        if self.mode == "sequence":
            self._chat.names.append(answer.text)
            self._chat.named[answer.text] = 0
            self._chat.logprobs = True
            return
        self._chat.learn(answer)
        if self.cache:
            self._remember((_image_key(array), question), answer)

    def _try_sequence(self, fmt: ChatFormat, answer: ChatAnswer, items: list[Item],
                      url: str) -> None:
        sequence = SequenceFormat(fmt, answer.raw)
        try:
            (score,) = self._ask_one(sequence, items)
        except (HttpStatusError, ModelOutputError) as exc:
            if self.score == "sequence" or (isinstance(exc, HttpStatusError)
                                            and exc.status not in (400, 404, 422)):
                raise
            self.mode = "first_token"
            self.notes.append("first-token scores: the server refused to score the whole "
                              "answer (prompt_logprobs)")
            return
        assert isinstance(score, SequenceScore)
        if answer.total is not None and abs(score.logprob - answer.total) > _SAME_LOGPROB:
            # The continued message is not the generation: the chat template renders the
            # assistant turn otherwise, or the text is tokenised otherwise than generated.
            problem = (f"the server scores its own answer {score.logprob:.4g} as a given "
                       f"text but {answer.total:.4g} as generated (its chat template or "
                       "tokeniser changes the answer)")
            if self.score == "sequence":
                raise ModelError(f"HTTP endpoint {url}: {problem}")
            self.mode = "first_token"
            self.notes.append(f"first-token scores: {problem}")
            return
        self._format = sequence
        self.mode = "sequence"
        if self.cache:
            self._remember((_image_key(items[0][0]), items[0][1]), score)

    def _endpoint(self, path: str) -> httpx.URL:
        if self.wire_format in ("hf", "answer-only"):
            return self.url
        base = self.url.path.rstrip("/")
        if self.wire_format == "openai" and base.endswith(CHAT_PATH):
            base = base[: -len(CHAT_PATH)]  # the chat URL itself was given
        return self.url.copy_with(path=base + path)

    def _only_model(self) -> str:
        """The one model an ``openai`` server lists, when no ``remote_model`` is given."""
        url = self._endpoint(MODELS_PATH)
        try:
            response = self._http.send(url, None, threading.Event())
            models = parse_model_list(response.content)
        except HttpStatusError as exc:
            if exc.status in (404, 405):
                raise ModelLoadError(f"{exc} (or name the model with --remote-model)") \
                    from exc
            raise ModelLoadError(str(exc)) from exc
        except ModelError as exc:
            raise ModelLoadError(str(exc)) from exc
        except (TooLargeError, WireError) as exc:
            raise ModelLoadError(f"HTTP endpoint {display_url(url)}: {exc} "
                                 "(pass --remote-model)") from exc
        if len(models) != 1:
            listed = ", ".join(models[:10]) + (", ..." if len(models) > 10 else "")
            raise ModelLoadError(
                f"HTTP endpoint {display_url(url)} serves {len(models)} models"
                f"{': ' + listed if models else ''}; choose one with --remote-model")
        return models[0]

    def _fetch_info(self) -> ServerInfo:
        url = self._endpoint(INFO_PATH)
        try:
            response = self._http.send(url, None, threading.Event())
        except HttpStatusError as exc:
            if exc.status in (404, 405) and self.url.path.rstrip("/").endswith("/v1"):
                raise ModelLoadError(
                    f"HTTP endpoint {display_url(url)} answered HTTP {exc.status}; the URL "
                    "ends in /v1, as an OpenAI-compatible server's does: use --http-format "
                    "openai") from exc
            raise ModelLoadError(str(exc)) from exc
        except ModelError as exc:
            raise ModelLoadError(str(exc)) from exc
        except TooLargeError as exc:
            raise ModelLoadError(f"HTTP endpoint {display_url(url)}: HTTP 413 ({exc})") from exc
        try:
            return parse_info(response.content)
        except WireError as exc:
            raise ModelLoadError(f"HTTP endpoint {display_url(url)}: {exc}") from exc

def _sequence_row(score: SequenceScore, width: int) -> NDArray[np.float64]:
    """``[p, 0]``: the answer's probability; ``(other)`` is not scored (a generated
    answer is the model's own even when its whole-text probability is below 1/2)."""
    row = np.zeros(width, dtype=np.float64)
    row[0] = score.probability
    return row


def _hint(wire_format: str) -> str:
    """What a 404/405 answer probably means."""
    base = ", the API's base (ending in /v1)" if wire_format == "openai" else ""
    return f"is the URL right{base}, and does it speak the '{wire_format}' format " \
        "(--http-format)?"


def _first_failure(futures: list[Future[list[Answer]]], done: set[Future[list[Answer]]]) \
        -> BaseException | None:
    """The first real error among finished futures (an abort is a consequence, not a cause)."""
    errors = [f.exception() for f in futures if f in done and f.exception() is not None]
    real = [e for e in errors if not isinstance(e, AbortedError)]
    return (real or errors or [None])[0]

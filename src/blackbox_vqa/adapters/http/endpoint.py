"""HttpAdapter: a model on another machine, reached over HTTP, behind the model protocol.

Inputs go out in batches, several requests in flight at once (bounded), over one
keep-alive client with finite timeouts that retries what is worth retrying
(:mod:`blackbox_vqa.adapters.http.transport`). A 413 answer splits the batch in halves
and goes on. An input already
answered (same pixels, same question) is not sent again. Every response is validated, and
every failure becomes one :class:`~blackbox_vqa.errors.ModelError` naming the endpoint.

Settings are small frozen objects (:mod:`blackbox_vqa.adapters.http.config`):
:class:`~blackbox_vqa.adapters.http.config.Timeouts`,
:class:`~blackbox_vqa.adapters.http.config.Limits`,
:class:`~blackbox_vqa.adapters.http.config.RetryPolicy`,
:class:`~blackbox_vqa.adapters.http.config.Headers` and, for ``openai``,
:class:`~blackbox_vqa.adapters.http.config.ChatOptions`.

Each wire format is one strategy object (:mod:`blackbox_vqa.adapters.http.wires`, looked
up by name in a registry that takes formats of one's own): ``ours`` (what ``bbvqa serve``
speaks), ``hf`` (Hugging Face VQA inference, top-k lists), ``answer-only`` and ``openai``
(chat completions with logprobs, :mod:`blackbox_vqa.adapters.http.openai`). With all but
``ours`` the answer vocabulary is learned from the endpoint's answers
(:meth:`HttpAdapter.prepare`; an ``openai`` adapter also learns it from the first input it
is asked about) plus an ``(other)`` column, and :attr:`HttpAdapter.score_semantics` says
what the scores mean.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_pairs, check_scores
from blackbox_vqa.adapters.http.config import (
    DEFAULT_CONCURRENCY,
    SCORES,
    ChatOptions,
    Headers,
    Limits,
    RetryPolicy,
    Timeouts,
    refuse_chat_options,
)
from blackbox_vqa.adapters.http.formats import (
    OTHER_ANSWER,
    Item,
    OursFormat,
    Raw,
    ServerInfo,
    WireError,
    vocabulary_row,
)
from blackbox_vqa.adapters.http.openai import (
    ChatAnswer,
    ChatFormat,
    ChatVocabulary,
    adapt_to_refusal,
    chat_semantics,
)
from blackbox_vqa.adapters.http.request_cache import RequestCache
from blackbox_vqa.adapters.http.sequence import (
    NextToken,
    PrefixFormat,
    SequenceFormat,
    SequenceScore,
    check_by_token,
    prefix_text,
    sequence_semantics,
)
from blackbox_vqa.adapters.http.transport import (
    AbortedError,
    HttpStatusError,
    RetryingClient,
    TooLargeError,
    display_url,
)
from blackbox_vqa.adapters.http.wires import LearnedFormat, RequestFormat, Wire, resolve_wire
from blackbox_vqa.errors import InputError, ModelError, ModelOutputError
from blackbox_vqa.images import ImageInput, to_rgb_array

__all__ = [
    "DEFAULT_CONCURRENCY",
    "SCORES",
    "HttpAdapter",
]

# A request carries at least this many inputs, or as many as make _REQUEST_BYTES of float32
# pixels if fewer (measured on loopback: a request costs the server a few milliseconds of
# its own, so many small requests cost more than they gain in overlap).
MIN_REQUEST_ITEMS = 32
_REQUEST_BYTES = 4 * 2**20
# ``ModelOptions.extra`` keys (what ``bbvqa explain --http-...`` passes) -> config fields.
_TIMEOUT_KEYS = {"http_timeout": "read", "http_total_timeout": "total"}
_LIMIT_KEYS = {"http_concurrency": "concurrency",
               "http_max_response_bytes": "max_response_bytes"}
_CHAT_KEYS = {"remote_model": "remote_model", "prompt": "prompt", "max_tokens": "max_tokens",
              "top_logprobs": "top_logprobs", "answer_score": "score",
              "require_logprobs": "require_logprobs"}
# The generated tokens' log-probability and the scored ones' differ by more than float
# noise: the answer was generated as other tokens than the server's tokenisation of it.
_RETOKENISED = 1e-3
# An upper estimate of one score's share of an 'ours' JSON answer ("1.2345678901234567e-05, ").
_SCORE_JSON_BYTES = 25
_CACHE_BYTES = 64 * 2**20
_BODY_FILL = 0.9
# What one input's answer is before it becomes a score row (see http_formats.Raw).
Answer = Raw | ChatAnswer | SequenceScore | NextToken
_C = TypeVar("_C", Timeouts, Limits, RetryPolicy, ChatOptions)


def _image_key(image: NDArray[Any]) -> bytes:
    values = image if image.dtype == np.float32 else image.astype(np.float32)
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(values).data)
    return digest.digest()


class HttpAdapter:
    """A model behind an HTTP endpoint.

    Args:
        url: ``http(s)://host:port[/path]``; for ``ours`` the base of ``/v1/...``, for
            ``hf`` and ``answer-only`` the URL to POST to, for ``openai`` the API's base
            (``.../v1``, to which ``/chat/completions`` is added).
        wire_format: a registered format name (``"ours"``, ``"hf"``, ``"answer-only"``,
            ``"openai"``, or one added with
            :func:`~blackbox_vqa.adapters.http.wires.register_wire_format`), or a
            :class:`~blackbox_vqa.adapters.http.wires.Wire` strategy such as
            ``TopKWire(top_k=5)``.
        headers: extra headers (:class:`~blackbox_vqa.adapters.http.config.Headers`,
            ``{"Name": "value"}`` or ``["Name: value"]``), e.g. an API key; never shown in
            messages or outputs.
        timeouts: read, connect and whole-request timeouts
            (:class:`~blackbox_vqa.adapters.http.config.Timeouts`; default: 60, 10, 300 s).
        limits: requests in flight, largest answer, inputs a request
            (:class:`~blackbox_vqa.adapters.http.config.Limits`; default: 4, 64 MiB,
            chosen by the adapter).
        retries: when and how long to retry
            (:class:`~blackbox_vqa.adapters.http.config.RetryPolicy`; default: 3 retries).
        chat: what an ``openai`` endpoint is asked
            (:class:`~blackbox_vqa.adapters.http.config.ChatOptions`); the other formats
            refuse any option set in it.
        answers: a known vocabulary for ``hf``/``answer-only`` (else learned).
        request_cache: a folder keeping every completed chat request's answer, so that a
            rerun sends nothing twice (None: none; the other formats keep none, and
            ignore it).
        cache: do not send an input already answered.
        transport: an ``httpx`` transport (the I/O seam for tests and proxies).
        sleep: called with each retry wait in seconds (default: wait on an event).
        seed: seed of the jitter's random numbers.
        name: display name (default: the URL without credentials or query).

    The settings stay readable as :attr:`wire` (the strategy), :attr:`wire_format` (its
    name), :attr:`timeouts`, :attr:`limits`, :attr:`policy` and :attr:`chat`.
    """

    def __init__(
        self,
        url: str,
        *,
        wire_format: str | Wire = "ours",
        headers: Headers | Mapping[str, str] | Sequence[str] | None = None,
        timeouts: Timeouts | None = None,
        limits: Limits | None = None,
        retries: RetryPolicy | None = None,
        chat: ChatOptions | None = None,
        answers: Sequence[str] | None = None,
        request_cache: str | Path | None = None,
        cache: bool = True,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        self.url = self._parse_url(url)
        self.wire = _wire(wire_format)
        self.wire_format = self.wire.name
        self.timeouts = _config(timeouts, Timeouts, "timeouts")
        self.limits = _config(limits, Limits, "limits")
        self.policy = _config(retries, RetryPolicy, "retries")
        self.chat = _config(chat, ChatOptions, "chat")
        self.wire.check(answers, self.chat)
        self.cache = cache
        self.name = name or display_url(self.url)
        self._lock = threading.Lock()
        self._cache: dict[tuple[bytes, str], Answer] = {}
        self._http = RetryingClient(
            headers=Headers.parse(headers), timeouts=self.timeouts, limits=self.limits,
            policy=self.policy, transport=transport, sleep=sleep, seed=seed,
            tls=self.url.scheme == "https", hint=self.wire.hint(),
        )
        self._request_url = self.wire.endpoint(self.url, self.wire.request_path)
        self._image_bytes: int | None = None
        self._vocab: list[str] = []
        self._index: dict[str, int] = {}
        self.info: ServerInfo | None = None
        self._chat: ChatVocabulary | None = None
        self.notes: list[str] = []
        self.mode: str | None = None  # openai: sequence, first_token or answer_only
        self.server_model: str | None = None
        self.requests = RequestCache(request_cache) if request_cache is not None and \
            self.wire.keeps_requests else None
        self._format: RequestFormat = self.wire.open(self._http, self.url, self.chat)
        self._max_items = 1
        if isinstance(self._format, OursFormat):
            self.info = self._format.info
            self._max_items = self.info.max_batch or 2**31
        elif isinstance(self._format, ChatFormat):
            self._chat = ChatVocabulary()
        elif not isinstance(self._format, LearnedFormat):
            raise InputError(f"wire format {self.wire_format!r} opened a "
                             f"{type(self._format).__name__}, which has no semantics()")
        for answer in answers or ():
            self._learn(answer)

    @property
    def concurrency(self) -> int:
        """Most requests in flight at once (``limits.concurrency``)."""
        return self.limits.concurrency

    @property
    def batch_size(self) -> int | None:
        """Most inputs a request (``limits.batch_size``; None: the adapter chooses)."""
        return self.limits.batch_size

    @property
    def _chat_settings(self) -> ChatFormat:
        fmt = self._format
        return fmt.chat if isinstance(fmt, SequenceFormat) else fmt  # type: ignore[return-value]

    @classmethod
    def from_options(cls, url: str, extra: Mapping[str, Any]) -> HttpAdapter:
        """Build from a model spec's options (a missing or None value keeps the default):
        ``http_format``, ``http_headers``, ``request_cache``; ``http_timeout`` and
        ``http_total_timeout`` (:class:`Timeouts`); ``http_concurrency`` and
        ``http_max_response_bytes`` (:class:`Limits`); ``remote_model``, ``prompt``,
        ``max_tokens``, ``top_logprobs``, ``answer_score`` and ``require_logprobs``
        (:class:`ChatOptions`)."""
        given = {key: value for key, value in extra.items() if value is not None}
        cls._parse_url(url)  # a bad URL is the first thing said, as a bad format next
        wire = _wire(given.get("http_format", "ours"))
        limits, timeouts = _bounds(given)
        chat = {field: given[key] for key, field in _CHAT_KEYS.items() if key in given}
        if not wire.takes_chat:  # named as given, before any value is checked
            refuse_chat_options(chat)
        return cls(url, wire_format=wire, headers=given.get("http_headers"), limits=limits,
                   timeouts=timeouts, chat=ChatOptions(**chat),
                   request_cache=given.get("request_cache"))

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
        if isinstance(self._format, LearnedFormat):
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
            url = display_url(self._request_url)
            raise ModelOutputError(f"HTTP endpoint {url} {exc}") from exc
        return check_scores(np.stack(rows), len(raws), width, source=f"HTTP endpoint {self.name}")

    @property
    def answers_follow_input(self) -> bool:
        """Whether preparing for an input changes the answer list: every format but
        ``ours`` (whose server publishes its list) learns answers from the input."""
        return self.info is None

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
        elif not isinstance(raw, (SequenceScore, NextToken)):
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
        return max(1, self.limits.max_response_bytes // 2 // row)

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
        url = self._request_url
        try:
            return self._ask(self._format, items, abort)
        except TooLargeError as exc:
            if len(items) == 1:
                raise ModelError(f"HTTP endpoint {display_url(url)} refused a single input as "
                                 f"too large (HTTP 413: {exc})") from exc
            with self._lock:
                self._max_items = min(self._max_items, (len(items) + 1) // 2)
            return self._fetch_chunk(items, abort)

    def _ask(self, fmt: RequestFormat, items: list[Item],
             abort: threading.Event) -> list[Answer]:
        """Send ``items`` in ``fmt`` (or read the answer from the request cache) and parse
        the answer; a parsed answer is kept in the request cache."""
        url = self._request_url
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

    def _ask_one(self, fmt: ChatFormat | SequenceFormat | PrefixFormat,
                 items: list[Item]) -> list[Answer]:
        try:
            return self._ask(fmt, items, threading.Event())
        except TooLargeError as exc:
            url = display_url(self._request_url)
            raise ModelError(f"HTTP endpoint {url} refused a single input as too large "
                             f"(HTTP 413: {exc})") from exc

    def _negotiate(self, array: NDArray[Any], question: str) -> None:
        """``openai``: ask about the first input, learning what the server refuses
        (a lower ``top_logprobs`` cap, ``max_tokens``, ``temperature``, ``logprobs``) and
        whether it can score a whole answer; fixes :attr:`mode` and the columns."""
        assert self._chat is not None and isinstance(self._format, ChatFormat)
        fmt = self._format
        items = [(array, question)]
        url = display_url(self._request_url)
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
            if self.chat.require_logprobs or self.chat.score_mode == "sequence":
                why = "--require-logprobs" if self.chat.require_logprobs else \
                    "--answer-score sequence"
                raise ModelError(f"HTTP endpoint {url} answered without logprobs, and "
                                 f"{why} was given")
            self.mode = "answer_only"
            self.notes.append("answer-only: maps show answer flips, not probabilities")
        elif self.chat.score_mode != "first-token" and (
                answer.prompt_logprobs or self.chat.score_mode == "sequence"):
            self._try_sequence(fmt, answer, items, url)
        else:
            self.mode = "first_token"
            if self.chat.score_mode == "auto":
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
            if self.chat.score_mode == "sequence" or (isinstance(exc, HttpStatusError)
                                            and exc.status not in (400, 404, 422)):
                raise
            self.mode = "first_token"
            self.notes.append("first-token scores: the server refused to score the whole "
                              "answer (prompt_logprobs)")
            return
        assert isinstance(score, SequenceScore)
        problem = self._check_by_token(fmt, score, answer.raw, items)
        if problem is not None:
            if self.chat.score_mode == "sequence":
                raise ModelError(f"HTTP endpoint {url}: {problem}")
            self.mode = "first_token"
            self.notes.append(f"first-token scores: {problem}")
            return
        if answer.total is not None and abs(score.logprob - answer.total) > _RETOKENISED:
            self.notes.append(
                f"the answer is scored as the server tokenises it ({len(score.tokens)} "
                f"tokens, log-probability {score.logprob:.4g}); the model generated it as "
                f"other tokens (log-probability {answer.total:.4g})")
        self._format = sequence
        self.mode = "sequence"
        if self.cache:
            self._remember((_image_key(items[0][0]), items[0][1]), score)

    def _check_by_token(self, fmt: ChatFormat, score: SequenceScore, answer: str,
                        items: list[Item]) -> str | None:
        """None when the original input's whole-answer score equals the sum of its tokens'
        log-probabilities asked one position at a time (:class:`PrefixFormat`, each
        prompt's ids checked against the scoring prompt's); else the problem, in words."""
        if score.prompt_ids is None or any(t.token_id is None for t in score.tokens):
            return "the server sent no prompt token ids, so the score cannot be checked"
        found: list[NextToken | None] = []
        for k, token in enumerate(score.tokens):
            assert token.token_id is not None
            want = score.prompt_ids[:token.position]
            # the generation prompt, or an empty continued message, ends before the answer
            prefixes = [None, ""] if k == 0 else [prefix_text(score.tokens, k, answer)]
            hit: NextToken | None = None
            for prefix in prefixes:
                try:
                    (next_token,) = self._ask_one(PrefixFormat(fmt, prefix, token.token_id),
                                                  items)
                except HttpStatusError as exc:
                    if exc.status not in (400, 404, 422):
                        raise
                    return f"the server refused the token-by-token check (HTTP {exc.status})"
                except ModelOutputError:
                    return "the server cannot be asked a token's log-probability by id"
                assert isinstance(next_token, NextToken)
                if next_token.prompt_ids == want:
                    hit = next_token
                    break
            found.append(hit)
            if hit is None:
                break
        return check_by_token(score, found)


def _sequence_row(score: SequenceScore, width: int) -> NDArray[np.float64]:
    """``[p, 0]``: the answer's probability; ``(other)`` is not scored (a generated
    answer is the model's own even when its whole-text probability is below 1/2)."""
    row = np.zeros(width, dtype=np.float64)
    row[0] = score.probability
    return row


def _bounds(given: Mapping[str, Any]) -> tuple[Limits, Timeouts]:
    """:class:`Limits` and :class:`Timeouts` from model options, each value checked as it
    is added, in the order ``bbvqa`` names a bad one (concurrency, read timeout, answer
    size, total time)."""
    limits: dict[str, Any] = {}
    timeouts: dict[str, Any] = {}
    for key in ("http_concurrency", "http_timeout", "http_max_response_bytes",
                "http_total_timeout"):
        if key in _LIMIT_KEYS and key in given:
            limits[_LIMIT_KEYS[key]] = given[key]
            Limits(**limits)
        elif key in given:
            timeouts[_TIMEOUT_KEYS[key]] = given[key]
            Timeouts(**timeouts)
    return Limits(**limits), Timeouts(**timeouts)


def _wire(value: object) -> Wire:
    if not isinstance(value, (str, Wire)):
        raise InputError(f"wire_format must be a format name or a Wire, got {value!r}")
    return resolve_wire(value)


def _config(value: object, kind: type[_C], name: str) -> _C:
    """``value``, or ``kind()`` for None; anything else is refused by name."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise InputError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _first_failure(futures: list[Future[list[Answer]]], done: set[Future[list[Answer]]]) \
        -> BaseException | None:
    """The first real error among finished futures (an abort is a consequence, not a cause)."""
    errors = [f.exception() for f in futures if f in done and f.exception() is not None]
    real = [e for e in errors if not isinstance(e, AbortedError)]
    return (real or errors or [None])[0]

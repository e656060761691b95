"""One strategy object per wire format, and the registry of formats by name.

A :class:`Wire` knows where its requests go (:meth:`Wire.endpoint`), what a 404 answer
probably means (:meth:`Wire.hint`), which adapter options it takes (:meth:`Wire.check`),
and how to open a connection: :meth:`Wire.open` asks the endpoint what it must know first
(``ours``: ``/v1/info``; ``openai``: the model, when none is named) and returns the
*request format*, which builds request bodies and parses answers
(:mod:`blackbox_vqa.adapters.http.formats`, :mod:`blackbox_vqa.adapters.http.openai`).

The adapter scores by the request format it gets: an
:class:`~blackbox_vqa.adapters.http.formats.OursFormat` carries full score rows over the
server's announced answers, a :class:`~blackbox_vqa.adapters.http.openai.ChatFormat` goes
through the chat negotiation, and any other :class:`LearnedFormat` (``hf``,
``answer-only``, and a format registered with :func:`register_wire_format`) answers one
input a request with a top-k list or one answer, from which a vocabulary is learned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import httpx

from blackbox_vqa.adapters.http.config import ChatOptions, positive_int
from blackbox_vqa.adapters.http.formats import (
    AnswerOnlyFormat,
    Item,
    OursFormat,
    Raw,
    ServerInfo,
    TopKFormat,
    WireError,
    parse_info,
)
from blackbox_vqa.adapters.http.openai import CHAT_PATH, MODELS_PATH, ChatFormat, parse_model_list
from blackbox_vqa.adapters.http.transport import (
    HttpStatusError,
    RetryingClient,
    TooLargeError,
    display_url,
)
from blackbox_vqa.errors import InputError, ModelError, ModelLoadError
from blackbox_vqa.wire import ANSWER_PROBS_PATH, INFO_PATH

__all__ = [
    "AnswerOnlyWire",
    "ChatWire",
    "LearnedFormat",
    "OursWire",
    "RequestFormat",
    "TopKWire",
    "Wire",
    "register_wire_format",
    "resolve_wire",
    "unregister_wire_format",
    "wire_formats",
]


@runtime_checkable
class RequestFormat(Protocol):
    """Builds request bodies and parses answers for ``n`` inputs."""

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        """The request body for ``items`` and its content type."""
        ...

    def parse(self, content: bytes, content_type: str, n: int) -> Sequence[Any]:
        """One answer per input; raises
        :class:`~blackbox_vqa.adapters.http.formats.WireError` on a malformed body."""
        ...


@runtime_checkable
class LearnedFormat(RequestFormat, Protocol):
    """A request format answering one input a request with a
    :data:`~blackbox_vqa.adapters.http.formats.Raw` answer (an answer string or a top-k
    tuple of ``(answer, score)`` pairs): the adapter learns its answers."""

    def parse(self, content: bytes, content_type: str, n: int) -> Sequence[Raw]:
        """``[answer]`` for the one input."""
        ...

    def semantics(self) -> dict[str, Any]:
        """``score_semantics``: what the scores mean (``kind``, ``format``, ``maps``,
        ``other_answer``, ``note``...)."""
        ...


class Wire:
    """A wire format's strategy (the base: one POST to the URL as given, one input a
    request, a learned vocabulary; subclasses fill in :meth:`open`).

    Class attributes: ``name`` (what ``--http-format`` says), ``request_path`` (added to
    the URL by :meth:`endpoint` for answers), ``keeps_requests`` (a request cache folder
    applies), ``takes_chat`` (:class:`~blackbox_vqa.adapters.http.config.ChatOptions`
    apply), ``answers_refusal`` (the message when ``answers=`` is given; None: taken).
    """

    name: ClassVar[str] = ""
    request_path: ClassVar[str] = ""
    keeps_requests: ClassVar[bool] = False
    takes_chat: ClassVar[bool] = False
    answers_refusal: ClassVar[str | None] = None
    url_note: ClassVar[str] = ""  # what the URL should be, in a 404's hint

    def endpoint(self, url: httpx.URL, path: str) -> httpx.URL:
        """The URL for ``path`` (:data:`~blackbox_vqa.wire.INFO_PATH`, :attr:`request_path`
        ...) under the adapter's ``url``: the URL itself here."""
        return url

    def hint(self) -> str:
        """What a 404/405 answer probably means."""
        return f"is the URL right{self.url_note}, and does it speak the '{self.name}' " \
            "format (--http-format)?"

    def check(self, answers: Sequence[str] | None, chat: ChatOptions) -> None:
        """Raise :class:`~blackbox_vqa.errors.InputError` for an option this format does
        not take."""
        if not self.takes_chat:
            chat.refuse()
        if answers is not None and self.answers_refusal is not None:
            raise InputError(self.answers_refusal)

    def open(self, http: RetryingClient, url: httpx.URL, chat: ChatOptions) -> RequestFormat:
        """The request format, after asking the endpoint what must be known first."""
        raise NotImplementedError


@dataclass(frozen=True)
class OursWire(Wire):
    """``ours``: ``GET {url}/v1/info``, then batches to ``POST {url}/v1/answer_probs``."""

    name: ClassVar[str] = "ours"
    request_path: ClassVar[str] = ANSWER_PROBS_PATH
    answers_refusal: ClassVar[str | None] = (
        "answers= is only for the hf and answer-only formats; an 'ours' endpoint "
        "announces its answers")

    def endpoint(self, url: httpx.URL, path: str) -> httpx.URL:
        return url.copy_with(path=url.path.rstrip("/") + path)

    def open(self, http: RetryingClient, url: httpx.URL, chat: ChatOptions) -> OursFormat:
        return OursFormat(self._info(http, url))

    def _info(self, http: RetryingClient, base: httpx.URL) -> ServerInfo:
        url = self.endpoint(base, INFO_PATH)
        try:
            response = http.send(url, None, threading.Event())
        except HttpStatusError as exc:
            if exc.status in (404, 405) and base.path.rstrip("/").endswith("/v1"):
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


@dataclass(frozen=True)
class TopKWire(Wire):
    """``hf``: Hugging Face VQA inference, one input a request, answering a top-k list
    (``top_k`` >= 1 asked for)."""

    top_k: int = 10
    name: ClassVar[str] = "hf"

    def __post_init__(self) -> None:
        positive_int(self.top_k, "top_k")

    def open(self, http: RetryingClient, url: httpx.URL, chat: ChatOptions) -> TopKFormat:
        return TopKFormat(self.top_k)


@dataclass(frozen=True)
class AnswerOnlyWire(Wire):
    """``answer-only``: an endpoint answering only the answer text."""

    name: ClassVar[str] = "answer-only"

    def open(self, http: RetryingClient, url: httpx.URL,
             chat: ChatOptions) -> AnswerOnlyFormat:
        return AnswerOnlyFormat()


@dataclass(frozen=True)
class ChatWire(Wire):
    """``openai``: ``POST {url}/chat/completions`` (``url`` is the API's base, ending in
    ``/v1``, or the chat URL itself), one input a request."""

    name: ClassVar[str] = "openai"
    request_path: ClassVar[str] = CHAT_PATH
    keeps_requests: ClassVar[bool] = True
    takes_chat: ClassVar[bool] = True
    answers_refusal: ClassVar[str | None] = (
        "answers= is not for the openai format: its answers are identified by their "
        "first token, learned from the endpoint")
    url_note: ClassVar[str] = ", the API's base (ending in /v1)"

    def endpoint(self, url: httpx.URL, path: str) -> httpx.URL:
        base = url.path.rstrip("/")
        if base.endswith(CHAT_PATH):
            base = base[: -len(CHAT_PATH)]  # the chat URL itself was given
        return url.copy_with(path=base + path)

    def open(self, http: RetryingClient, url: httpx.URL, chat: ChatOptions) -> ChatFormat:
        model = chat.remote_model if chat.remote_model is not None else \
            self._only_model(http, url)
        return ChatFormat(model, chat.prompt_text, chat.token_limit, chat.alternatives,
                          chat.remote_seed)

    def _only_model(self, http: RetryingClient, base: httpx.URL) -> str:
        """The one model the server lists, when no ``remote_model`` is given."""
        url = self.endpoint(base, MODELS_PATH)
        try:
            response = http.send(url, None, threading.Event())
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


_REGISTRY: dict[str, Callable[[], Wire]] = {
    "ours": OursWire, "hf": TopKWire, "answer-only": AnswerOnlyWire, "openai": ChatWire,
}
_BUILT_IN = frozenset(_REGISTRY)


def register_wire_format(name: str, factory: Callable[[], Wire]) -> None:
    """Make ``--http-format NAME`` (and ``HttpAdapter(wire_format=NAME)``) build its
    strategy with ``factory()``; a name already registered is refused."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise InputError(f"a wire format's name must be a non-empty word, got {name!r}")
    if name in _REGISTRY:
        raise InputError(f"wire format {name!r} is registered already")
    _REGISTRY[name] = factory


def unregister_wire_format(name: str) -> None:
    """Forget a format registered with :func:`register_wire_format` (built-ins stay)."""
    if name in _BUILT_IN:
        raise InputError(f"wire format {name!r} is built in")
    _REGISTRY.pop(name, None)


def wire_formats() -> tuple[str, ...]:
    """The registered format names, built-ins first."""
    return tuple(_REGISTRY)


def resolve_wire(value: str | Wire) -> Wire:
    """The strategy for a format name (or ``value`` itself when it is one)."""
    if isinstance(value, Wire):
        return value
    if not isinstance(value, str) or value not in _REGISTRY:
        raise InputError(f"http format (--http-format) must be one of "
                         f"{', '.join(_REGISTRY)}; got {value!r}")
    wire = _REGISTRY[value]()
    if not isinstance(wire, Wire):
        raise InputError(f"wire format {value!r} was registered with a factory that "
                         f"returned {type(wire).__name__}, not a Wire")
    return wire

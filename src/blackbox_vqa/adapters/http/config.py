"""The HTTP adapter's settings, as small frozen objects (as ``httpx`` groups its own as
``Timeout`` and ``Limits``).

- :class:`Timeouts`: how long to wait (read, connect, one whole request).
- :class:`Limits`: how much at once (requests in flight, answer size, inputs a request).
- :class:`RetryPolicy`: how often and how long to retry.
- :class:`Headers`: extra headers (an API key), validated, never shown.
- :class:`ChatOptions`: what the ``openai`` format asks a chat endpoint.

Each object checks its values when it is made and raises
:class:`~blackbox_vqa.errors.InputError` naming the value (and the ``bbvqa`` option that
sets it, where there is one). ``${VAR}`` in a model file's headers is expanded before the
headers get here (:mod:`blackbox_vqa.cli.model_options`), never by these objects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from blackbox_vqa.errors import InputError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PROMPT",
    "DEFAULT_SEED",
    "DEFAULT_TOP_LOGPROBS",
    "DEFAULT_TOTAL_TIMEOUT",
    "SCORES",
    "ChatOptions",
    "Headers",
    "Limits",
    "RetryPolicy",
    "Timeouts",
    "check_chat_options",
    "parse_header",
    "parse_headers",
    "refuse_chat_options",
]

DEFAULT_CONCURRENCY = 4
# 64 MiB holds an 'ours' answer of 64 inputs x 40k answers (<= 25 bytes per score); the
# adapter sends fewer inputs per request when its vocabulary is larger. hf and answer-only
# answers are a few kilobytes.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 2**20
# Five minutes: a full batch on a slow CPU model takes about a minute.
DEFAULT_TOTAL_TIMEOUT = 300.0
DEFAULT_PROMPT = "{question}\nAnswer the question with a single word or number."
DEFAULT_MAX_TOKENS = 8
DEFAULT_TOP_LOGPROBS = 20
DEFAULT_SEED = 0
# How an openai answer is scored (ChatOptions.score).
SCORES = ("auto", "sequence", "first-token")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def positive_int(value: object, name: str, *, low: int = 1) -> int:
    """``value`` when it is an integer ``>= low``, else :class:`InputError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def seconds(value: object, name: str, *, zero: bool = False) -> float:
    """``value`` as a float when it is a finite number of seconds ``> 0`` (``>= 0`` with
    ``zero``), else :class:`InputError` naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        bound = ">= 0" if zero else "> 0"
        raise InputError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Timeouts:
    """How long to wait, in seconds (all finite, ``> 0``).

    Attributes:
        read: read (and write) timeout per request: the longest wait for the next piece
            of an answer (``--http-timeout``, default 60).
        connect: the longest wait to open a connection (default 10).
        total: the longest one request may take, from sending it to the last byte of its
            answer (checked as the answer arrives, so at most one read timeout more);
            passed: an error, not retried (``--http-total-timeout``, default 300).
    """

    read: float = 60.0
    connect: float = 10.0
    total: float = DEFAULT_TOTAL_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "read", seconds(self.read, "http timeout (--http-timeout)"))
        object.__setattr__(self, "connect", seconds(self.connect, "connect timeout"))
        object.__setattr__(self, "total", seconds(
            self.total, "http total timeout (--http-total-timeout)"))


@dataclass(frozen=True)
class Limits:
    """How much at once.

    Attributes:
        concurrency: most requests in flight at once, >= 1 (``--http-concurrency``,
            default 4).
        max_response_bytes: the largest answer body accepted, counted after
            decompression, >= 1; larger: an error, not retried
            (``--http-max-response-mb``, default 64 MiB). For ``ours`` the adapter sends
            few enough inputs per request that an honest answer fits in half of it.
        batch_size: most inputs per request (``ours``; None: a batch shared out over
            ``concurrency`` requests of at least 32 inputs, within the server's announced
            limits).
    """

    concurrency: int = DEFAULT_CONCURRENCY
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    batch_size: int | None = None

    def __post_init__(self) -> None:
        positive_int(self.concurrency, "http concurrency (--http-concurrency)")
        positive_int(self.max_response_bytes, "http max response bytes (--http-max-response-mb)")
        if self.batch_size is not None:
            positive_int(self.batch_size, "batch_size")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``retries`` (>= 0) after the first attempt, on
    connection errors, timeouts, 5xx and 429; waits of
    :func:`~blackbox_vqa.adapters.http.transport.backoff_delay` (``backoff``,
    ``max_backoff`` seconds, >= 0); a ``Retry-After`` over ``max_retry_after`` seconds
    fails at once."""

    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        positive_int(self.retries, "retries", low=0)
        for name in ("backoff", "max_backoff", "max_retry_after"):
            object.__setattr__(self, name, seconds(getattr(self, name), name, zero=True))


def parse_header(text: str, position: int = 1) -> tuple[str, str]:
    """``"Name: value"`` -> ``("Name", "value")``.

    The error never quotes the text: a header usually carries a secret.
    """
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep:
        raise InputError(f"--header #{position} must look like 'Name: value' (no ':' found)")
    if not _HEADER_NAME_RE.match(name):
        raise InputError(f"--header #{position} has an invalid name (use letters, digits, "
                         "'-' and '_' before the ':')")
    if "\r" in value or "\n" in value:
        raise InputError(f"--header #{position} has a line break in its value")
    return name, value


def parse_headers(headers: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Headers given as a mapping or as ``"Name: value"`` strings, validated."""
    if headers is None:
        return {}
    if isinstance(headers, Mapping):
        pairs = [f"{k}: {v}" for k, v in headers.items()]
    elif isinstance(headers, str):
        pairs = [headers]
    else:
        pairs = list(headers)
    out: dict[str, str] = {}
    for i, text in enumerate(pairs, start=1):
        if not isinstance(text, str):
            raise InputError(f"--header #{i} must be a string 'Name: value'")
        name, value = parse_header(text, i)
        out[name] = value
    return out


@dataclass(frozen=True, repr=False)
class Headers:
    """Extra headers sent with every request (an API key...): ``(name, value)`` pairs,
    validated as ``--header`` values are. Their values never appear in a message, an
    output or this object's ``repr``.

    Build from ``{"Name": "value"}`` or ``["Name: value"]`` with :meth:`parse`.
    """

    pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        pairs = tuple(self.pairs)
        for i, pair in enumerate(pairs, start=1):
            if not (isinstance(pair, tuple) and len(pair) == 2
                    and all(isinstance(p, str) for p in pair)):
                raise InputError(f"--header #{i} must be a string 'Name: value'")
            if parse_header(f"{pair[0]}: {pair[1]}", i) != pair:
                raise InputError(f"--header #{i} has white space around its name or value")
        object.__setattr__(self, "pairs", pairs)

    @classmethod
    def parse(cls, headers: Headers | Mapping[str, str] | Sequence[str] | None) -> Headers:
        """Headers from a mapping, ``"Name: value"`` strings or None (none)."""
        if isinstance(headers, Headers):
            return headers
        return cls(tuple(parse_headers(headers).items()))

    def as_dict(self) -> dict[str, str]:
        """``{name: value}`` (a later pair with the same name wins)."""
        return dict(self.pairs)

    def __repr__(self) -> str:
        return f"Headers({', '.join(f'{name}: ***' for name, _ in self.pairs)})"


def check_chat_options(prompt: str, max_tokens: int, top_logprobs: int,
                       seed: int | None) -> None:
    """Raise :class:`InputError` naming the option when one is out of range."""
    if not isinstance(prompt, str) or "{question}" not in prompt:
        raise InputError("prompt (--prompt) must contain the placeholder {question}, "
                         f"got {prompt!r}")
    for value, name, low in ((max_tokens, "max tokens (--max-tokens)", 1),
                             (top_logprobs, "top_logprobs", 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"remote seed must be an integer or None, got {seed!r}")


# ChatOptions field -> its bbvqa option (for "only for --http-format openai").
CHAT_FLAGS = {"remote_model": "--remote-model", "prompt": "--prompt",
              "max_tokens": "--max-tokens", "top_logprobs": "--top-logprobs",
              "score": "--answer-score", "require_logprobs": "--require-logprobs"}


@dataclass(frozen=True)
class ChatOptions:
    """What the ``openai`` format asks a chat endpoint; None: the format's default (a
    format other than ``openai`` refuses every option that is not None or False).

    Attributes:
        remote_model: the request's ``model`` (``--remote-model``; default: the only
            model the server lists at ``GET {url}/models``).
        prompt: the text sent with the image, containing ``{question}``, which is
            replaced by the question (``--prompt``; default :data:`DEFAULT_PROMPT`).
        max_tokens: most tokens generated, >= 1 (``--max-tokens``; default 8).
        top_logprobs: alternatives asked for at each position, >= 0 (``--top-logprobs``;
            default 20, OpenAI's maximum; a server may allow more).
        remote_seed: the request's ``seed`` (None: none sent; default 0).
        score: ``"auto"`` (whole-answer likelihood where the server offers it, else first
            token), ``"sequence"`` (an error where it does not) or ``"first-token"``
            (``--answer-score``; default auto).
        require_logprobs: a server answering without logprobs is an error instead of
            answer-only flip maps (``--require-logprobs``).
    """

    remote_model: str | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    top_logprobs: int | None = None
    remote_seed: int | None = DEFAULT_SEED
    score: str | None = None
    require_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.score is not None and self.score not in SCORES:
            raise InputError(f"answer score (--answer-score) must be one of "
                             f"{', '.join(SCORES)}; got {self.score!r}")
        check_chat_options(self.prompt_text, self.token_limit, self.alternatives,
                           self.remote_seed)
        if self.remote_model is not None and (not isinstance(self.remote_model, str)
                                              or not self.remote_model.strip()):
            raise InputError(f"remote model (--remote-model) must be a model name, "
                             f"got {self.remote_model!r}")
        object.__setattr__(self, "require_logprobs", bool(self.require_logprobs))

    @property
    def prompt_text(self) -> str:
        """The prompt template (the default when none is given)."""
        return DEFAULT_PROMPT if self.prompt is None else self.prompt

    @property
    def token_limit(self) -> int:
        """Most tokens generated (the default when none is given)."""
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def alternatives(self) -> int:
        """``top_logprobs`` asked for (the default when none is given)."""
        return DEFAULT_TOP_LOGPROBS if self.top_logprobs is None else self.top_logprobs

    @property
    def score_mode(self) -> str:
        """One of :data:`SCORES` (``"auto"`` when none is given)."""
        return "auto" if self.score is None else self.score

    def refuse(self) -> None:
        """Raise :class:`InputError` naming the first option set (not None, not False;
        ``remote_seed`` does not count), for a format that takes none."""
        refuse_chat_options({name: getattr(self, name) for name in CHAT_FLAGS})


def refuse_chat_options(options: Mapping[str, object]) -> None:
    """Raise :class:`InputError` naming the first :class:`ChatOptions` field set in
    ``options`` (a value that is not None or False), as a format other than ``openai``
    does."""
    for name, flag in CHAT_FLAGS.items():
        value = options.get(name)
        if value is not None and value is not False:
            raise InputError(f"{name} ({flag}) is only for --http-format openai")

"""Reliable HTTP for the HTTP adapter: retries with backoff, and one-line error messages.

:class:`RetryingClient` sends one request at a time per caller over a shared keep-alive
``httpx`` client with finite timeouts. Connection errors, timeouts, 5xx and 429 answers are
retried with exponential backoff and jitter (a ``Retry-After`` is honoured, and on a 429
without one, the ``x-ratelimit-reset-*`` headers); other 4xx answers are not. An answer
saying a rate-limit bucket is empty holds every request back until it refills. Every
failure becomes one :class:`~blackbox_vqa.errors.ModelError` naming the URL
(without credentials or query) and what went wrong.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from blackbox_vqa.adapters.http_formats import WireError, load_json
from blackbox_vqa.adapters.http_ratelimit import rate_limit_wait
from blackbox_vqa.errors import InputError, ModelError

__all__ = [
    "AbortedError",
    "RetryPolicy",
    "RetryingClient",
    "TooLargeError",
    "backoff_delay",
    "display_url",
    "error_message",
    "parse_header",
    "parse_headers",
    "parse_retry_after",
]

_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_MESSAGE_CHARS = 200


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


def display_url(url: httpx.URL) -> str:
    """The URL without user name, password, query or fragment (they may hold secrets)."""
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    path = url.path.rstrip("/")
    return f"{url.scheme}://{host}{port}{path}"


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): ``min(cap, base * 2**(attempt-1))``
    times a random factor in ``[0.5, 1)`` (jitter, so clients do not retry in step)."""
    return min(cap, base * 2.0 ** (attempt - 1)) * (0.5 + 0.5 * rng.random())


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP date), else None."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def error_message(response: httpx.Response) -> str:
    """The server's own words about an error: ``error.message``, ``error``, ``detail``..."""
    text = ""
    try:
        data = load_json(response.content)
    except WireError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            inner = inner.get("message")
        found = inner or data.get("detail") or data.get("message")
        if found:
            text = str(found)
    if not text:
        text = response.content[:_MESSAGE_CHARS].decode("utf-8", errors="replace")
    text = " ".join(text.split())[:_MESSAGE_CHARS]
    return text or response.reason_phrase or "no details"


class TooLargeError(Exception):
    """The endpoint answered 413."""


class AbortedError(Exception):
    """Another request of the same call failed; this one stopped retrying."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``retries`` after the first attempt, waits of
    :func:`backoff_delay` (``backoff``, ``max_backoff`` seconds), and a ``Retry-After`` over
    ``max_retry_after`` seconds fails at once."""

    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 60.0


class RetryingClient:
    """A keep-alive ``httpx`` client that retries what is worth retrying.

    Args:
        headers: sent with every request (never shown in messages).
        timeout, connect_timeout: read/write and connect timeouts, seconds.
        connections: most connections open at once (one per request in flight).
        policy: the retry policy.
        hint: what a 404/405 answer probably means (shown in its message).
        transport: an ``httpx`` transport (the I/O seam).
        sleep: called with each retry wait (default: wait on the abort event).
        seed: seed of the jitter.
    """

    def __init__(
        self,
        *,
        headers: Mapping[str, str],
        timeout: float,
        connect_timeout: float,
        connections: int,
        policy: RetryPolicy,
        hint: str,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
        tls: bool = True,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.policy = policy
        self.hint = hint
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._not_before = 0.0  # time.monotonic() before which no request goes out
        self._client = httpx.Client(
            headers={"User-Agent": "blackbox-vqa", **headers},
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections),
            transport=transport,
            follow_redirects=False,
            # Loading the CA bundle costs ~20 ms per client; plain http:// needs none.
            verify=tls,
        )
        self._finalizer = weakref.finalize(self, self._client.close)

    def close(self) -> None:
        """Close the connections."""
        self._finalizer()

    def send(self, url: httpx.URL, body: tuple[bytes, str] | None,
             abort: threading.Event) -> httpx.Response:
        """GET (``body`` None) or POST ``(content, content type)`` with retries.

        Returns a response below 300; raises :class:`TooLargeError` for a 413,
        :class:`AbortedError` when ``abort`` is set while waiting to retry, and
        :class:`ModelError` for everything else that failed.
        """
        where = f"HTTP endpoint {display_url(url)}"
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            self._hold(abort)
            try:
                if body is None:
                    response = self._client.get(url)
                else:
                    response = self._client.post(
                        url, content=body[0], headers={"Content-Type": body[1]})
            except httpx.TimeoutException as exc:
                problem = self._timeout_problem(exc)
            except httpx.TransportError as exc:
                problem = _transport_problem(exc)
            else:
                status = response.status_code
                if status < 300:
                    self._note_limits(response.headers)
                    return response
                if status == 413:
                    raise TooLargeError(error_message(response))
                if status != 429 and status < 500:
                    raise ModelError(f"{where} {_refusal(response, self.hint)}")
                problem = f"answered HTTP {status} ({error_message(response)})"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                if retry_after is None and status == 429:
                    retry_after = rate_limit_wait(response.headers, refused=True)
            if attempt > self.policy.retries:
                tries = "attempt" if attempt == 1 else "attempts"
                raise ModelError(f"{where} {problem}; gave up after {attempt} {tries}")
            if retry_after is not None and retry_after > self.policy.max_retry_after:
                raise ModelError(f"{where} {problem} and asked to retry after "
                                 f"{retry_after:g} s (more than {self.policy.max_retry_after:g} s)")
            if retry_after is None:
                with self._lock:
                    retry_after = backoff_delay(attempt, self.policy.backoff,
                                                self.policy.max_backoff, self._rng)
            if self._sleep is not None:
                self._sleep(retry_after)
            elif abort.wait(retry_after):
                raise AbortedError()
            if abort.is_set():
                raise AbortedError()

    def _note_limits(self, headers: httpx.Headers) -> None:
        """An answer saying a rate-limit bucket is empty holds later requests back."""
        wait = rate_limit_wait(headers, refused=False)
        if wait:
            wait = min(wait, self.policy.max_retry_after)
            with self._lock:
                self._not_before = max(self._not_before, time.monotonic() + wait)

    def _hold(self, abort: threading.Event) -> None:
        with self._lock:
            wait = self._not_before - time.monotonic()
        if wait <= 0:
            return
        if self._sleep is not None:
            self._sleep(wait)
        elif abort.wait(wait):
            raise AbortedError()

    def _timeout_problem(self, exc: httpx.TimeoutException) -> str:
        if isinstance(exc, httpx.ConnectTimeout):
            return f"could not be connected to within {self.connect_timeout:g} s"
        if isinstance(exc, httpx.WriteTimeout):
            return f"did not take the request within the {self.timeout:g} s timeout"
        if isinstance(exc, httpx.PoolTimeout):
            return f"had no free connection within {self.timeout:g} s"
        return f"sent no answer within the {self.timeout:g} s read timeout (--http-timeout)"


def _transport_problem(exc: httpx.TransportError) -> str:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot be connected to ({detail})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"closed the connection without a complete answer ({detail})"
    return f"failed in transit: {type(exc).__name__} ({detail})"


def _refusal(response: httpx.Response, hint: str) -> str:
    status = response.status_code
    message = error_message(response)
    if 300 <= status < 400:
        location = response.headers.get("location", "?")
        return f"answered with a redirect (HTTP {status} to {location}); use that URL"
    if status in (401, 403):
        return (f"refused the request: HTTP {status} ({message}); an API key or token is "
                "missing or wrong (pass one with --header 'Authorization: Bearer ...')")
    if status in (404, 405):
        return f"answered HTTP {status} ({message}); {hint}"
    return f"refused the request: HTTP {status} ({message})"

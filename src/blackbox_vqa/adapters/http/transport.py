"""Reliable HTTP for the HTTP adapter: retries with backoff, and one-line error messages.

:class:`RetryingClient` sends one request at a time per caller over a shared keep-alive
``httpx`` client with finite timeouts. Connection errors, timeouts, 5xx and 429 answers are
retried with exponential backoff and jitter (a ``Retry-After`` is honoured, and on a 429
without one, the ``x-ratelimit-reset-*`` headers); other 4xx answers are not. An answer
saying a rate-limit bucket is empty holds every request back until it refills. Every
failure becomes one :class:`~blackbox_vqa.errors.ModelError` naming the URL
(without credentials or query) and what went wrong.

Every answer is read as a stream under two bounds (:class:`ResponseLimits`): its size
*after decompression* and the total time of the exchange. ``gzip`` and ``deflate`` bodies
are inflated here, never more than the bytes still allowed; other content encodings are
refused. A body over the size or past the time is not retried: the endpoint misbehaves.
Text from the endpoint that reaches a message passes :func:`~blackbox_vqa.text.terminal_safe`.
"""

from __future__ import annotations

import math
import random
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from blackbox_vqa.adapters.http.config import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_TOTAL_TIMEOUT,
    Headers,
    Limits,
    RetryPolicy,
    Timeouts,
    parse_header,
    parse_headers,
)
from blackbox_vqa.adapters.http.formats import WireError, load_json
from blackbox_vqa.adapters.http.ratelimit import rate_limit_wait
from blackbox_vqa.errors import ModelError
from blackbox_vqa.text import terminal_safe

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_TOTAL_TIMEOUT",
    "AbortedError",
    "HttpStatusError",
    "ResponseBoundError",
    "ResponseLimits",
    "RetryPolicy",
    "RetryingClient",
    "TooLargeError",
    "backoff_delay",
    "display_url",
    "error_message",
    "parse_header",
    "parse_headers",
    "parse_retry_after",
    "read_bounded",
    "redact",
]

_ACCEPT_ENCODING = "gzip, deflate"
_MESSAGE_CHARS = 200


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
    text = terminal_safe(" ".join(text.split())[:_MESSAGE_CHARS])
    return text or terminal_safe(response.reason_phrase) or "no details"


class HttpStatusError(ModelError):
    """The endpoint refused a request with a 4xx status that is not worth retrying;
    ``status`` is the code and ``detail`` the server's own words (secrets redacted)."""

    def __init__(self, message: str, *, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret (and every word of one, as ``Bearer KEY`` is echoed as
    ``KEY``) replaced by ``***``."""
    words = {w for secret in secrets for w in (secret, *secret.split()) if len(w) >= 4}
    for word in sorted(words, key=len, reverse=True):
        text = text.replace(word, "***")
    return text


class TooLargeError(Exception):
    """The endpoint answered 413."""


class AbortedError(Exception):
    """Another request of the same call failed; this one stopped retrying."""


class ResponseBoundError(Exception):
    """An answer passed the size or time bound (the message says which)."""


@dataclass(frozen=True)
class ResponseLimits:
    """Bounds on one answer: ``max_bytes`` of body after decompression, and ``total``
    seconds from sending the request to the last byte of the answer.

    The total time is checked as each piece of the body arrives, so an endpoint that
    sends nothing at all is cut by the read timeout instead: an exchange lasts at most
    ``total`` plus one read timeout.
    """

    max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    total: float = DEFAULT_TOTAL_TIMEOUT


class _Inflater:
    """Decodes a ``gzip``/``deflate`` body piece by piece, never past a byte budget."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        # gzip: a gzip header; deflate: a zlib stream, or raw deflate as some servers send.
        wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._inflate = zlib.decompressobj(wbits)
        self._first = encoding == "deflate"

    def feed(self, data: bytes, room: int) -> bytes:
        """Up to ``room + 1`` decoded bytes of ``data`` (more than ``room``: over budget)."""
        try:
            return self._inflate.decompress(data, room + 1)
        except zlib.error:
            if not self._first:
                raise
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._inflate.decompress(data, room + 1)
        finally:
            self._first = False

    def finish(self) -> bytes:
        """What is left once every piece was fed (little: :meth:`feed` stops short only
        when over budget)."""
        return self._inflate.flush()


def _decoder(headers: httpx.Headers) -> _Inflater | None:
    codings = [c.strip().lower() for c in headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return _Inflater(codings[0])
    raise ResponseBoundError(
        f"answered with Content-Encoding {terminal_safe(', '.join(codings))!r}, which this "
        f"client does not decode (it asks for {_ACCEPT_ENCODING})")


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def read_bounded(response: httpx.Response, limits: ResponseLimits, deadline: float) -> bytes:
    """The decoded body of a streamed ``response``, within ``limits``.

    Raises :class:`ResponseBoundError` when the body (after decompression) passes
    ``limits.max_bytes`` or the clock passes ``deadline`` (``time.monotonic()``), and
    ``zlib.error`` for a corrupt compressed body.
    """
    too_large = (f"answered with more than {_mib(limits.max_bytes)} of body (after "
                 "decompression), the limit (--http-max-response-mb)")
    declared = response.headers.get("content-length", "")
    decoder = _decoder(response.headers)
    if decoder is None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise ResponseBoundError(too_large)
    pieces: list[bytes] = []
    size = 0
    for raw in response.iter_raw():
        room = limits.max_bytes - size
        piece = raw if decoder is None else decoder.feed(raw, room)
        size += len(piece)
        if size > limits.max_bytes:
            raise ResponseBoundError(too_large)
        pieces.append(piece)
        if time.monotonic() > deadline:
            raise ResponseBoundError(
                f"did not finish its answer within the {limits.total:g} s total time "
                "per request (--http-total-timeout)")
    if decoder is not None:
        tail = decoder.finish()
        size += len(tail)
        if size > limits.max_bytes:
            raise ResponseBoundError(too_large)
        pieces.append(tail)
    return b"".join(pieces)


class RetryingClient:
    """A keep-alive ``httpx`` client that retries what is worth retrying.

    Args:
        headers: sent with every request (never shown in messages).
        timeouts: read/write, connect and whole-request timeouts.
        limits: connections open at once (``concurrency``: one per request in flight) and
            the largest answer body.
        policy: the retry policy.
        hint: what a 404/405 answer probably means (shown in its message).
        transport: an ``httpx`` transport (the I/O seam).
        sleep: called with each retry wait (default: wait on the abort event).
        seed: seed of the jitter.
        tls: load the CA bundle (https).
    """

    def __init__(
        self,
        *,
        headers: Headers,
        timeouts: Timeouts,
        limits: Limits,
        policy: RetryPolicy,
        hint: str,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
        tls: bool = True,
    ) -> None:
        self.timeout = timeouts.read
        self.connect_timeout = timeouts.connect
        self.policy = policy
        self.limits = ResponseLimits(max_bytes=limits.max_response_bytes, total=timeouts.total)
        self.hint = hint
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._not_before = 0.0  # time.monotonic() before which no request goes out
        connections = limits.concurrency
        self._client = httpx.Client(
            headers={"User-Agent": "blackbox-vqa", "Accept-Encoding": _ACCEPT_ENCODING,
                     **headers.as_dict()},
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections),
            transport=transport,
            follow_redirects=False,
            # Loading the CA bundle costs ~20 ms per client; plain http:// needs none.
            verify=tls,
        )
        self._finalizer = weakref.finalize(self, self._client.close)
        self._secrets = [value for _, value in headers.pairs if value]

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
                response = self._exchange(url, body)
            except httpx.TimeoutException as exc:
                problem = self._timeout_problem(exc)
            except httpx.TransportError as exc:
                problem = _transport_problem(exc)
            except ResponseBoundError as exc:
                raise ModelError(f"{where} {exc}") from exc
            except zlib.error as exc:
                raise ModelError(f"{where} answered with a corrupt compressed body "
                                 f"({exc})") from exc
            else:
                status = response.status_code
                if status < 300:
                    self._note_limits(response.headers)
                    return response
                if status == 413:
                    raise TooLargeError(error_message(response))
                if status != 429 and status < 500:
                    detail = redact(error_message(response), self._url_secrets(url))
                    raise HttpStatusError(
                        f"{where} {_refusal(response, self.hint, detail)}",
                        status=status, detail=detail)
                problem = f"answered HTTP {status} " \
                    f"({redact(error_message(response), self._url_secrets(url))})"
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

    def _url_secrets(self, url: httpx.URL) -> list[str]:
        """The header values, and the URL's password and query values: what a server's
        error message must never repeat."""
        found = [*self._secrets, *(v for _, v in url.params.multi_items())]
        return [*found, url.password] if url.password else found

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

    def _exchange(self, url: httpx.URL, body: tuple[bytes, str] | None) -> httpx.Response:
        """One request; the answer read within :attr:`limits` and returned whole (decoded)."""
        deadline = time.monotonic() + self.limits.total
        timeout = httpx.Timeout(min(self.timeout, self.limits.total),
                                connect=min(self.connect_timeout, self.limits.total))
        if body is None:
            request = self._client.build_request("GET", url, timeout=timeout)
        else:
            request = self._client.build_request(
                "POST", url, content=body[0], headers={"Content-Type": body[1]},
                timeout=timeout)
        response = self._client.send(request, stream=True)
        try:
            content = read_bounded(response, self.limits, deadline)
        finally:
            response.close()
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(response.status_code, headers=headers, content=content,
                              request=request, extensions=response.extensions)

    def _timeout_problem(self, exc: httpx.TimeoutException) -> str:
        if isinstance(exc, httpx.ConnectTimeout):
            return f"could not be connected to within {self.connect_timeout:g} s"
        if isinstance(exc, httpx.WriteTimeout):
            return f"did not take the request within the {self.timeout:g} s timeout"
        if isinstance(exc, httpx.PoolTimeout):
            return f"had no free connection within {self.timeout:g} s"
        return f"sent no answer within the {self.timeout:g} s read timeout (--http-timeout)"


def _transport_problem(exc: httpx.TransportError) -> str:
    detail = terminal_safe(" ".join(str(exc).split())) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot be connected to ({detail})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"closed the connection without a complete answer ({detail})"
    return f"failed in transit: {type(exc).__name__} ({detail})"


def _refusal(response: httpx.Response, hint: str, message: str) -> str:
    status = response.status_code
    if 300 <= status < 400:
        location = terminal_safe(response.headers.get("location", "?"))
        return f"answered with a redirect (HTTP {status} to {location}); use that URL"
    if status in (401, 403):
        # ``message`` was redacted: a server may echo the key it refused.
        return (f"refused the request: HTTP {status} ({message}); an API key or token is "
                "missing or wrong (pass one with --header 'Authorization: Bearer ...')")
    if status in (404, 405):
        return f"answered HTTP {status} ({message}); {hint}"
    return f"refused the request: HTTP {status} ({message})"

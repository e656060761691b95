"""Slow and excess clients of ``bbvqa serve``: a read deadline, a connection cap, and
rate-limited log lines.

uvicorn bounds only the idle time between keep-alive requests. :class:`GuardedH11Protocol`
adds, per connection, a deadline for reading each whole request (headers and body, from its
first byte or from the end of the previous answer): a client that has not sent it by then is
disconnected (slowloris). Connections over the cap are closed at once, before any byte is
read, so that slow clients cannot hold every file descriptor. :class:`RateLimitFilter` keeps
at most one log line per message kind every ``interval`` seconds (asyncio logs every failed
``accept`` when descriptors run out).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT",
    "GuardedH11Protocol",
    "RateLimitFilter",
    "connection_cap",
    "guarded_protocol",
]

DEFAULT_READ_TIMEOUT = 30.0  # seconds to send one whole request
DEFAULT_MAX_CONNECTIONS = 64
_SPARE_DESCRIPTORS = 32  # kept free for the model, logs and the listening socket


def connection_cap(wanted: int) -> int:
    """``wanted``, lowered so the cap stays under the process's descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _SPARE_DESCRIPTORS))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a per-request read deadline and a connection cap (set by
    :func:`guarded_protocol`)."""

    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            transport.abort()  # over the cap: the descriptor is freed now
            return
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._disarm()  # the whole request is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if getattr(self, "transport", None) is not None:
            super().connection_lost(exc)


def guarded_protocol(*, read_timeout: float, max_connections: int) -> type[H11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these bounds (uvicorn's ``http=``)."""
    return type("BoundedH11Protocol", (GuardedH11Protocol,),
                {"read_timeout": float(read_timeout), "max_connections": int(max_connections)})


class RateLimitFilter(logging.Filter):
    """Let through at most one record per (logger, message template) every ``interval``
    seconds; the next one let through says how many were dropped."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, Any], float] = {}
        self._dropped: dict[tuple[str, Any], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} like it dropped)"
        return True

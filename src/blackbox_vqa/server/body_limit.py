"""ASGI middleware that answers 413 to request bodies over a size limit.

A ``Content-Length`` over the limit is refused before the app runs (the body is read and
dropped first, up to a cap, so the client gets the answer instead of a reset connection);
a body without a length is counted as it streams in.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

__all__ = ["BodyLimitMiddleware", "BodyTooLargeError", "error_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DRAIN_FACTOR = 16


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (an HTTP 413).

    An ``HTTPException``, so FastAPI passes it through its body parsing to the app's
    exception handlers instead of turning it into a 400.
    """

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


def error_json(status: int, code: str, message: str) -> bytes:
    """The protocol's error body ``{"error": {"status", "code", "message"}}`` as bytes."""
    body = {"error": {"status": status, "code": code, "message": message}}
    return json.dumps(body).encode("utf-8")


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with ``413`` and a JSON error body."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: int | None) -> str:
        got = f"{size} bytes" if size is not None else "more"
        return f"request body is {got}; the limit is {self.max_bytes} bytes"

    async def _refuse(self, send: Send, size: int | None) -> None:
        body = error_json(413, "body_too_large", self._message(size))
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            if length <= self.max_bytes * _DRAIN_FACTOR:
                await _drain(receive)
            await self._refuse(send, length)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self._message(None))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await self._refuse(send, None)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return

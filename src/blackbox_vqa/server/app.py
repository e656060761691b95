"""The FastAPI app that puts any object with the model protocol behind the wire protocol.

Endpoints (docs/protocol.md has the full protocol): ``GET /v1/health``, ``GET /v1/info``
and ``POST /v1/answer_probs``; the OpenAPI schema at ``/openapi.json``, its browsable
form at ``/docs``. Every 4xx/5xx answer has the body
``{"error": {"status", "code", "message"}}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from blackbox_vqa.adapters.base import check_model, check_scores, model_name
from blackbox_vqa.adapters.capabilities import answers_follow_input
from blackbox_vqa.errors import (
    BlackboxVQAError,
    ImageError,
    InputError,
    ModelOutputError,
    NotSupportedError,
)
from blackbox_vqa.server.body_limit import BodyLimitMiddleware, error_json
from blackbox_vqa.server.schemas import (
    AnswerProbsRequest,
    AnswerProbsResponse,
    BinaryHeader,
    Capabilities,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    Limits,
)
from blackbox_vqa.wire import (
    ANSWER_PROBS_PATH,
    BINARY_CONTENT_TYPE,
    HEALTH_PATH,
    IMAGE_ENCODINGS,
    INFO_PATH,
    NPY_DTYPES,
    PROTOCOL,
    REQUEST_FORMATS,
    BatchFormatError,
    ImageTooLargeError,
    answers_digest,
    decode_image,
    decode_image_file,
    split_binary_batch,
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "ApiError",
    "create_app",
]

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_REQUEST_PIXELS = 64 * 2**20  # decoded pixels per request: 192 MiB as RGB uint8

_LOG = logging.getLogger("blackbox_vqa.server")
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    415: "unsupported_media_type",
    413: "body_too_large",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 413, 415, 422, 500)
}


class ApiError(Exception):
    """An HTTP error answer: ``status``, a stable ``code`` and a one-line ``message``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _error_response(status: int, code: str, message: str,
                    headers: dict[str, str] | None = None) -> Response:
    return Response(error_json(status, code, message), status_code=status,
                    media_type="application/json", headers=headers)


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _validation_message(exc: RequestValidationError) -> str:
    return _errors_message(exc.errors())


def _errors_message(errors: Sequence[Any], *, most: int = 3) -> str:
    """Up to ``most`` validation errors as ``loc: msg``, sorted by location (pydantic's own
    order differs between its versions), then ``(and N more)``."""
    if not errors:
        return "invalid request"
    parts = sorted(
        (".".join(str(p) for p in error.get("loc", ())), str(error.get("msg", "invalid")))
        for error in errors
    )
    shown = "; ".join(f"{where}: {msg}" if where else msg for where, msg in parts[:most])
    more = f" (and {len(parts) - most} more)" if len(parts) > most else ""
    return shown + more


def _digest_token(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _auth_dependency(token: str | None) -> Any:
    """A dependency that requires ``Authorization: Bearer <token>`` (none when no token)."""
    if token is None:
        return None
    expected = _digest_token(token)
    bearer = HTTPBearer(auto_error=False, description="The token given to `bbvqa serve`.")

    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(401, "unauthorized",
                           "missing bearer token (send 'Authorization: Bearer <token>')",
                           challenge)
        if not hmac.compare_digest(_digest_token(credentials.credentials), expected):
            raise ApiError(401, "unauthorized", "wrong bearer token", challenge)

    return Depends(require_token)


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def _request_body_doc() -> dict[str, Any]:
    """OpenAPI ``requestBody`` of ``/v1/answer_probs``: JSON, or a binary batch."""
    json_schema = AnswerProbsRequest.model_json_schema()
    return {"requestBody": {
        "required": True,
        "description": "Either JSON with base64 images, or a binary batch "
        f"({BINARY_CONTENT_TYPE}): one line of JSON "
        '{"items": [{"question": ..., "image_bytes": N}, ...]}, a newline, then the '
        "image files back to back, each image_bytes long.",
        "content": {
            "application/json": {"schema": _inline_refs(json_schema,
                                                        json_schema.get("$defs", {}))},
            BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }}


def _pydantic_message(exc: ValidationError) -> str:
    return _errors_message(exc.errors())


class _ModelRunner:
    """Parses a request, decodes its images and runs the model, one batch at a time."""

    def __init__(self, model: Any, name: str, limits: Limits, max_request_pixels: int) -> None:
        self.model = model
        self.max_request_pixels = max_request_pixels
        self.name = name
        self.limits = limits
        self.answers: Sequence[str] = list(model.answers)
        self.digest = answers_digest(self.answers)
        self._lock = threading.Lock()

    def _decode(self, files: Sequence[str | memoryview]) -> list[Any]:
        """Decode one image after the other; each may hold at most what is left of the
        request's pixel budget (checked on its header, before it is decoded)."""
        images = []
        left = self.max_request_pixels
        for i, data in enumerate(files):
            name = f"items[{i}].image"
            most = min(self.limits.max_pixels, left)
            try:
                if isinstance(data, str):
                    image = decode_image(data, max_pixels=most, name=name)
                else:
                    image = decode_image_file(data, max_pixels=most, name=name)
            except ImageTooLargeError as exc:
                if most < self.limits.max_pixels:
                    raise ApiError(413, "request_too_large",
                                   f"{name} would take the request over its budget of "
                                   f"{self.max_request_pixels} decoded pixels (all images "
                                   "together); send fewer or smaller images") from exc
                raise ApiError(422, "image_too_large", str(exc)) from exc
            except ImageError as exc:
                raise ApiError(422, "invalid_image", str(exc)) from exc
            left -= int(image.shape[0]) * int(image.shape[1])
            images.append(image)
        return images

    def _parse(self, body: bytes, content_type: str) -> tuple[list[str | memoryview], list[str]]:
        media = content_type.split(";")[0].strip().lower()
        try:
            if media == BINARY_CONTENT_TYPE:
                header, views = split_binary_batch(body)
                parsed = BinaryHeader.model_validate_json(header)
                return list(views), [item.question for item in parsed.items]
            # No Content-Type (or text/plain) is refused: a browser sends those cross-site
            # without asking first, so reading them as JSON would let any web page drive
            # a server without a token.
            if media == "application/json" or media.endswith("+json"):
                request = AnswerProbsRequest.model_validate_json(body)
                return [item.image for item in request.items], \
                    [item.question for item in request.items]
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", _pydantic_message(exc)) from exc
        except BatchFormatError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        got = f"Content-Type {media!r}" if media else "no Content-Type"
        raise ApiError(415, "unsupported_media_type",
                       f"{got}; send application/json or {BINARY_CONTENT_TYPE}")

    def respond(self, body: bytes, content_type: str) -> Response:
        files, questions = self._parse(body, content_type)
        scores = self.scores(files, questions)
        payload = {"scores": scores.tolist(), "answers_sha256": self.digest}
        return Response(json.dumps(payload, allow_nan=False), media_type="application/json")

    def scores(self, files: Sequence[str | memoryview], questions: list[str]) -> np.ndarray:
        n = len(files)
        if n > self.limits.max_batch:
            raise ApiError(413, "batch_too_large",
                           f"batch of {n} items; the limit is {self.limits.max_batch}")
        if n == 0:
            return np.zeros((0, len(self.answers)))
        with self._lock:  # decoding too: one request's pixels in memory at a time
            images = self._decode(files)
            try:
                raw = self.model.answer_probs_batch(images, questions)
            except InputError as exc:
                raise ApiError(422, "invalid_input", str(exc)) from exc
            except BlackboxVQAError as exc:
                _LOG.error("model %s failed: %s", self.name, exc)
                raise ApiError(500, "model_error", str(exc)) from exc
            except Exception as exc:
                _LOG.exception("model %s failed", self.name)
                raise ApiError(500, "model_error", f"{type(exc).__name__}: {exc}") from exc
        try:
            return check_scores(raw, n, len(self.answers), source=self.name)
        except ModelOutputError as exc:
            _LOG.error("%s", exc)
            raise ApiError(500, "model_output_error", str(exc)) from exc


def create_app(
    model: object,
    *,
    token: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    name: str | None = None,
) -> FastAPI:
    """A FastAPI app serving ``model`` (any object with the model protocol).

    Args:
        model: ``answers`` and ``answer_probs_batch(images, questions)``.
        token: when given, ``/v1/info`` and ``/v1/answer_probs`` require
            ``Authorization: Bearer <token>`` (compared in constant time).
        max_batch: most items per request (more: 413 ``batch_too_large``).
        max_body_bytes: largest request body (larger: 413 ``body_too_large``).
        max_pixels: most pixels per image (more: 422 ``image_too_large``).
        max_request_pixels: most decoded pixels of all a request's images together (more:
            413 ``request_too_large``, found from each image's header before decoding it).
            Requests decode one at a time, inside the model's lock, so the server holds
            at most one request's decoded images.
        name: the name ``/v1/info`` reports (default: the model's ``name`` or class).

    Raises :class:`~blackbox_vqa.errors.NotSupportedError` for a model whose answer list
    follows the input it is prepared for
    (:func:`~blackbox_vqa.adapters.capabilities.answers_follow_input`): the protocol
    publishes one list for every input.
    """
    vqa = check_model(model, source="served model")
    if answers_follow_input(vqa):  # the protocol has one answer list for every input
        raise NotSupportedError(
            f"{model_name(vqa)} cannot be served: its answer list follows the input (the "
            "answer it gives for an input joins it), while a served model publishes one list "
            "for every input; explain it directly, or serve a generative model with an "
            "OpenAI-compatible server (vLLM, transformers serve) and explain it with "
            "--http-format openai")
    if token is not None and (not isinstance(token, str) or not token):
        raise InputError("token must be a non-empty string")
    limits = Limits(
        max_batch=_positive(max_batch, "max_batch"),
        max_body_bytes=_positive(max_body_bytes, "max_body_bytes"),
        max_pixels=_positive(max_pixels, "max_pixels"),
    )
    runner = _ModelRunner(vqa, name or model_name(vqa), limits,
                          _positive(max_request_pixels, "max_request_pixels"))
    info = InfoResponse(
        protocol=PROTOCOL,
        name=runner.name,
        answers=list(runner.answers),
        answers_sha256=runner.digest,
        capabilities=Capabilities(image_encodings=list(IMAGE_ENCODINGS),
                                  npy_dtypes=list(NPY_DTYPES),
                                  request_formats=list(REQUEST_FORMATS)),
        limits=limits,
    )
    from blackbox_vqa.version import __version__

    app = FastAPI(
        # A path with a trailing slash is a 404, not a redirect built from the Host header.
        redirect_slashes=False,
        title="blackbox_vqa model server",
        version=__version__,
        description=f"A VQA model ({runner.name}) behind the `{PROTOCOL}` protocol.",
    )
    _add_error_handlers(app)
    auth = _auth_dependency(token)
    guarded = [auth] if auth is not None else []

    @app.get(HEALTH_PATH, response_model=HealthResponse, summary="Liveness check (no token)")
    def health() -> HealthResponse:
        return HealthResponse()

    @app.get(INFO_PATH, response_model=InfoResponse, dependencies=guarded,
             responses=_ERRORS, summary="The model: name, answers, capabilities, limits")
    def model_info() -> InfoResponse:
        return info

    @app.post(ANSWER_PROBS_PATH, response_model=AnswerProbsResponse, dependencies=guarded,
              responses=_ERRORS, openapi_extra=_request_body_doc(),
              summary="Scores of every answer for a batch of inputs")
    async def answer_probs(request: Request) -> Response:
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        return await run_in_threadpool(runner.respond, body, content_type)

    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail),
                               dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(422, "invalid_request", _validation_message(exc))

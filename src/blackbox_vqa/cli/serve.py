"""``bbvqa serve``: put a model behind the HTTP wire protocol (FastAPI + uvicorn)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
from typing import Annotated

import typer

from blackbox_vqa.cli.model_options import ModelSettings, with_model_options
from blackbox_vqa.errors import InputError, NotSupportedError

__all__ = ["TOKEN_ENV", "bind_socket", "is_loopback", "serve_command"]

TOKEN_ENV = "BBVQA_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, ``127.x``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); InputError on failure."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in 0-65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host!r} cannot be resolved: {exc.strerror or exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


@with_model_options
def serve_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec: easyvqa, PATH.onnx, "
                                       "package.module:factory, http://...")] = "easyvqa",
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default; "
                                      "0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8000,
    token: Annotated[str | None, typer.Option(
        help="Require 'Authorization: Bearer TOKEN' on /v1/info and /v1/answer_probs.",
        envvar=TOKEN_ENV, show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(help="Most inputs per request (413 above).")] = 64,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MiB "
                                               "(413 above).")] = 64.0,
    max_pixels: Annotated[int, typer.Option(help="Most pixels per image (422 above).")]
    = 4096 * 4096,
    max_request_pixels: Annotated[int, typer.Option(
        help="Most decoded pixels per request, all its images together (413 above).")]
    = 64 * 2**20,
    read_timeout: Annotated[float, typer.Option(
        help="Seconds a client has to send one whole request (then it is disconnected).")]
    = 30.0,
    max_connections: Annotated[int, typer.Option(
        help="Most open connections; more are closed at once (lowered to fit the "
        "descriptor limit).")] = 64,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and request logs.")] = False,
    *,
    model_settings: ModelSettings,
) -> None:
    """Serve a model over HTTP so `bbvqa explain --model http://HOST:PORT` can explain it."""
    try:
        import uvicorn

        from blackbox_vqa.server.app import create_app
    except ImportError as exc:
        raise NotSupportedError(f"bbvqa serve needs FastAPI and uvicorn ({exc}); install the "
                                "extra: pip install 'blackbox-vqa[serve]'") from exc
    from blackbox_vqa.adapters.base import model_name
    from blackbox_vqa.cli.model_options import load

    if token is not None and not token.strip():
        raise InputError(f"--token (or {TOKEN_ENV}) must not be empty")
    if not max_body_mb > 0:
        raise InputError(f"--max-body-mb must be > 0, got {max_body_mb}")
    if not read_timeout > 0:
        raise InputError(f"--read-timeout must be > 0, got {read_timeout}")
    for option, value in (("--max-batch", max_batch), ("--max-pixels", max_pixels),
                          ("--max-request-pixels", max_request_pixels),
                          ("--max-connections", max_connections)):
        if value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    sock = bind_socket(host, port)
    try:
        vqa = load(model, model_settings).model
        app = create_app(vqa, token=token.strip() if token else None, max_batch=max_batch,
                         max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels,
                         max_request_pixels=max_request_pixels)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        url = f"http://{shown}:{bound_port}"
        guard = "a bearer token is required" if token else "no token required"
        print(f"bbvqa: serving model {model_name(vqa)!r} "
              f"({len(vqa.answers)} answers) on {url} ({guard}); API docs at {url}/docs; "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        if not token and not is_loopback(host):
            print(f"bbvqa: warning: listening on {host} without a token: anyone who can "
                  f"reach this machine can use the model (set --token or {TOKEN_ENV})",
                  file=sys.stderr, flush=True)
        from blackbox_vqa.server.slow_clients import (
            RateLimitFilter,
            connection_cap,
            guarded_protocol,
        )

        protocol = guarded_protocol(read_timeout=read_timeout,
                                    max_connections=connection_cap(max_connections))
        config = uvicorn.Config(app, log_level="info" if debug else "warning",
                                access_log=debug, lifespan="off", http=protocol,
                                timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
        limiter = RateLimitFilter()
        for logger_name in ("asyncio", "uvicorn.error"):
            logging.getLogger(logger_name).addFilter(limiter)
        # uvicorn shuts down cleanly on Ctrl-C, then raises it again: that is a normal stop.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
        print("bbvqa: server stopped", file=sys.stderr, flush=True)
    finally:
        sock.close()

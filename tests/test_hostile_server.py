"""``bbvqa serve`` against hostile clients (issue 23, items 2 and 3): a per-request budget
of decoded pixels checked from image headers before decoding, slow clients disconnected,
a connection cap, and log lines that stay few."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.server.app import create_app
from live_server import uvicorn_server
from test_server import png_declaring

from toys import BrightnessModel

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 200, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _binary(files: list[bytes]) -> bytes:
    import json

    header = {"items": [{"question": "is it bright?", "image_bytes": len(f)} for f in files]}
    return json.dumps(header).encode() + b"\n" + b"".join(files)


def test_a_request_over_its_pixel_budget_is_413_json_found_before_decoding() -> None:
    from blackbox_vqa.wire import BINARY_CONTENT_TYPE

    app = create_app(BrightnessModel(), max_request_pixels=3 * 64 * 64)
    headers = {"Content-Type": BINARY_CONTENT_TYPE}
    with uvicorn_server(app) as url:
        fits = httpx.post(url + "/v1/answer_probs", content=_binary([_png(64)] * 3),
                          headers=headers, timeout=60)
        assert fits.status_code == 200, fits.text
        # The 4th image only declares its size (no pixel data): a budget found by decoding
        # would answer invalid_image; found from the header it is request_too_large.
        over = httpx.post(url + "/v1/answer_probs",
                          content=_binary([_png(64)] * 3 + [png_declaring(4096, 4096)]),
                          headers=headers, timeout=60)
        assert over.status_code == 413, over.text
        error = over.json()["error"]
        assert error["code"] == "request_too_large"
        assert "items[3].image" in error["message"] and str(3 * 64 * 64) in error["message"]
        one_more = httpx.post(url + "/v1/answer_probs", content=_binary([_png(64)] * 3
                                                                         + [_png(2)]),
                              headers=headers, timeout=60)
        assert one_more.status_code == 413  # one pixel row over the bound is refused too


def test_default_request_budget_refuses_the_issue_request() -> None:
    from blackbox_vqa.server.app import DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_PIXELS

    # 64 images of 4096 x 4096 (the issue's 3.6 GB request) exceed the default budget.
    assert 64 * DEFAULT_MAX_PIXELS > DEFAULT_MAX_REQUEST_PIXELS
    assert DEFAULT_MAX_REQUEST_PIXELS * 3 <= 256 * 2**20  # at most 256 MiB decoded at once


def _serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "blackbox_vqa", "serve", "--model", "toys:brightness_model",
         "--port", "0", *args],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        raise AssertionError(line)
    return proc, match.group(1)


def test_slow_clients_are_dropped_and_honest_requests_are_still_served() -> None:
    proc, url = _serve("--read-timeout", "2", "--max-connections", "24")
    host, port = url.removeprefix("http://").split(":")
    slow: list[socket.socket] = []
    try:
        for _ in range(60):  # more slow clients than the cap
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"POST /v1/answer_probs HTTP/1.1\r\nHost: x\r\n")  # never finishes
            slow.append(sock)
        served = 0
        deadline = time.monotonic() + 120  # generous: the machine may be loaded
        while served < 20 and time.monotonic() < deadline:
            try:
                response = httpx.get(url + "/v1/health", timeout=10)
                served += response.status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)  # over the cap until the read deadline drops slow ones
        assert served == 20
        # Every slow client was disconnected: by the cap at once, or by the read deadline.
        for sock in slow:
            sock.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
    finally:
        for sock in slow:
            sock.close()
        proc.terminate()
        proc.wait(timeout=30)
    rest = proc.stderr.read() if proc.stderr else ""
    assert len(rest) < 10_000, rest[:2000]
    assert "Traceback" not in rest


def test_log_lines_are_rate_limited() -> None:
    import logging

    from blackbox_vqa.server.slow_clients import RateLimitFilter

    records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                                 "socket.accept() out of system resource", None, None)
               for _ in range(1000)]
    limiter = RateLimitFilter(interval=3600)
    assert sum(limiter.filter(r) for r in records) == 1


@pytest.mark.parametrize(("option", "value"), [("--read-timeout", "0"),
                                               ("--max-connections", "0"),
                                               ("--max-request-pixels", "0")])
def test_serve_bounds_must_be_positive(option: str, value: str) -> None:
    from cli_runner import run_cli

    code, _, err = run_cli(["serve", "--model", "toys:brightness_model", "--port", "0",
                            option, value])
    assert code == 2 and option in err

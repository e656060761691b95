"""The HTTP service (``create_app``, ``bbvqa serve``) on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.cli.serve import bind_socket, is_loopback
from blackbox_vqa.errors import InputError, ModelLoadError, QuestionError
from blackbox_vqa.server.app import create_app
from blackbox_vqa.wire import (
    BINARY_CONTENT_TYPE,
    PROTOCOL,
    decode_image,
    encode_binary_batch,
    npy_bytes,
    png_bytes,
)
from cli_runner import run_cli
from live_server import uvicorn_server

from toys import BrightnessModel, FixedOutputModel

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def item(image: np.ndarray, question: str = "is it bright?", *, npy: bool = False) -> dict:
    data = npy_bytes(image) if npy else png_bytes(image)
    return {"image": b64(data), "question": question}


def gray(value: float, dtype: Any = np.uint8, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=dtype)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["status"] == response.status_code
    return body["error"]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = create_app(BrightnessModel(), max_batch=4, max_body_bytes=20_000, max_pixels=1024)
    with uvicorn_server(app) as url:
        yield url


def test_info_reports_name_answers_capabilities_and_limits(server: str) -> None:
    info = httpx.get(server + "/v1/info").json()
    assert info["protocol"] == PROTOCOL
    assert info["name"] == "brightness"
    assert info["answers"] == ["dark", "bright"]
    assert info["answers_sha256"] == hashlib.sha256(b"dark\nbright").hexdigest()
    assert info["limits"] == {"max_batch": 4, "max_body_bytes": 20_000, "max_pixels": 1024}
    assert info["capabilities"]["answer_probs"] is True
    assert info["capabilities"]["gradients"] is False
    assert set(info["capabilities"]["image_encodings"]) == {"png", "jpeg", "npy"}
    assert httpx.get(server + "/v1/health").json() == {"status": "ok"}


def test_answer_probs_scores_png_npy_and_jpeg_images(server: str) -> None:
    fill = gray(123.68, np.float32)
    jpeg = io.BytesIO()
    Image.fromarray(gray(200)).save(jpeg, format="JPEG", quality=95)
    body = {"items": [
        item(gray(51)),
        item(gray(51), "is it not bright?"),
        item(fill, npy=True),
        {"image": "data:image/jpeg;base64," + b64(jpeg.getvalue()), "question": "bright?"},
    ]}
    response = httpx.post(server + "/v1/answer_probs", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    scores = np.array(data["scores"])
    assert data["answers_sha256"] == hashlib.sha256(b"dark\nbright").hexdigest()
    # Brightness = mean / 255; "not" swaps the two scores; the float32 fill arrives exact.
    exact = float(np.float32(123.68)) / 255.0
    np.testing.assert_array_equal(scores[:3], [[0.8, 0.2], [0.2, 0.8], [1 - exact, exact]])
    assert scores[3, 1] == pytest.approx(200 / 255, abs=2 / 255)


def test_empty_batch_gives_no_rows(server: str) -> None:
    response = httpx.post(server + "/v1/answer_probs", json={"items": []})
    assert response.status_code == 200
    assert response.json()["scores"] == []


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"items": [item(gray(1))] * 5}, 413, "batch_too_large",
         "batch of 5 items; the limit is 4"),
        ({"items": [item(gray(1, size=33))]}, 422, "image_too_large", "1089 pixels; the limit"),
        ({"items": [item(gray(1.0, np.float32, 33), npy=True)]}, 422, "image_too_large", "33x33"),
        ({"items": [{"image": "not base64!", "question": "q"}]}, 422, "invalid_image", "base64"),
        ({"items": [{"image": b64(b"GIF89a....."), "question": "q"}]}, 422, "invalid_image",
         "neither PNG, JPEG nor .npy"),
        ({"items": [{"image": b64(npy_bytes(np.zeros((4, 4, 3)))), "question": "q"}]}, 422,
         "invalid_image", "dtype float64"),
        ({"items": [{"image": b64(npy_bytes(np.zeros((4, 4), np.uint8))), "question": "q"}]},
         422, "invalid_image", "must be H x W x 3"),
        ({"items": [{"image": b64(npy_bytes(gray(1))[:-5]), "question": "q"}]}, 422,
         "invalid_image", "bytes of pixels"),
        ({"items": [{"image": b64(png_bytes(gray(1))[:40]), "question": "q"}]}, 422,
         "invalid_image", "cannot be decoded"),
        ({"items": [{"question": "q"}]}, 422, "invalid_request", "items.0.image"),
        ({"items": [{"image": "", "question": "q", "extra": 1}]}, 422, "invalid_request",
         "extra"),
        ({"pictures": []}, 422, "invalid_request", "Extra inputs are not permitted"),
        ({"items": [{"image": b64(npy_bytes(gray(np.nan, np.float32))), "question": "q"}]},
         422, "invalid_image", "NaN or infinite"),
        ({"items": [{"image": b64(npy_bytes(gray(1, size=1))), "question": "q"}]}, 422,
         "invalid_image", "1x1 pixels; at least 2x2"),
    ],
)
def test_bad_requests_get_json_errors(
    server: str, body: dict, status: int, code: str, words: str
) -> None:
    response = httpx.post(server + "/v1/answer_probs", json=body)
    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code
    assert words in error["message"]


def test_binary_batches_score_like_json(server: str) -> None:
    files = [png_bytes(gray(51)), npy_bytes(gray(123.68, np.float32))]
    body = encode_binary_batch(files, ["bright?", "is it not bright?"])
    response = httpx.post(server + "/v1/answer_probs", content=body,
                          headers={"Content-Type": BINARY_CONTENT_TYPE})
    assert response.status_code == 200, response.text
    exact = float(np.float32(123.68)) / 255.0
    assert response.json()["scores"] == [[0.8, 0.2], [exact, 1 - exact]]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"items": []}', "no header line"),
        (b'{"items": [{"question": "q", "image_bytes": 5}]}\nabc', "announces 5 bytes"),
        (b'{"items": [{"question": "q", "image_bytes": -1}]}\n', "integer >= 0"),
        (b'{"items": [{"question": 3, "image_bytes": 0}]}\n', "items.0.question"),
        (b'[1, 2]\n', "not the expected JSON"),
        (b'{"items": [{"question": "q", "image_bytes": 3}]}\nabc', "neither PNG, JPEG nor .npy"),
    ],
)
def test_bad_binary_batches_are_refused(server: str, body: bytes, words: str) -> None:
    response = httpx.post(server + "/v1/answer_probs", content=body,
                          headers={"Content-Type": BINARY_CONTENT_TYPE})
    assert response.status_code == 422
    assert words in error_of(response)["message"]


def test_other_content_types_get_415(server: str) -> None:
    response = httpx.post(server + "/v1/answer_probs", content=b"<items/>",
                          headers={"Content-Type": "application/xml"})
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_malformed_json_and_oversized_bodies_are_refused(server: str) -> None:
    response = httpx.post(server + "/v1/answer_probs", content=b'{"items": [',
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "invalid_request"
    big = json.dumps({"items": [], "pad": "x" * 25_000}).encode()
    response = httpx.post(server + "/v1/answer_probs", content=big,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "body_too_large"
    assert f"{len(big)} bytes; the limit is 20000" in error["message"]
    # A body without a length is counted as it streams in.
    response = httpx.post(server + "/v1/answer_probs", content=iter([big[:15_000], big[15_000:]]),
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"
    assert httpx.get(server + "/v1/nowhere").status_code == 404
    assert error_of(httpx.get(server + "/v1/nowhere"))["code"] == "not_found"


def test_openapi_schema_and_docs(server: str) -> None:
    schema = httpx.get(server + "/openapi.json").json()
    post = schema["paths"]["/v1/answer_probs"]["post"]
    content = post["requestBody"]["content"]
    item = content["application/json"]["schema"]["properties"]["items"]["items"]
    assert set(item["properties"]) == {"image", "question"}
    assert content[BINARY_CONTENT_TYPE]["schema"]["format"] == "binary"
    assert {"200", "413", "415", "422", "500"} <= set(post["responses"])
    assert "/v1/info" in schema["paths"] and "/v1/health" in schema["paths"]
    assert "scores" in schema["components"]["schemas"]["AnswerProbsResponse"]["properties"]
    docs = httpx.get(server + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_bearer_token_is_required_when_set() -> None:
    with uvicorn_server(create_app(BrightnessModel(), token="s3cret")) as url:
        body = {"items": [item(gray(51))]}
        missing = httpx.post(url + "/v1/answer_probs", json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in error_of(missing)["message"]
        wrong = httpx.get(url + "/v1/info", headers={"Authorization": "Bearer s3cre"})
        assert wrong.status_code == 401 and error_of(wrong)["code"] == "unauthorized"
        basic = httpx.get(url + "/v1/info", headers={"Authorization": "Basic s3cret"})
        assert basic.status_code == 401
        good = httpx.post(url + "/v1/answer_probs", json=body,
                          headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200 and good.json()["scores"] == [[0.8, 0.2]]
        assert httpx.get(url + "/v1/health").status_code == 200  # liveness needs no token
        schema = httpx.get(url + "/openapi.json").json()
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


class _Raising(BrightnessModel):
    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        if questions[0] == "unknown words":
            raise QuestionError("none of the words are in the vocabulary")
        raise RuntimeError("CUDA out of memory")


def test_model_failures_become_500_and_input_errors_422() -> None:
    with uvicorn_server(create_app(_Raising())) as url:
        failed = httpx.post(url + "/v1/answer_probs", json={"items": [item(gray(1))]})
        assert failed.status_code == 500
        assert error_of(failed) == {"status": 500, "code": "model_error",
                                    "message": "RuntimeError: CUDA out of memory"}
        refused = httpx.post(url + "/v1/answer_probs",
                             json={"items": [item(gray(1), "unknown words")]})
        assert refused.status_code == 422 and error_of(refused)["code"] == "invalid_input"
    nan = FixedOutputModel(lambda b: np.full((b, 2), np.nan))
    with uvicorn_server(create_app(nan)) as url:
        failed = httpx.post(url + "/v1/answer_probs", json={"items": [item(gray(1))]})
        assert failed.status_code == 500
        assert error_of(failed)["code"] == "model_output_error"
        assert "NaN" in error_of(failed)["message"]


def test_create_app_validates_its_arguments() -> None:
    with pytest.raises(ModelLoadError, match="missing: answers"):
        create_app(object())
    with pytest.raises(InputError, match="max_batch must be a positive integer, got 0"):
        create_app(BrightnessModel(), max_batch=0)
    with pytest.raises(InputError, match="max_pixels"):
        create_app(BrightnessModel(), max_pixels=-1)
    with pytest.raises(InputError, match="token must be a non-empty string"):
        create_app(BrightnessModel(), token="")


def test_decode_image_checks_pixels_before_decoding() -> None:
    big = b64(png_bytes(gray(7, size=40)))
    with pytest.raises(InputError, match="1600 pixels; the limit is 1599"):
        decode_image(big, max_pixels=1599)
    array = decode_image(b64(npy_bytes(gray(2.5, np.float32))), max_pixels=64)
    assert array.dtype == np.float32 and float(array[0, 0, 0]) == 2.5
    big_endian = gray(2.5, np.dtype(">f4"))
    assert decode_image(b64(npy_bytes(big_endian)), max_pixels=64)[3, 3, 2] == 2.5


def test_is_loopback_and_bind_socket() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    sock = bind_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port must be in 0-65535, got 70000"),
        (["--model", "no such spec"], "model spec 'no such spec' is not one of"),
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
        (["--max-body-mb", "-1"], "--max-body-mb must be > 0"),
        (["--max-pixels", "0"], "--max-pixels must be >= 1"),
        (["--token", "  "], "--token (or BBVQA_TOKEN) must not be empty"),
        (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid' cannot be resolved"),
    ],
)
def test_serve_bad_options_exit_2_with_one_line(
    args: list[str], words: str
) -> None:
    code, _, err = run_cli(["serve", "--model", "toys:brightness_model", "--port", "0", *args])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bbvqa: error: ") and words in err


def test_serve_refuses_a_busy_port() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        code, _, err = run_cli(["serve", "-m", "toys:brightness_model", "--port", str(port)])
    finally:
        busy.close()
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_serve_command_serves_with_a_token_from_the_environment() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC)]),
           "BBVQA_TOKEN": "env-t0ken"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "blackbox_vqa", "serve", "--model", "toys:brightness_model",
         "--port", "0"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+) \(a bearer token is required\)", line)
        assert match, line
        url = match.group(1)
        assert "env-t0ken" not in line
        assert httpx.get(url + "/v1/info").status_code == 401
        info = httpx.get(url + "/v1/info", headers={"Authorization": "Bearer env-t0ken"})
        assert info.json()["answers"] == ["dark", "bright"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = proc.stderr.read() if proc.stderr else ""
    assert "server stopped" in rest
    assert "Traceback" not in rest and "env-t0ken" not in rest


# ------------------------------------------------------------------ hostile requests


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels (valid CRCs, no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def npy_declaring(shape: str) -> bytes:
    """A ``.npy`` file of ``uint8`` whose header declares ``shape`` (12 bytes of data)."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (63 - 10 - len(text)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode() + bytes(12)


@pytest.mark.parametrize(
    ("file", "code", "words"),
    [
        # 50000 x 50000: past Pillow's decompression-bomb error limit, refused from the header.
        (png_declaring(50_000, 50_000), "image_too_large", "limit is 1024 pixels"),
        (png_declaring(20_000, 5_000), "image_too_large", "20000x5000"),
        (npy_declaring("(-2, -2, 3)"), "invalid_image", "must be H x W x 3"),
        (npy_declaring("(2, -2, 3)"), "invalid_image", "must be H x W x 3"),
    ],
    ids=["png-bomb", "png-over-limit", "npy-negative", "npy-one-negative"],
)
@pytest.mark.parametrize("binary", [False, True])
def test_hostile_image_files_get_a_json_422(
    server: str, file: bytes, code: str, words: str, binary: bool
) -> None:
    if binary:
        response = httpx.post(server + "/v1/answer_probs",
                              content=encode_binary_batch([file], ["bright?"]),
                              headers={"Content-Type": BINARY_CONTENT_TYPE})
    else:
        response = httpx.post(server + "/v1/answer_probs",
                              json={"items": [{"image": b64(file), "question": "bright?"}]})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == code and words in error["message"]


def test_a_deeply_nested_binary_header_gets_a_json_422(server: str) -> None:
    body = b"[" * 15_000 + b"\n"
    response = httpx.post(server + "/v1/answer_probs", content=body,
                          headers={"Content-Type": BINARY_CONTENT_TYPE})
    assert response.status_code == 422, response.text
    assert "nested too deeply" in error_of(response)["message"]
    nested_json = b'{"items": ' + b"[" * 9_000 + b"]" * 9_000 + b"}"
    response = httpx.post(server + "/v1/answer_probs", content=nested_json,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_request"


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(server: str) -> None:
    for path in ("/v1/info/", "/v1/health/", "/v1/answer_probs/"):
        response = httpx.get(server + path, headers={"Host": "evil.example"})
        assert response.status_code == 404, path
        assert "location" not in response.headers
        assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_post_without_a_json_content_type_gets_415(
    server: str, content_type: str | None
) -> None:
    body = json.dumps({"items": [item(gray(200))]}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(server + "/v1/answer_probs", content=body, headers=headers)
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert ("no Content-Type" if content_type is None else content_type) in error["message"]

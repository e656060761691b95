"""``--http-format openai`` against real chat servers that nobody on this project wrote,
set up by /work/shared/vlm-servers/setup_servers.sh under ``RS_DIR`` (default
``~/.cache/vlm-servers``), each serving a tiny random-weight LLaVA. A server that is not set
up there is skipped. Each test starts its server on a free port of 127.0.0.1 in its own
process group and stops it by its pid.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli

pytestmark = [pytest.mark.realserver, pytest.mark.slow]

RS_DIR = Path(os.environ.get("RS_DIR", str(Path.home() / ".cache" / "vlm-servers")))
MODEL = RS_DIR / "tiny-llava"
QUESTION = "what color is the square?"
ANSWER_ONLY = "answer-only: maps show answer flips, not probabilities"
_SERVE = "from transformers.cli.transformers import main; main()"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _server(command: list[str], port: int, log: Path) -> Iterator[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the server did not start within 240 s")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    pixels[4:20, 6:22] = (200, 40, 40)
    path = tmp_path / "in.png"
    Image.fromarray(pixels).save(path)
    return path


def test_transformers_serve_is_answer_only_and_says_so(image_file: Path,
                                                       tmp_path: Path) -> None:
    python = RS_DIR / "venv" / "bin" / "python"
    if not python.exists() or not MODEL.is_dir():
        pytest.skip(f"transformers serve is not set up under {RS_DIR}")
    port = _port()
    command = [str(python), "-c", _SERVE, "serve", str(MODEL), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    args = ["-i", str(image_file), "-q", QUESTION, "--grid", "2", "--http-format", "openai"]
    with _server(command, port, tmp_path / "tserve.log") as url:
        code, stdout, err = run_cli(["explain", "-m", url, *args, "--out",
                                     str(tmp_path / "out")])
        assert code == 0, err
        assert ANSWER_ONLY in " ".join(stdout.split())
        assert ANSWER_ONLY in (tmp_path / "out" / "report.html").read_text()
        doc = json.loads((tmp_path / "out" / "explanation.json").read_text())
        assert doc["score_semantics"]["kind"] == "answer_only"
        assert doc["score_semantics"]["request"]["server_model"] == str(MODEL)
        code, _, err = run_cli(["explain", "-m", url, *args, "--require-logprobs",
                                "--out", str(tmp_path / "strict")])
    assert code == 1 and err.count("\n") == 1 and "--require-logprobs was given" in err
    assert not (tmp_path / "strict").exists()


def test_vllm_gives_exact_sequence_scores_under_a_low_logprobs_cap(
    image_file: Path, tmp_path: Path
) -> None:
    python = RS_DIR / "vllm-venv" / "bin" / "python"
    if not python.exists() or not MODEL.is_dir():
        pytest.skip(f"vLLM is not set up under {RS_DIR}")
    port = _port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(MODEL), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 1}',
               "--max-logprobs", "5"]  # as /work/shared/vlm-servers/start_vllm.sh starts it
    with _server(command, port, tmp_path / "vllm.log") as url:
        code, stdout, err = run_cli(["explain", "-m", url, "--http-format", "openai",
                                     "-i", str(image_file), "-q", QUESTION, "--grid", "2",
                                     "--out", str(tmp_path / "out")])
        assert code == 0, err
        assert "at most 5 top_logprobs" in " ".join(stdout.split())
        doc = json.loads((tmp_path / "out" / "explanation.json").read_text())
        semantics = doc["score_semantics"]
        if semantics["kind"] == "first_token":  # the adapter saw that the template or
            # tokeniser changes the answer (a random model's answers often tokenise
            # otherwise than generated), and said so
            assert any("as a given text but" in n for n in semantics["notes"])
            return
        assert semantics["kind"] == "sequence"
        # token by token: the generated tokens' own logprobs, from one generation request
        with Image.open(image_file) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        from blackbox_vqa.adapters.http.openai import ChatFormat

        chat = ChatFormat(doc["score_semantics"]["request"]["remote_model"], top_logprobs=5)
        answer = httpx.post(url + "/chat/completions", json=chat.request(pixels, QUESTION),
                            timeout=60).json()
    tokens = answer["choices"][0]["logprobs"]["content"]
    by_token = math.exp(sum(t["logprob"] for t in tokens))
    assert doc["probability"] == pytest.approx(by_token, abs=1e-4)

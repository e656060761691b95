"""``--http-format openai`` against real chat servers that nobody on this project wrote,
set up by /work/shared/vlm-servers/setup_servers.sh under ``RS_DIR`` (default
``~/.cache/vlm-servers``), each serving a tiny random-weight vision-language model (LLaVA
for vLLM and ``transformers serve``, an Idefics3 GGUF for llama.cpp's ``llama-server``). A
server that is not set up there is skipped. Each test starts its server on a free port of
127.0.0.1 in its own process group and stops it by its pid (the vLLM test also kills it
mid-run, by its process group, and starts it again).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.adapters.http.config import DEFAULT_PROMPT
from blackbox_vqa.adapters.http.openai import render_prompt
from blackbox_vqa.explainers.masks import grid_boxes
from blackbox_vqa.text import drop_word, normalise_answer, split_words
from blackbox_vqa.wire import png_bytes
from cli_runner import run_cli

pytestmark = [pytest.mark.realserver, pytest.mark.slow]

RS_DIR = Path(os.environ.get("RS_DIR", str(Path.home() / ".cache" / "vlm-servers")))
MODEL = RS_DIR / "tiny-llava"
QUESTION = "what color is the square?"
GRID = 4
KILL_AT = 16  # completed requests when the server is killed: generation, scoring, the
# token-by-token check of the original (one per answer token) and a few occluded inputs
ANSWER_ONLY = "answer-only: maps show answer flips, not probabilities"
_SERVE = "from transformers.cli.transformers import main; main()"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _server(command: list[str], port: int, log: Path) -> Iterator[str]:
    with _process(command, port, log) as (url, _):
        yield url


@contextmanager
def _process(command: list[str], port: int,
             log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The server started in its own process group, its URL once it answers; stopped (its
    group, by its pid) on the way out unless it has exited already."""
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
        yield url, process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
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


def _vllm_command(port: int) -> list[str]:
    """vLLM as /work/shared/vlm-servers/start_vllm.sh starts it, ``top_logprobs`` capped at 5."""
    python = RS_DIR / "vllm-venv" / "bin" / "python"
    if not python.exists() or not MODEL.is_dir():
        pytest.skip(f"vLLM is not set up under {RS_DIR}")
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(MODEL), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
            "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 1}',
            "--max-logprobs", "5"]


def _user(pixels: np.ndarray, question: str) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")
    return {"role": "user", "content": [
        {"type": "text", "text": render_prompt(DEFAULT_PROMPT, question)},
        {"type": "image_url", "image_url": {"url": url}}]}


def _post(url: str, model: str, messages: list[dict[str, Any]],
          **fields: Any) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0,
            "seed": 0, "return_token_ids": True, **fields}
    answer = httpx.post(url + "/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _by_hand(url: str, model: str, answer: str, pixels: np.ndarray,
             question: str) -> tuple[float, float]:
    """The answer's log-probability for one input, by hand: ``(whole, by_token)``.

    ``whole``: one ``prompt_logprobs`` request with the answer as a continued assistant
    message; its tokens are the prompt positions past the generation prompt's (asked
    separately). ``by_token``: one request per answer token, its prompt the generation
    prompt then each prefix of those tokens (the prefix's ids checked), reading the
    token's log-probability by id (``logprob_token_ids``)."""
    user = _user(pixels, question)
    head = _post(url, model, [user], add_generation_prompt=True)["prompt_token_ids"]
    scored = _post(url, model, [user, {"role": "assistant", "content": answer}],
                   prompt_logprobs=0, continue_final_message=True,
                   add_generation_prompt=False)
    ids = scored["prompt_token_ids"]
    assert ids[:len(head)] == head and len(ids) > len(head)
    entries = scored["prompt_logprobs"][len(head):]
    whole = sum(entry[str(i)]["logprob"] for entry, i in zip(entries, ids[len(head):],
                                                             strict=True))
    texts = [entry[str(i)]["decoded_token"] for entry, i in zip(entries, ids[len(head):],
                                                                 strict=True)]
    lead = len("".join(texts)) - len(answer)
    by_token = 0.0
    for k, token_id in enumerate(ids[len(head):]):
        prefix = "".join(texts[:k])[lead:]
        messages = [user] if k == 0 else [user, {"role": "assistant", "content": prefix}]
        found = _post(url, model, messages, logprobs=True, top_logprobs=0,
                      logprob_token_ids=[token_id], return_tokens_as_token_ids=True,
                      continue_final_message=k > 0, add_generation_prompt=k == 0)
        assert found["prompt_token_ids"] == ids[:len(head) + k]
        listed = found["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        (value,) = [e["logprob"] for e in listed if e["token"] == f"token_id:{token_id}"]
        by_token += value
    return whole, by_token


def _kill_after(cache: Path, count: int, process: subprocess.Popen[bytes],
                stop: threading.Event) -> None:
    """Kill the server (its process group, SIGKILL) once ``cache`` holds ``count``
    completed requests."""
    while not stop.is_set():
        if len(list(cache.glob("*/*.json"))) >= count:
            os.killpg(process.pid, signal.SIGKILL)
            return
        time.sleep(0.002)


def test_vllm_gives_exact_sequence_maps_that_resume_after_the_server_dies(
    image_file: Path, tmp_path: Path
) -> None:
    port = _port()
    command = _vllm_command(port)
    out = tmp_path / "out"
    cache = tmp_path / ".out.requests"
    args = ["explain", "-m", f"http://127.0.0.1:{port}/v1", "--http-format", "openai",
            "-i", str(image_file), "-q", QUESTION, "--grid", str(GRID), "--baseline",
            "black", "--http-concurrency", "1", "--out", str(out)]
    with _process(command, port, tmp_path / "vllm1.log") as (url, process):
        stop = threading.Event()
        killer = threading.Thread(target=_kill_after, args=(cache, KILL_AT, process, stop))
        killer.start()
        try:
            code, _, err = run_cli(args)
        finally:
            stop.set()
            killer.join()
    assert code == 1 and err.count("\n") == 1, err
    kept = len(list(cache.glob("*/*.json")))
    assert f"{kept} completed requests are kept in {cache}" in err and kept >= KILL_AT
    assert not out.exists()
    with _process(command, port, tmp_path / "vllm2.log") as (url, _):
        code, stdout, err = run_cli(args)
        assert code == 0, err
        assert f"request cache: reused {kept} completed requests" in err
        assert "at most 5 top_logprobs" in " ".join(stdout.split())
        doc = json.loads((out / "explanation.json").read_text())
        semantics = doc["score_semantics"]
        assert semantics["kind"] == "sequence", semantics.get("notes")
        model = semantics["request"]["server_model"]
        with Image.open(image_file) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        generated = _post(url, model, [_user(pixels, QUESTION)], max_tokens=8)
        answer = generated["choices"][0]["message"]["content"]
        inputs = [(pixels, QUESTION)]
        for top, bottom, left, right in grid_boxes(*pixels.shape[:2], GRID):
            cell = pixels.copy()
            cell[top:bottom, left:right] = 0
            inputs.append((cell, QUESTION))
        inputs += [(pixels, drop_word(QUESTION, i)) for i in range(len(split_words(QUESTION)))]
        scores = [_by_hand(url, model, answer, image, question) for image, question in inputs]
        assert not cache.exists()
        started = time.perf_counter()
        code, _, err = run_cli([*args[:-1], str(tmp_path / "clean"), "--request-cache", "off"])
        seconds = time.perf_counter() - started
        assert code == 0, err
    # the sequence score is the product of per-token probabilities, on every input
    worst = max(abs(whole - by_token) for whole, by_token in scores)
    assert worst <= 1e-4
    logs = np.asarray([whole for whole, _ in scores])
    p = np.exp(logs)
    cells = (p[0] - p[1:1 + GRID * GRID]).reshape(GRID, GRID)
    words = p[0] - p[1 + GRID * GRID:]
    image_map = np.asarray(doc["occlusion"]["image"])
    word_map = np.asarray(doc["occlusion"]["words"])
    assert doc["answer"] == normalise_answer(answer)
    assert doc["probability"] == pytest.approx(p[0], rel=1e-4)
    # to 1e-4 of the original's probability (a random model's answer is improbable)
    np.testing.assert_allclose(image_map / p[0], cells / p[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(word_map / p[0], words / p[0], rtol=0, atol=1e-4)
    clean = json.loads((tmp_path / "clean" / "explanation.json").read_text())
    np.testing.assert_array_equal(image_map, np.asarray(clean["occlusion"]["image"]))
    np.testing.assert_array_equal(word_map, np.asarray(clean["occlusion"]["words"]))
    print(f"\nvLLM sequence check: answer {answer!r}, {len(scores)} inputs, log p(original) "
          f"{logs[0]:.6g}, largest |whole - token by token| {worst:.3g}, resumed with "
          f"{kept} reused, a run without the cache {seconds:.1f} s")


def test_llama_server_gives_first_token_maps_that_repeat_without_its_prompt_cache(
    image_file: Path, tmp_path: Path
) -> None:
    server = RS_DIR / "llama-build" / "bin" / "llama-server"
    gguf = RS_DIR / "gguf"
    if not server.exists() or not (gguf / "tiny-idefics3-f32.gguf").exists():
        pytest.skip(f"llama-server is not set up under {RS_DIR}")
    port = _port()
    # as /work/shared/vlm-servers/start_llama_server.sh starts it, without its prompt cache
    # (with it, an input's logprobs depend on the prompt cached before: 3rd decimal)
    command = [str(server), "-m", str(gguf / "tiny-idefics3-f32.gguf"), "--mmproj",
               str(gguf / "mmproj-tiny-idefics3-f32.gguf"), "--host", "127.0.0.1",
               "--port", str(port), "-c", "512", "-t", "1", "--jinja", "--no-webui",
               "--no-cache-prompt"]
    runs = []
    with _server(command, port, tmp_path / "llama.log") as url:
        for name in ("a", "b"):
            code, _, err = run_cli(["explain", "-m", url, "--http-format", "openai",
                                         "-i", str(image_file), "-q", QUESTION, "--grid",
                                         str(GRID), "--http-concurrency", "1",
                                         "--request-cache", "off",
                                         "--out", str(tmp_path / name)])
            assert code == 0, err
            runs.append(json.loads((tmp_path / name / "explanation.json").read_text()))
    semantics = runs[0]["score_semantics"]
    assert semantics["kind"] == "first_token"
    assert semantics["notes"] == ["first-token scores: the server offers no whole-answer "
                                  "likelihood (prompt_logprobs)"]
    assert semantics["request"]["server_model"].endswith("tiny-idefics3-f32.gguf")
    for key in ("image", "words"):
        np.testing.assert_array_equal(np.asarray(runs[0]["occlusion"][key]),
                                      np.asarray(runs[1]["occlusion"][key]))

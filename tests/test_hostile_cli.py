"""The command line against hostile models and interrupted runs: credentials never written,
a crashing model does not stop a comparison, Ctrl-C leaves nothing half-written, control
characters from outside never reach the terminal raw."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from blackbox_vqa.adapters.base import BaseAdapter
from blackbox_vqa.text import terminal_safe
from cli_runner import run_cli
from live_server import uvicorn_server

from toys import BrightnessModel

QUESTION = "is it bright?"
TESTS = Path(__file__).resolve().parent


class CrashingModel(BaseAdapter):
    """A third-party model that fails with an ordinary exception."""

    def __init__(self) -> None:
        super().__init__(["dark", "bright"], name="crashing")

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        raise RuntimeError("CUDA error: device-side assert triggered")


def crashing_model() -> CrashingModel:
    return CrashingModel()


class EscapingModel(BaseAdapter):
    """Answers that try to retitle and clear the terminal."""

    def __init__(self) -> None:
        super().__init__(["\x1b]0;pwned\x07yes", "\x1b[2J\x1b[Hno"], name="escaping")

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        return np.tile([0.9, 0.1], (len(images), 1))


def escaping_model() -> EscapingModel:
    return EscapingModel()


class SlowModel(BrightnessModel):
    """BrightnessModel that takes its time and says when it started (for Ctrl-C tests)."""

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        Path(os.environ["SLOW_MODEL_STARTED"]).touch()
        time.sleep(float(os.environ.get("SLOW_MODEL_SECONDS", "0.5")))
        return super()._predict_batch(images, questions)


def slow_model() -> SlowModel:
    return SlowModel()


def test_terminal_safe_escapes_every_control_character() -> None:
    assert terminal_safe("a\x1b[2Jb\x07c\x9bd\u202ee\nf") == "a\\x1b[2Jb\\x07c\\x9bd\\u202ee\\x0af"
    assert terminal_safe("plain text: été, 日本") == "plain text: été, 日本"


def test_compare_goes_on_after_a_model_that_raises(square_image: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(["compare", "-m", "toys:brightness_model", "-m",
                            "test_hostile_cli:crashing_model", "-i", str(square_image), "-q",
                              QUESTION, "--out", str(tmp_path / "c")])
    assert code == 1
    assert "1 of 2 model runs failed" in err and "RuntimeError: CUDA error" in err
    doc = json.loads((tmp_path / "c" / "comparison.json").read_text())
    status = {m["spec"]: (m["status"], m["error"]) for m in doc["models"]}
    assert status["toys:brightness_model"] == ("ok", None)
    assert status["test_hostile_cli:crashing_model"][0] == "failed"
    assert "device-side assert" in status["test_hostile_cli:crashing_model"][1]
    assert (tmp_path / "c" / "report.html").is_file()


def test_credentials_in_model_urls_are_never_written(square_image: Path, tmp_path: Path) -> None:
    from blackbox_vqa.server.app import create_app

    with uvicorn_server(create_app(BrightnessModel())) as url:
        secret = url.replace("http://", "http://alice:hunter2@") + "?api_key=topsecret"
        code, out, err = run_cli(["compare", "-m", "toys:brightness_model", "-m", secret,
                                  "-i", str(square_image), "-q", QUESTION,
                                  "--out", str(tmp_path / "c")])
        assert code == 0, err
        code2, out2, err2 = run_cli(["evaluate", "-m", secret, "--dataset", "easyvqa:test",
                                     "--limit", "1", "--grid", "2", "--methods", "occlusion",
                                     "--out", str(tmp_path / "e")])
        assert code2 == 0, err2
    written = [p for folder in ("c", "e") for p in (tmp_path / folder).rglob("*")
               if p.is_file()]
    assert len(written) >= 5
    for text in [out, err, out2, err2, *(p.read_bytes().decode("latin-1") for p in written)]:
        assert "hunter2" not in text and "topsecret" not in text and "alice" not in text
    doc = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert url in [m["spec"] for m in doc["models"]]


def test_control_characters_from_a_model_never_reach_the_terminal(
    square_image: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli(["explain", "-m", "test_hostile_cli:escaping_model", "-i",
                              str(square_image), "-q", QUESTION, "--grid", "2",
                              "--out", str(tmp_path / "e")])
    assert code == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "\\x1b]0;pwned\\x07yes" in out
    doc = json.loads((tmp_path / "e" / "explanation.json").read_text())
    assert doc["answer"] == "\x1b]0;pwned\x07yes"  # the data itself is kept as it came
    report = (tmp_path / "e" / "report.html").read_text(encoding="utf-8")
    assert "\x1b" not in report and "\x07" not in report  # no raw control bytes
    assert "\\x1b]0;pwned\\x07yes" in report  # shown escaped instead
    code, out, err = run_cli(["compare", "-m", "test_hostile_cli:escaping_model", "-m",
                              "toys:brightness_model", "-i", str(square_image), "-q",
                              QUESTION, "--grid", "2", "--out", str(tmp_path / "c")])
    assert code == 0, err
    assert "\x1b" not in out + err and "\\x1b[2J" not in err


def test_an_unusable_output_folder_is_refused_before_any_work(
    square_image: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, words in ((blocker / "sub", "is not writable"),
                       (blocker, "exists and is not a folder")):
        code, _, err = run_cli(["explain", "-m", "test_hostile_cli:crashing_model", "-i",
                                str(square_image), "-q", QUESTION, "--out", str(out)])
        # The crashing model would fail with exit 1: the folder is refused first.
        assert code == 2 and words in err and err.count("\n") == 1, err


def test_ctrl_c_exits_130_and_leaves_no_folder(square_image: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    # Each model call sleeps 30 s: the run cannot end before Ctrl-C however loaded the
    # machine is, and Ctrl-C interrupts the sleep at once.
    env = {**os.environ, "SLOW_MODEL_STARTED": str(started), "SLOW_MODEL_SECONDS": "30",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "blackbox_vqa", "explain", "-m", "test_hostile_cli:slow_model",
         "-i", str(square_image), "-q", QUESTION, "--batch-size", "4", "--out",
         str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 300  # generous: startup on a loaded machine
    while not started.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert started.exists(), process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "bbvqa: error: interrupted", err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["square.png", "started"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_evaluate_workers_end_when_the_command_is_killed(tmp_path: Path) -> None:
    started = tmp_path / "started"
    # Each model call takes a minute: only the fix ends the workers within seconds.
    env = {**os.environ, "SLOW_MODEL_STARTED": str(started), "SLOW_MODEL_SECONDS": "60",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "blackbox_vqa", "evaluate", "-m", "test_hostile_cli:slow_model",
         "--dataset", "easyvqa:test", "--limit", "40", "--workers", "2", "--grid", "4",
         "--methods", "occlusion", "--out", str(tmp_path / "run")], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists()
        workers = [pid for pid in _children(process.pid) if _alive(pid)]
        assert workers
        process.kill()  # SIGKILL: no chance to clean up
        process.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        if process.poll() is None:
            process.kill()

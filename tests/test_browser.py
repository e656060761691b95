"""The HTML report in a real headless Chromium, driven over the DevTools protocol.

Debian's ``chromium`` is started by the tests (``--remote-debugging-port=0``; the port is
read from ``DevToolsActivePort`` in its profile folder) and driven over one websocket with
flattened target sessions. Skipped where ``/usr/bin/chromium`` is absent.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.adapters.base import BaseAdapter
from blackbox_vqa.cli.app import main

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin"),
]

EVIL_QUESTION = ("is it <b>bright</b>? <script>window.pwned=1;document.title='pwned'</script>"
                 "<img src=x onerror=\"window.pwned=2\">")
EVIL_ANSWERS = ["<script>window.pwned=3</script>", "<img src=y onerror=window.pwned=4>"]
EVIL_FILE = "<img src=z onerror=window.pwned=5>.png"


class EvilAnswers(BaseAdapter):
    """Answers that are markup; the first scores mean brightness / 255."""

    def __init__(self) -> None:
        super().__init__(EVIL_ANSWERS, name="evil")

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        bright = [float(np.asarray(i, dtype=np.float64).mean()) / 255.0 for i in images]
        return np.asarray([[b, 1.0 - b] for b in bright])


def evil() -> EvilAnswers:
    return EvilAnswers()


class DevTools:
    """A headless Chromium and one DevTools websocket (flattened sessions)."""

    def __init__(self, profile: Path) -> None:
        import websocket

        self.process = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--no-first-run", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--window-size=1280,1024", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.socket = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=30,
                                                  suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def open(self, path: Path) -> Tab:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        url = path.resolve().as_uri()
        self.send("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + 30
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                      for e in self.events):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not load")
            self.events.append(json.loads(self.socket.recv()))
        return Tab(self, session, url)

    def close(self) -> None:
        if hasattr(self, "socket"):
            self.socket.close()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


class Tab:
    """One loaded page."""

    def __init__(self, tools: DevTools, session: str, url: str) -> None:
        self.tools, self.session, self.url = tools, session, url

    def evaluate(self, expression: str) -> Any:
        result = self.tools.send("Runtime.evaluate", {"expression": expression,
                                                      "returnByValue": True}, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def events(self, *methods: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.tools.events
                if e.get("sessionId") == self.session and e.get("method") in methods]

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (CSP reports too)."""
        found = [json.dumps(e)[:300] for e in self.events("Runtime.exceptionThrown")]
        found += [json.dumps(e["args"])[:300] for e in self.events("Runtime.consoleAPICalled")
                  if e["type"] in ("error", "assert")]
        found += [e["entry"]["text"] for e in self.events("Log.entryAdded")
                  if e["entry"]["level"] == "error"]
        return found

    def requests(self) -> list[str]:
        """URLs the page requested other than its own file and inline data."""
        urls = [e["request"]["url"] for e in self.events("Network.requestWillBeSent")]
        return [u for u in urls if u != self.url and not u.startswith("data:")]

    def screenshot(self) -> np.ndarray:
        height = self.tools.send("Page.getLayoutMetrics", session=self.session)[
            "cssContentSize"]["height"]
        shot = self.tools.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}},
            self.session)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"))


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    pytest.importorskip("websocket", reason="needs websocket-client (the dev extra)")
    tools = DevTools(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield tools
    finally:
        tools.close()


def bbvqa(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)


HEATMAPS = ("Array.from(document.querySelectorAll('img.heatmap')).map(i => [i.complete, "
            "i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])")


def check_rendered(tab: Tab, heatmaps: int) -> np.ndarray:
    found = tab.evaluate(HEATMAPS)
    assert len(found) == heatmaps
    assert all(ok and w > 0 and h > 0 and shown > 0 for ok, w, h, shown in found), found
    bars = tab.evaluate("Array.from(document.querySelectorAll('img.colorbar'))"
                        ".every(i => i.complete && i.naturalWidth > 0)")
    assert bars is True
    assert tab.errors() == []
    assert tab.requests() == []
    shot = tab.screenshot()
    packed = (shot[..., 0].astype(np.int32) << 16) | (shot[..., 1].astype(np.int32) << 8) \
        | shot[..., 2]
    assert shot.std() > 20 and np.unique(packed).size > 100
    reds = (shot[..., 0] > 150) & (shot[..., 1] < 90) & (shot[..., 2] < 90)
    assert reds.sum() > 500  # heat-map and word-bar red is on screen, not just text
    return shot


def test_compare_report_renders_offline(
    chromium: DevTools, square_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    bbvqa(["compare", "-m", "test_compare_cli:brightness", "-m", "test_compare_cli:quadrant",
           "-m", "test_compare_cli:linear", "-i", str(square_image), "-q", "is it dark?",
           "--grid", "8", "--out", str(out)])
    tab = chromium.open(out / "report.html")
    check_rendered(tab, heatmaps=5)  # three occlusion maps, guided-bp and gradient maps
    text = tab.evaluate("document.body.innerText")
    assert text.count("not available") == 4
    assert tab.evaluate("document.querySelectorAll('table.agreement').length") == 3


def test_explain_report_renders_offline(
    chromium: DevTools, square_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ex"
    bbvqa(["explain", "-i", str(square_image), "-q", "is it not bright?", "--model",
           "toys:brightness_model", "--grid", "8", "--out", str(out)])
    tab = chromium.open(out / "report.html")
    check_rendered(tab, heatmaps=1)


def test_answer_token_strip_renders_offline(
    chromium: DevTools, square_image: Path, tmp_path: Path
) -> None:
    """A model that scores its answer token by token: the main heat map, then a strip of
    two small token maps, both loaded and drawn at half the main map's width."""
    out = tmp_path / "tokens"
    bbvqa(["explain", "-i", str(square_image), "-q", "is it dark", "--model",
           "toys:two_token_model", "--answer", "ab", "--grid", "8", "--out", str(out)])
    tab = chromium.open(out / "report.html")
    main_map = tab.evaluate(HEATMAPS)
    assert len(main_map) == 1 and main_map[0][0] and main_map[0][3] > 200
    assert tab.errors() == [] and tab.requests() == []
    found = tab.evaluate(HEATMAPS.replace("img.heatmap", "img.tokenmap"))
    assert len(found) == 2
    assert all(ok and w > 0 and h > 0 and 100 <= shown <= 120 for ok, w, h, shown in found)
    tops = tab.evaluate("['img.heatmap', 'img.tokenmap'].map(s => "
                        "document.querySelector(s).getBoundingClientRect().top)")
    assert tops[1] > tops[0]  # the strip is under the main map
    assert "'a'" in tab.evaluate("document.body.innerText")


def test_markup_in_question_answers_and_file_name_never_runs(
    chromium: DevTools, tmp_path: Path
) -> None:
    image = tmp_path / EVIL_FILE
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[4:20, 8:24] = 230
    Image.fromarray(pixels).save(image, format="PNG")
    out = tmp_path / "evil"
    bbvqa(["compare", "-m", "test_browser:evil", "-m", "test_compare_cli:brightness",
           "-i", str(image), "-q", EVIL_QUESTION, "--grid", "4", "--out", str(out)])
    tab = chromium.open(out / "report.html")
    assert tab.evaluate("typeof window.pwned") == "undefined"
    assert tab.evaluate("document.title") != "pwned"
    assert tab.evaluate("document.scripts.length") == 0
    assert tab.evaluate("document.querySelectorAll('b, a, iframe, object, embed, link, "
                        "form, input').length") == 0
    assert tab.evaluate("Array.from(document.querySelectorAll('*')).some(e => Array.from("
                        "e.attributes).some(a => a.name.startsWith('on')))") is False
    assert tab.evaluate("Array.from(document.images).every(i => i.src.startsWith('data:'))")
    text = tab.evaluate("document.body.innerText")
    for shown in (EVIL_QUESTION, EVIL_ANSWERS[0], EVIL_ANSWERS[1], EVIL_FILE):
        assert shown in text  # displayed as text, character for character
    assert tab.errors() == []
    assert tab.requests() == []


class _Counter(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_policy_blocks_injected_script_and_remote_loads(
    chromium: DevTools, square_image: Path, tmp_path: Path
) -> None:
    """Defence in depth: even markup that escaped escaping could not run or phone home."""
    out = tmp_path / "ex"
    bbvqa(["explain", "-i", str(square_image), "-q", "is it bright?", "--model",
           "toys:brightness_model", "--grid", "4", "--out", str(out)])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    _Counter.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = f"http://127.0.0.1:{server.server_address[1]}"
        html = (out / "report.html").read_text(encoding="utf-8").replace(
            "</body>",
            f"<script>window.pwned=1</script><img src=\"{remote}/img.png\">"
            f"<link rel=\"stylesheet\" href=\"{remote}/style.css\"></body>")
        tampered = out / "tampered.html"
        tampered.write_text(html, encoding="utf-8")
        tab = chromium.open(tampered)
        assert tab.evaluate("typeof window.pwned") == "undefined"
        tab.evaluate("new Promise(r => setTimeout(r, 300))")
        assert _Counter.hits == []
        errors = " ".join(tab.errors())
        assert "Content Security Policy" in errors
    finally:
        server.shutdown()
        server.server_close()

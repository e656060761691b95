"""``bbvqa evaluate --executor ray`` on a real two-node Ray cluster started on this machine.

The cluster stays on loopback: the head node on 127.0.0.2, the second node on 127.0.0.3
(Ray swaps 127.0.0.1 for the machine's interface address), one CPU each, so two actors
run on two nodes. Both nodes get tests/ and src/ on ``PYTHONPATH``; the fixture stops only
the process groups it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
PID_DIR_ENV = "BBVQA_RAY_TEST_DIR"
START_TIMEOUT_S = 120


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


_TOKEN: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def auth_token() -> Iterator[str]:
    """Ray's token authentication for every node and driver the tests start, with a token
    of their own: Ray's gRPC servers listen on every interface whatever the node address,
    and a token that a default ``ray.init()`` left in ~/.ray must not leak in."""
    folder = Path(tempfile.mkdtemp(prefix="bbvqa-ray-token-"))
    path = folder / "auth_token"
    path.write_text(secrets.token_hex(32))
    _TOKEN["path"] = str(path)
    yield str(path)
    shutil.rmtree(folder, ignore_errors=True)


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(TESTS)])
    return {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": _TOKEN["path"], **extra}


@dataclass
class Cluster:
    address: str
    folder: Path

    def options(self) -> list[str]:
        return ["--executor", "ray", "--ray-address", self.address,
                "--ray-node-ip", HEAD_IP]


def _start_node(args: list[str], env: dict[str, str], groups: list[int]) -> None:
    child = subprocess.Popen(["ray", "start", *args], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    groups.append(child.pid)  # the node's daemons stay in this process group
    out, _ = child.communicate(timeout=START_TIMEOUT_S)
    if child.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed: {out[-2000:]}")


def _stop_groups(groups: list[int]) -> None:
    for group in reversed(groups):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(auth_token: str) -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="bbvqa-ray-", dir="/tmp"))  # short: socket paths
    env = _env(**{PID_DIR_ENV: str(folder)})
    port = _free_port(HEAD_IP)
    groups: list[int] = []
    common = ["--num-cpus", "1", "--disable-usage-stats", "--temp-dir", str(folder / "t")]
    try:
        _start_node(["--head", "--node-ip-address", HEAD_IP, "--port", str(port),
                     "--include-dashboard=false", *common], env, groups)
        _start_node(["--address", f"{HEAD_IP}:{port}", "--node-ip-address", NODE_IP,
                     *common], env, groups)
        yield Cluster(f"{HEAD_IP}:{port}", folder)
    finally:
        _stop_groups(groups)
        shutil.rmtree(folder, ignore_errors=True)


def _bbvqa(args: list[str], *, cwd: Path | None = None, timeout: float = 240) \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blackbox_vqa", *args], env=_env(),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _load_run(run: Path) -> dict[str, tuple[dict[str, object], dict[str, bytes]]]:
    """Per item file: its meta without the timings, and each array's raw bytes."""
    out = {}
    for path in sorted((run / "items").glob("*.npz")):
        with np.load(path) as archive:
            meta = json.loads(str(archive["meta"][()]))
            meta.pop("seconds", None)
            out[path.name] = (meta, {k: archive[k].tobytes() for k in archive.files
                                     if k != "meta"})
    return out


BASE = ["evaluate", "--dataset", "easyvqa:test", "--seed", "3", "--grid", "4"]


def test_a_ray_run_stores_what_a_serial_run_stores(cluster: Cluster, tmp_path: Path) -> None:
    args = [*BASE, "--model", "eval_toys:torch_toy", "--limit", "4",
            "--methods", "occlusion,guided-bp"]
    serial = _bbvqa([*args, "--out", str(tmp_path / "serial")])
    assert serial.returncode == 0, serial.stderr
    ray_run = _bbvqa([*args, *cluster.options(), "--workers", "2",
                      "--out", str(tmp_path / "ray")])
    assert ray_run.returncode == 0, ray_run.stderr
    local, remote = _load_run(tmp_path / "serial"), _load_run(tmp_path / "ray")
    assert list(local) == list(remote) and len(local) == 4
    for name, (meta, arrays) in local.items():
        assert remote[name][0] == meta  # everything but the timings
        assert {"occlusion.image", "occlusion.words", "guided-bp.image",
                "guided-bp.words"} <= set(arrays)
        assert remote[name][1] == arrays  # byte for byte
    results = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert results["timing"]["executor"] == "ray"
    assert results["timing"]["worker_deaths"] == 0
    assert json.loads((tmp_path / "serial" / "results.json").read_text())[
        "human_attention"] == results["human_attention"]


def _stored(run: Path) -> set[str]:
    return {p.name for p in (run / "items").glob("*.npz")} if (run / "items").exists() \
        else set()


def test_a_worker_killed_mid_run_loses_only_its_item(cluster: Cluster, tmp_path: Path) -> None:
    pids = cluster.folder / "pids"
    for old in pids.glob("*") if pids.exists() else []:
        old.unlink()
    run = tmp_path / "run"
    args = [*BASE, "--model", "ray_toys:pid_brightness", "--limit", "8", "--methods",
            "occlusion", "--shared-fs", *cluster.options(), "--workers", "2",
            "--out", str(run)]
    child = subprocess.Popen([sys.executable, "-m", "blackbox_vqa", *args], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(_stored(run)) < 1 or not pids.exists() or not list(pids.iterdir()):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "no item stored in time"
            time.sleep(0.05)
        victim = int(sorted(pids.iterdir())[0].name)
        before = len(_stored(run))
        os.kill(victim, signal.SIGKILL)
        _, err = child.communicate(timeout=240)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert before < 8  # it was killed mid-run
    assert len(_stored(run)) == 8
    assert not [p for p in (run / "items").iterdir() if p.suffix != ".npz"]
    records = _load_run(run)
    assert all(meta["status"] == "done" for meta, _ in records.values())
    timing = json.loads((run / "results.json").read_text())["timing"]
    assert timing["worker_deaths"] == 1 and timing["items_failed"] == 0
    assert timing["items_retried"] <= 1  # only the item it was running counts a try
    # The retried items are the same as a serial run's.
    serial = tmp_path / "serial"
    code, _, err = run_cli([*BASE, "--model", "eval_toys:slow_brightness", "--limit", "8",
                            "--methods", "occlusion", "--out", str(serial)])
    assert code == 0, err
    assert _load_run(serial) == records


def test_an_item_that_kills_every_worker_is_recorded_as_failed(
    cluster: Cluster, tmp_path: Path
) -> None:
    from blackbox_vqa.datasets import select_items
    from blackbox_vqa.datasets.easyvqa import list_easyvqa

    chosen = select_items(list_easyvqa("test").items, limit=4, seed=3)
    questions = [item.question for item in chosen]
    victim = next(item for item in chosen if questions.count(item.question) == 1)
    poison = cluster.folder / "poison"
    poison.write_text(victim.question)
    run = tmp_path / "run"
    try:
        result = _bbvqa([*BASE, "--model", "ray_toys:poisoned_brightness", "--limit", "4",
                         "--methods", "occlusion", *cluster.options(), "--workers", "2",
                         "--out", str(run)])
    finally:
        poison.unlink()
    assert result.returncode == 0, result.stderr
    assert "1 items failed (their Ray workers kept dying)" in result.stderr
    records = _load_run(run)
    assert len(records) == 4
    failed = records[f"{victim.key}.npz"][0]
    assert failed["status"] == "failed"
    assert failed["reason"].startswith("its Ray worker died on each of 3 tries (")
    assert all(meta["status"] == "done" for name, (meta, _) in records.items()
               if name != f"{victim.key}.npz")
    results = json.loads((run / "results.json").read_text())
    assert results["timing"]["worker_deaths"] == 3
    assert results["timing"]["items_failed"] == 1
    assert list(results["items"]["skipped_in_run"].values()) == [1]


def _item_files(run: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (run / "items").glob("*.npz")}


def test_a_driver_killed_with_sigkill_resumes_on_the_cluster(
    cluster: Cluster, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = [*BASE, "--model", "eval_toys:slow_brightness", "--limit", "8", "--methods",
            "occlusion", *cluster.options(), "--workers", "2", "--out", str(run)]
    child = subprocess.Popen([sys.executable, "-m", "blackbox_vqa", *args], env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(_stored(run)) < 2:
            assert child.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no items stored in time"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    before = _item_files(run)
    assert 2 <= len(before) < 8
    again = _bbvqa(args)
    assert again.returncode == 0, again.stderr
    assert f"{len(before)} stored earlier, {8 - len(before)} to evaluate" in again.stderr
    after = _item_files(run)
    assert len(after) == 8 and {k: after[k] for k in before} == before
    assert not [p for p in (run / "items").iterdir() if p.suffix != ".npz"]


def test_without_an_address_a_local_ray_instance_runs_the_items(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _bbvqa([*BASE, "--model", "eval_toys:slow_brightness", "--limit", "2",
                     "--methods", "occlusion", "--executor", "ray", "--out", str(run)])
    assert result.returncode == 0, result.stderr
    assert len(_stored(run)) == 2
    timing = json.loads((run / "results.json").read_text())["timing"]
    assert timing["executor"] == "ray" and timing["address"] == "local"


def test_compare_on_the_cluster_gives_the_serial_comparison(
    cluster: Cluster, tmp_path: Path
) -> None:
    from test_compare_executors import BASE as COMPARE
    from test_compare_executors import without_timings

    serial = _bbvqa([*COMPARE, "--out", str(tmp_path / "serial")])
    assert serial.returncode == 0, serial.stderr
    remote = _bbvqa([*COMPARE, *cluster.options(), "--workers", "2",
                     "--out", str(tmp_path / "ray")])
    assert remote.returncode == 0, remote.stderr
    docs = [json.loads((tmp_path / run / "comparison.json").read_text())
            for run in ("serial", "ray")]
    assert len(docs[0]["items"]) == 3
    assert without_timings(docs[1]) == without_timings(docs[0])


def test_an_unreachable_cluster_is_one_line_exit_1(tmp_path: Path) -> None:
    port = _free_port(HEAD_IP)  # nothing listens there
    code, out, err = run_cli([*BASE, "--model", "toys:brightness_model", "--limit", "1",
                              "--executor", "ray", "--ray-address", f"{HEAD_IP}:{port}",
                              "--out", str(tmp_path / "run")])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(
        f"bbvqa: error: cannot reach the Ray cluster at {HEAD_IP}:{port}:")


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_an_address_that_accepts_tcp_but_is_not_ray_is_refused_before_the_run_folder(
    reply: bytes, tmp_path: Path,
) -> None:
    import threading

    server = socket.create_server((HEAD_IP, 0))
    port = server.getsockname()[1]
    held: list[socket.socket] = []

    def serve() -> None:  # accepts, reads, answers HTTP/1 or nothing, never closes
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            if reply:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    try:
        started = time.monotonic()
        code, out, err = run_cli([*BASE, "--model", "toys:brightness_model", "--limit", "1",
                                  "--executor", "ray", "--ray-address", f"{HEAD_IP}:{port}",
                                  "--out", str(tmp_path / "run")])
        assert time.monotonic() - started < 120  # the probe's 10 s, not Ray's minutes
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert code == 1 and out == "", err
    assert err.count("\n") == 1 and "is not a Ray cluster" in err
    assert not (tmp_path / "run").exists()


def test_ray_options_without_the_ray_executor_are_refused(tmp_path: Path) -> None:
    code, out, err = run_cli([*BASE, "--model", "toys:brightness_model", "--limit", "1",
                              "--shared-fs", "--ray-address", "auto",
                              "--out", str(tmp_path / "run")])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--ray-address, --shared-fs only apply with --executor ray" in err


FACTORY = '''
from toys import BrightnessModel


def factory():
    return BrightnessModel()
'''


def test_a_factory_the_workers_cannot_import_is_one_clear_line(
    cluster: Cluster, tmp_path: Path
) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "bbvqa_private_model.py").write_text(FACTORY)
    elsewhere = tmp_path / "elsewhere"  # the driver's working directory: Ray adds it to
    elsewhere.mkdir()  # the workers' sys.path, so it must not hold the module
    args = [*BASE, "--model", "bbvqa_private_model:factory", "--limit", "2", "--methods",
            "occlusion", *cluster.options(), "--out"]
    failed = _bbvqa([*args, str(tmp_path / "a")], cwd=elsewhere)
    assert failed.returncode == 1
    last = failed.stderr.splitlines()[-1]
    assert last.startswith("bbvqa: error: cannot import 'bbvqa_private_model' for model "
                           "spec 'bbvqa_private_model:factory'")
    assert last.endswith("on the Ray workers; ship the module's folder with "
                         "--ray-working-dir DIR, or install it on every node")
    shipped_run = _bbvqa([*args, str(tmp_path / "b"), "--ray-working-dir", str(shipped)],
                         cwd=elsewhere)
    assert shipped_run.returncode == 0, shipped_run.stderr
    assert len(_stored(tmp_path / "b")) == 2

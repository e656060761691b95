"""Throughput and peak memory of ``bbvqa evaluate``: local processes vs Ray actors.

Each repeat runs the command once per configuration (``--configs``, default
``local:1,local:2``; add ``ray:1,ray:2`` for Ray actors), side by side, each into a fresh
run folder, as a separate process (``python -m blackbox_vqa evaluate ...``). Ray runs go
to a Ray head node this script starts on 127.0.0.2 (loopback; token authentication with a
token of its own; ``--ray-cpus`` CPUs) and stops at the end, unless ``--ray-address``
names a running cluster: the cluster's start-up is not counted, as it would not be on a
cluster that is already up; starting the actors and loading their models is. Reported per
configuration (median over repeats):

- items/s: items evaluated / seconds spent evaluating them (``timing`` in results.json:
  from the executor's start to the last item stored; excludes start-up and the report);
- steady items/s: items between the first and the last item stored over that time (the
  item files' modification times), once every worker is up; steady s/item its inverse;
- in-worker s/item: the mean time an item spends inside ``ItemEvaluator.evaluate``
  (``total_s_mean``); with one worker, steady s/item minus it is what each item costs
  beyond its own evaluation (the executor's per-item overhead, where it is not hidden by
  running beside the evaluation);
- wall s: the whole command, start-up and report included;
- peak memory: the largest sum of resident set sizes over the command, its children (the
  local worker processes) and every Ray actor process of this evaluation
  (``ray::_Worker``), sampled every 20 ms from /proc;
- load: the 1-minute load average (``/proc/loadavg``) before each run, as the machine is
  shared.

Usage::

    python benchmarks/evaluate_throughput.py --model easyvqa --dataset easyvqa:test \\
        --limit 100 --methods occlusion,guided-bp --repeats 3 \\
        --configs local:1,local:2,ray:1,ray:2
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY_HEAD_IP = "127.0.0.2"
ACTOR_TITLE = "ray::_Worker"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _actors() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if command.startswith(ACTOR_TITLE.encode()):
            found.append(int(entry.name))
    return found


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_kib(pid: int, *, actors: bool) -> int:
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _rss_kib(current)
        stack.extend(_children(current))
    if actors:
        total += sum(_rss_kib(actor) for actor in _actors())
    return total


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextmanager
def ray_head(cpus: int, env: dict[str, str]) -> Iterator[str]:
    """A Ray head node on 127.0.0.2 for the benchmark; stops only its own processes."""
    folder = Path(tempfile.mkdtemp(prefix="bbvqa-bench-ray-", dir="/tmp"))
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0")
    port = _free_port(RAY_HEAD_IP)
    child = subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address", RAY_HEAD_IP, "--port", str(port),
         "--num-cpus", str(cpus), "--include-dashboard=false", "--disable-usage-stats",
         "--temp-dir", str(folder / "t")],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = child.communicate(timeout=180)
        if child.returncode != 0:
            raise SystemExit(f"ray start failed: {out.decode()[-2000:]}")
        yield f"{RAY_HEAD_IP}:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(5)
        shutil.rmtree(folder, ignore_errors=True)


def run_once(args: argparse.Namespace, config: tuple[str, int], out: Path,
             env: dict[str, str], address: str | None) -> dict[str, float]:
    executor, workers = config
    command = [sys.executable, "-m", "blackbox_vqa", "evaluate", "--model", args.model,
               "--dataset", args.dataset, "--limit", str(args.limit), "--methods",
               args.methods, "--grid", str(args.grid), "--workers", str(workers),
               "--threads", str(args.threads), "--out", str(out)]
    if executor == "ray":
        command += ["--executor", "ray", "--ray-address", str(address),
                    "--ray-node-ip", RAY_HEAD_IP]
    load = _load()
    peak = 0
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kib(child.pid, actors=executor == "ray"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = child.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"command failed ({child.returncode}): {err.decode()[-2000:]}")
    timing = json.loads((out / "results.json").read_text())["timing"]
    return {"items_per_s": timing["items_per_second"], "steady_per_s": _steady(out),
            "in_worker_s": timing["total_s_mean"], "wall_s": wall, "peak_mib": peak / 1024,
            "load": load}


def _steady(out: Path) -> float:
    """Items per second between the first and the last item stored (from the item files'
    modification times): the rate once every worker is up, start-up left out."""
    times = sorted(p.stat().st_mtime for p in (out / "items").glob("*.npz"))
    return (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else 0.0


def _configs(text: str) -> list[tuple[str, int]]:
    found = []
    for part in text.split(","):
        executor, _, workers = part.strip().partition(":")
        if executor not in ("local", "ray") or not workers.isdigit():
            raise SystemExit(f"--configs: use local:N or ray:N, got {part!r}")
        found.append((executor, int(workers)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="easyvqa")
    parser.add_argument("--dataset", default="easyvqa:test")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--methods", default="occlusion,guided-bp")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="local:1,local:2")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--ray-cpus", type=int, default=2)
    args = parser.parse_args()
    configs = _configs(args.configs)
    env = dict(os.environ)
    results: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp, _cluster(args, configs, env) as address:
        for repeat in range(args.repeats):
            for config in configs:
                out = Path(tmp) / f"run-{config[0]}-{config[1]}-{repeat}"
                results[config].append(run_once(args, config, out, env, address))
                print(f"repeat {repeat} {config[0]}:{config[1]}: {results[config][-1]}",
                      file=sys.stderr)
    print(f"machine: {os.cpu_count()} CPUs; command: {' '.join(sys.argv)}")
    print("| executor | workers | items/s (median) | items/s per repeat | steady items/s "
          "(median) | steady s/item | in-worker s/item | wall s (median) | "
          "peak memory MiB (max) | load before runs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (executor, workers), runs in results.items():
        speed = statistics.median(r["items_per_s"] for r in runs)
        steady = statistics.median(r["steady_per_s"] for r in runs)
        each = ", ".join(f"{r['items_per_s']:.2f}" for r in runs)
        loads = ", ".join(f"{r['load']:.1f}" for r in runs)
        inside = statistics.median(r["in_worker_s"] for r in runs)
        print(f"| {executor} | {workers} | {speed:.2f} | {each} | {steady:.2f} | "
              f"{1 / steady:.4f} | {inside:.4f} | "
              f"{statistics.median(r['wall_s'] for r in runs):.1f} | "
              f"{max(r['peak_mib'] for r in runs):.0f} | {loads} |")


@contextmanager
def _cluster(args: argparse.Namespace, configs: list[tuple[str, int]],
             env: dict[str, str]) -> Iterator[str | None]:
    if not any(executor == "ray" for executor, _ in configs):
        yield None
    elif args.ray_address is not None:
        yield args.ray_address
    else:
        with ray_head(args.ray_cpus, env) as address:
            yield address


if __name__ == "__main__":
    main()

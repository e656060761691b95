"""Throughput and peak memory of ``bbvqa evaluate`` at ``--workers 1`` and ``2``.

Each repeat runs the same command once per worker count, side by side, each into a fresh
run folder, as a separate process (``python -m blackbox_vqa evaluate ...``). Reported per
worker count (median over repeats):

- items/s: items evaluated / seconds spent evaluating them (``timing`` in results.json:
  from the first item started to the last stored; excludes start-up and the final report);
- wall s: the whole command, start-up and report included;
- peak memory: the largest sum of resident set sizes over the process and its children
  (the worker processes), sampled every 20 ms from /proc.

Usage::

    python benchmarks/evaluate_throughput.py --model easyvqa --dataset easyvqa:test \\
        --limit 100 --methods occlusion,guided-bp --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


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


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_kib(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _rss_kib(current)
        stack.extend(_children(current))
    return total


def run_once(args: argparse.Namespace, workers: int, out: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "blackbox_vqa", "evaluate", "--model", args.model,
               "--dataset", args.dataset, "--limit", str(args.limit), "--methods",
               args.methods, "--workers", str(workers), "--threads", str(args.threads),
               "--out", str(out)]
    peak = 0
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kib(child.pid))
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
    return {"items_per_s": timing["items_per_second"], "wall_s": wall,
            "peak_mib": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="easyvqa")
    parser.add_argument("--dataset", default="easyvqa:test")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--methods", default="occlusion,guided-bp")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for workers in (1, 2):
                out = Path(tmp) / f"run-{workers}-{repeat}"
                results[workers].append(run_once(args, workers, out))
                print(f"repeat {repeat} workers {workers}: {results[workers][-1]}",
                      file=sys.stderr)
    print(f"machine: {os.cpu_count()} CPUs; command: {' '.join(sys.argv)}")
    print("| workers | items/s (median) | wall s (median) | peak memory MiB (max) |")
    print("| --- | --- | --- | --- |")
    for workers, runs in results.items():
        print(f"| {workers} | {statistics.median(r['items_per_s'] for r in runs):.2f} | "
              f"{statistics.median(r['wall_s'] for r in runs):.1f} | "
              f"{max(r['peak_mib'] for r in runs):.0f} |")
    ratio = (statistics.median(r["items_per_s"] for r in results[2])
             / statistics.median(r["items_per_s"] for r in results[1]))
    print(f"speed-up of 2 workers over 1: {ratio:.2f}x")


if __name__ == "__main__":
    main()

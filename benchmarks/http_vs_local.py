"""HTTP vs local (issue 4): the same occlusion explanation through ``bbvqa serve`` on
loopback and through the local adapter, side by side in one run.

- ``local``: ``Occlusion(adapter, grid=16).explain(image, question)`` on the model's
  ``TorchAdapter`` in this process;
- ``http``: ``bbvqa serve --model http_vs_local:served_model --port 0`` runs in a
  subprocess (same model, same weights, same torch thread count); each run builds a fresh
  ``HttpAdapter(url)`` with the default concurrency (what ``bbvqa explain --model
  http://...`` does: fetch ``/v1/info``, then every perturbed input over the wire, nothing
  cached from an earlier run) and explains the same input.

Every repeat runs both, alternating which goes first; figures are medians over repeats and
the ratio is between medians of the same run. CPU seconds (this process, plus the server
process for HTTP runs, from ``/proc``) are reported beside wall time: on a machine whose
cores are busy with other work, wall time follows CPU time. The maps of every HTTP run are
compared with the local ones (largest absolute difference; the target is <= 1e-6).

The model is ``models.build_model(NAME)`` (``reference``: the shipped easy-VQA model, or a
random stand-in of the same architecture until its weights exist; ``resnet18``).

Run ``python benchmarks/http_vs_local.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL_ENV = "BBVQA_BENCH_MODEL"
THREADS_ENV = "BBVQA_BENCH_THREADS"


def served_model() -> Any:
    """Factory for ``bbvqa serve``: the benchmark model named by ``$BBVQA_BENCH_MODEL``."""
    import torch

    from models import build_model

    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    return build_model(os.environ.get(MODEL_ENV, "reference")).adapter


def start_server(model: str, threads: int) -> tuple[subprocess.Popen[str], str]:
    """``bbvqa serve`` in a subprocess on a free loopback port; returns it and its URL."""
    src = HERE.parent / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(src), os.environ.get("PYTHONPATH", "")]),
        MODEL_ENV: model,
        THREADS_ENV: str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "blackbox_vqa", "serve", "--model", "http_vs_local:served_model",
         "--port", "0"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r" on (http://\S+) ", line)
    if not match:
        proc.kill()
        raise SystemExit(f"bbvqa serve did not start: {line}{proc.stderr.read()}")
    return proc, match.group(1)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(run: Callable[[], Any], server: int) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds (this process + the server's) and the result of ``run``."""
    cpu, server_cpu = time.process_time(), process_cpu(server)
    started = time.perf_counter()
    result = run()
    wall = time.perf_counter() - started
    return wall, time.process_time() - cpu + process_cpu(server) - server_cpu, result


def max_diff(a: Any, b: Any) -> float:
    import numpy as np

    return float(max(np.abs(a.image_map - b.image_map).max(),
                     np.abs(a.word_map - b.word_map).max(),
                     np.abs(a.scores - b.scores).max()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="reference", help="reference or resnet18")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--concurrency", default="default",
                        help="comma-separated --http-concurrency values to compare; "
                        "'default' is the adapter's default")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from blackbox_vqa.adapters.http.config import Limits
    from blackbox_vqa.adapters.http.endpoint import HttpAdapter
    from blackbox_vqa.explainers.occlusion import Occlusion
    from models import build_model

    torch.set_num_threads(args.threads)
    case = build_model(args.model)
    levels: list[int | None] = [None if v.strip() == "default" else int(v)
                                for v in args.concurrency.split(",")]
    proc, url = start_server(args.model, args.threads)
    try:
        def local() -> Any:
            return Occlusion(case.adapter, grid=args.grid).explain(case.image, case.question)

        def remote(concurrency: int | None) -> Callable[[], Any]:
            def run() -> Any:
                limits = None if concurrency is None else Limits(concurrency=concurrency)
                with HttpAdapter(url, limits=limits) as adapter:
                    adapter.prepare(case.image, case.question)  # as bbvqa explain does
                    return Occlusion(adapter, grid=args.grid).explain(case.image, case.question)
            return run

        reference = local()  # warm-up, and the maps every HTTP run is compared with
        for level in levels:
            remote(level)()
        times: dict[str, list[float]] = {"local": []}
        cpus: dict[str, list[float]] = {"local": []}
        diffs: dict[str, float] = {}
        for repeat in range(args.repeats):
            order: list[tuple[str, Callable[[], Any]]] = [("local", local)]
            order += [(f"http@{level or 'default'}", remote(level)) for level in levels]
            if repeat % 2:
                order.reverse()
            for name, run in order:
                seconds, cpu, result = timed(run, proc.pid)
                times.setdefault(name, []).append(seconds)
                cpus.setdefault(name, []).append(cpu)
                if name != "local":
                    diffs[name] = max(diffs.get(name, 0.0), max_diff(result, reference))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpus.items()}
    evaluations = reference.evaluations
    print(f"model: {case.description}")
    print(f"explanation: grid {args.grid}, {evaluations} evaluations, batch "
          f"{reference.batch_size}; torch threads {args.threads} (client and server); "
          f"{args.repeats} repeats")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    print(f"{'run':<14}{'median s':>10}{'vs local':>10}{'CPU s':>8}{'vs local':>10}"
          f"{'max |diff|':>13}   all runs (s)")
    for name, values in times.items():
        ratio = medians[name] / medians["local"]
        cpu_ratio = cpu_medians[name] / cpu_medians["local"]
        diff = f"{diffs[name]:.2e}" if name in diffs else "-"
        runs = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:<14}{medians[name]:>10.3f}{ratio:>10.2f}{cpu_medians[name]:>8.3f}"
              f"{cpu_ratio:>10.2f}{diff:>13}   {runs}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": case.description, "grid": args.grid, "evaluations": evaluations,
            "threads": args.threads, "times": times, "medians": medians,
            "cpu_seconds": cpus, "cpu_medians": cpu_medians,
            "max_abs_diff": diffs,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()

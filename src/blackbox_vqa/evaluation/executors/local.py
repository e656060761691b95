"""The local executor: items run in this process, or in ``workers`` spawned processes.

Each process loads the work once (``config.load()``, at the first item it gets) and runs
torch with ``config.threads`` CPU threads; results come back to this process as they
finish.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from blackbox_vqa.datasets import Item
from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.executors import ItemWork, WorkConfig
from blackbox_vqa.evaluation.workers import set_torch_threads

__all__ = ["LocalExecutor"]

_WORKER: ItemWork | None = None


def _worker_evaluate(config: WorkConfig, item: Item) -> Any:
    global _WORKER
    if _WORKER is None:
        _WORKER = config.load()
        set_torch_threads(config.threads)
    return _WORKER.evaluate(item)


class LocalExecutor:
    """``workers == 1``: items run here (with ``evaluator`` if given, else one loaded from
    the spec); ``workers > 1``: in that many spawned processes."""

    def __init__(self, *, workers: int = 1, evaluator: ItemWork | None = None) -> None:
        if workers < 1:
            raise InputError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self.evaluator = evaluator

    def describe(self) -> Mapping[str, Any]:
        return {"executor": "local", "workers": self.workers}

    def run(
        self,
        items: Sequence[Item],
        config: WorkConfig,
        on_result: Callable[[Any], None],
    ) -> None:
        """Evaluate ``items``, calling ``on_result`` here as each one finishes. Torch runs
        with ``config.threads`` threads in every process (restored here afterwards)."""
        if not items:
            return
        if self.workers == 1:
            local = self.evaluator or config.load()
            previous = set_torch_threads(config.threads)
            try:
                for item in items:
                    on_result(local.evaluate(item))
            finally:
                set_torch_threads(previous)
            return
        _run_processes(items, config, on_result, self.workers)


def _run_processes(
    items: Sequence[Item],
    config: WorkConfig,
    on_result: Callable[[Any], None],
    workers: int,
) -> None:
    import multiprocessing

    from blackbox_vqa.evaluation.workers import die_with_parent

    context = multiprocessing.get_context("spawn")
    queue = list(reversed(items))
    pending: set[Future[Any]] = set()
    # Workers end with this process, even when it is killed outright (SIGKILL).
    pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context,
                               initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                pending.add(pool.submit(_worker_evaluate, config, queue.pop()))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                on_result(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

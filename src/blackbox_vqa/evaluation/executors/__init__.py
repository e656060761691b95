"""Where items are evaluated: an executor runs :class:`~blackbox_vqa.evaluation.runner.
ItemEvaluator` over items and hands each record back to the caller's process as it
finishes, in any order.

- ``local`` (:mod:`.local`): here, or in ``--workers`` spawned processes;
- ``ray`` (:mod:`.ray_cluster`): in Ray actors on a cluster (or a Ray instance started
  here), each loading the model once.

The caller (``bbvqa evaluate``) writes each record to the run store; the executors know
nothing of it. Every record depends only on the item, the model and the settings, so the
executor never changes a result. A new executor is one module here that satisfies
:class:`Executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from blackbox_vqa.datasets import Item
    from blackbox_vqa.evaluation.runner import EvalConfig
    from blackbox_vqa.evaluation.runstore import ItemRecord

__all__ = ["EXECUTORS", "Executor"]

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs items; ``on_record`` is called in the caller's process, once per item."""

    def run(
        self,
        items: Sequence[Item],
        config: EvalConfig,
        on_record: Callable[[ItemRecord], None],
    ) -> None:
        """Evaluate ``items``; raise the typed error of a failure that stops the run."""
        ...

    def describe(self) -> Mapping[str, Any]:
        """JSON-ready facts about the last run (executor, workers, retries...)."""
        ...

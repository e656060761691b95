"""Where items are evaluated: an executor runs a piece of per-item work over items and
hands each result back to the caller's process as it finishes, in any order.

The work is described by a picklable :class:`WorkConfig` (``bbvqa evaluate``'s
:class:`~blackbox_vqa.evaluation.runner.EvalConfig`, ``bbvqa compare``'s
:class:`~blackbox_vqa.comparison.CompareConfig`): each worker calls its ``load()`` once
(loading the models) and then ``evaluate(item, files=...)`` per item.

- ``local`` (:mod:`.local`): here, or in ``--workers`` spawned processes;
- ``ray`` (:mod:`.ray_cluster`): in Ray actors on a cluster (or a Ray instance started
  here), each loading the models once.

The caller writes the results (``bbvqa evaluate``: to the run store); the executors know
nothing of it. A result depends only on the item, the models and the settings, so the
executor never changes one. A new executor is one module here that satisfies
:class:`Executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from blackbox_vqa.datasets import Item

__all__ = ["EXECUTORS", "Executor", "ItemWork", "WorkConfig"]

EXECUTORS = ("local", "ray")


class ItemWork(Protocol):
    """The loaded work of one worker."""

    @property
    def unavailable(self) -> Mapping[str, str]:
        """Methods that cannot run, with the reason (reported once)."""
        ...

    def evaluate(self, item: Item, *, files: Mapping[str, bytes] | None = None) -> Any:
        """The result of ``item`` (``files``: its files' bytes, read on another machine).
        Must be picklable and must raise only for a failure that stops the run."""
        ...


class WorkConfig(Protocol):
    """Picklable description of the work; ``threads``: torch CPU threads per worker."""

    @property
    def threads(self) -> int | None:
        ...

    def load(self) -> ItemWork:
        """Load the models (once per worker)."""
        ...

    def failed(self, item: Item, reason: str, detail: str) -> Any:
        """The result of an item that no worker could finish (every worker evaluating it
        died): ``reason`` is the same for every such item, ``detail`` is this one's."""
        ...


class Executor(Protocol):
    """Runs items; ``on_result`` is called in the caller's process, once per item."""

    def run(
        self,
        items: Sequence[Item],
        config: WorkConfig,
        on_result: Callable[[Any], None],
    ) -> None:
        """Evaluate ``items``; raise the typed error of a failure that stops the run."""
        ...

    def describe(self) -> Mapping[str, Any]:
        """JSON-ready facts about the last run (executor, workers, retries...)."""
        ...

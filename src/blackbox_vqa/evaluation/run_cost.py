"""The model inputs a run will send, added up over its methods and metrics.

It sits with the evaluation because it adds the metrics' cost to the methods'.

``bbvqa explain`` prints :func:`total_line` before any input is sent (``--dry-run``, HTTP
models): the original input, each method's :class:`~blackbox_vqa.explainers.cost.CallEstimate`
and, with ``--metrics``, the faithfulness metrics on each method's maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.metrics import metric_inputs
from blackbox_vqa.explainers.cost import CallEstimate, CostQuery
from blackbox_vqa.explainers.registry import MethodSettings, get_method

__all__ = ["RequestCount", "request_count", "total_line"]


@dataclass(frozen=True)
class RequestCount:
    """Inputs a run scores: ``total``; ``parts`` (label, inputs) in run order; ``exact``
    unless a method states an upper bound or metrics run (their random orders repeat
    inputs, which the HTTP client sends once); ``uncounted``: methods without an
    estimate."""

    total: int
    parts: tuple[tuple[str, int], ...]
    exact: bool
    uncounted: tuple[str, ...]


def request_count(height: int, width: int, words: int, names: Sequence[str],
                  settings: MethodSettings, *, metrics: bool) -> RequestCount:
    """Add up the original input, each named method's inputs and, with ``metrics``, the
    metrics' inputs on its maps."""
    query = CostQuery(height, width, words, settings)
    parts: list[tuple[str, int]] = [("original", 1)]
    measured = 0
    exact = True
    uncounted = []
    for name in names:
        calls = get_method(name).calls
        if calls is None:
            uncounted.append(name)
            continue
        estimate = calls(query)
        if not isinstance(estimate, CallEstimate):
            raise InputError(f"method {name!r}: calls must return a CallEstimate, got "
                             f"{estimate!r}")
        parts.append((name, estimate.inputs))
        exact = exact and estimate.exact
        if metrics:
            measured += metric_inputs(estimate, words)
    if metrics:
        parts.append(("metrics", measured))
        exact = False
    return RequestCount(sum(n for _, n in parts), tuple(parts), exact, tuple(uncounted))


def total_line(count: RequestCount) -> str:
    """One line: the total, its parts and what an endpoint taking one input per request
    receives."""
    bound = "" if count.exact else "at most "
    parts = " + ".join(f"{n} {label}" for label, n in count.parts)
    line = (f"total: {bound}{count.total} model inputs ({parts}); an endpoint that takes "
            f"one input per request gets at most {count.total} requests")
    if count.uncounted:
        line += f" (not counted, no count stated: {', '.join(count.uncounted)})"
    return line

"""Where a model's gradients come from: the model itself, or an exported PyTorch graph.

Gradient methods need the gradient protocol. A live PyTorch model has it; an ONNX file
has it when the PyTorch graph that ``bbvqa export`` writes lies beside it; anything else
(a bare third-party ONNX file, an HTTP endpoint) gets a reason that says how to get one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "find_gradient_source",
    "gradient_source_reason",
    "graph_beside",
    "no_gradients_reason",
]


def graph_beside(vqa: Any) -> Path | None:
    """The exported PyTorch graph next to an ONNX model's file, if there is one."""
    from blackbox_vqa.specs import GRAPH_SUFFIXES

    path = getattr(vqa, "path", None)
    if not isinstance(path, Path) or path.suffix.lower() != ".onnx":
        return None
    meta = getattr(vqa, "metadata", None)
    names = [meta.graph_file] if meta is not None and meta.graph_file else []
    names += [path.stem + suffix for suffix in GRAPH_SUFFIXES]
    for name in names:
        candidate = path.parent / name
        if candidate.is_file():
            return candidate
    return None


def _what(spec: str, vqa: Any) -> str:
    """What ``vqa`` is, for the reason: its kind's words (found by its adapter's module, or
    by its spec when it has one), else its class."""
    from blackbox_vqa.errors import InputError
    from blackbox_vqa.specs import kind_of, model_kinds

    kind = next((k for k in model_kinds() if type(vqa).__module__ in k.adapters), None)
    if kind is None:
        try:
            kind = kind_of(spec)
        except InputError:  # a label, not a spec (a model object passed from Python)
            kind = None
    if kind is not None and kind.no_gradients:
        return kind.no_gradients
    return f"a {type(vqa).__name__}, which offers no gradients (no gradient protocol)"


def no_gradients_reason(spec: str, vqa: Any, method: str = "guided backpropagation") -> str:
    """Why `spec` has no gradients, and how to get them (one line)."""
    what = _what(spec, vqa)
    return (
        f"{method} needs a PyTorch graph, and {spec} is {what}; get one with "
        "`bbvqa export --model SPEC --out DIR` on the PyTorch model (it writes model.onnx "
        "and the graph beside it) and pass that"
    )


def gradient_source_reason(
    spec: str, vqa: Any, method: str = "guided backpropagation"
) -> str | None:
    """None when ``vqa`` has gradients or an exported graph lies beside it (nothing is
    loaded), else why it has none."""
    from blackbox_vqa.adapters.gradients import has_gradients

    if has_gradients(vqa) or graph_beside(vqa) is not None:
        return None
    return no_gradients_reason(spec, vqa, method)


def find_gradient_source(
    spec: str, vqa: Any, method: str = "guided backpropagation"
) -> tuple[Any, str, str]:
    """``(model with the gradient protocol, where its gradients come from, "")``, or
    ``(None, "", reason)`` when there is none."""
    from blackbox_vqa.adapters.gradients import has_gradients

    if has_gradients(vqa):
        return vqa, "model", ""
    graph = graph_beside(vqa)
    if graph is not None:
        from blackbox_vqa.adapters.torch.graph import GraphAdapter

        source = GraphAdapter(graph)
        if list(source.answers) == list(vqa.answers):
            return source, str(graph), ""
    return None, "", no_gradients_reason(spec, vqa, method)

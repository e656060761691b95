"""The model's PyTorch graph, saved so that it runs and differentiates without its source.

Two formats, named by their suffix:

- ``.pt2``: a ``torch.export`` program. Used when export keeps the batch and the question
  length dynamic. With torch 2.13, ``torch.export`` specialises ``nn.LSTM`` on the
  sequence length, so recurrent question encoders cannot use it.
- ``.torchscript``: a graph traced with ``torch.jit.trace``. A traced ``nn.LSTM`` keeps
  variable batch and question lengths and its gradients are exact, so this is the
  format for recurrent encoders: ``auto`` picks it for models with an ``nn.LSTM``, ``GRU``
  or ``RNN``, and when ``torch.export`` fails or specialises a dimension.

The saved graph takes ``(images [B,3,H,W], tokens [B,T], word_offsets [B,T,D])`` and
returns logits ``[B, A]``; ``word_offsets`` is added to the output of the model's
``nn.Embedding`` so that word gradients can be taken from the graph alone (it is absent
when the model has no single ``nn.Embedding``). The metadata travels as extra files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from blackbox_vqa.adapters.torch.graph import load_graph
from blackbox_vqa.adapters.torch.hooks import embedding_offsets

__all__ = [
    "GRAPH_FORMATS",
    "GraphFormat",
    "GraphInputs",
    "graph_suffix",
    "load_graph",
    "save_graph",
]

GraphFormat = Literal["pt2", "torchscript"]
GRAPH_FORMATS: tuple[str, ...] = ("pt2", "torchscript")
_MAX_DIM = 1 << 16


def graph_suffix(fmt: str) -> str:
    """``".pt2"`` or ``".torchscript"``."""
    return ".pt2" if fmt == "pt2" else ".torchscript"


class GraphInputs(nn.Module):
    """``forward(images, tokens[, word_offsets])``: the user's module, with ``word_offsets``
    added to its embedding output. Holds the module; adds no parameters of its own."""

    def __init__(self, module: nn.Module, embedding: nn.Module | None) -> None:
        super().__init__()
        self.model = module
        # A list keeps the embedding out of the module tree (it is already in ``model``).
        self._embedding = [embedding] if embedding is not None else []

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, word_offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self._embedding or word_offsets is None:
            return self.model(images, tokens)  # type: ignore[no-any-return]
        with embedding_offsets(self._embedding[0], word_offsets):
            return self.model(images, tokens)  # type: ignore[no-any-return]


def save_graph(
    wrapper: GraphInputs,
    example: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    fmt: GraphFormat,
    props: Mapping[str, str],
) -> None:
    """Export ``wrapper`` on ``example`` inputs to ``path`` in format ``fmt``.

    Raises whatever the exporter raises (the caller turns it into one line).
    """
    extra = {key: value.encode("utf-8") for key, value in props.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            program = torch.export.export(
                wrapper, tuple(example), dynamic_shapes=_dynamic_shapes(len(example)),
                strict=False,
            )
            torch.export.save(program, str(path), extra_files=dict(props))
        else:
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                wrapper, tuple(example), check_trace=False
            )
            torch.jit.save(traced, str(path), _extra_files=extra)  # type: ignore[arg-type]


def _dynamic_shapes(n_inputs: int) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1, max=_MAX_DIM)
    tokens = torch.export.Dim("tokens", min=1, max=_MAX_DIM)
    shapes: list[dict[int, Any]] = [{0: batch}, {0: batch, 1: tokens}]
    if n_inputs == 3:
        shapes.append({0: batch, 1: tokens})
    return tuple(shapes)

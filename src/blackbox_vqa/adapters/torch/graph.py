"""GraphAdapter: a PyTorch graph exported by ``bbvqa export`` (``.pt2`` or ``.torchscript``).

The graph file alone is enough: answers, tokenizer and preprocessing come from its
metadata, and the graph's ``word_offsets`` input (added at the embedding output) gives
word gradients without the model's Python source. Probabilities and gradients, guided or
plain, work as in :class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`, which this class
extends; preprocessing is the same code, so inputs are bit-identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blackbox_vqa.adapters.base import OUTPUT_KINDS
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.errors import InputError, ModelLoadError, first_line
from blackbox_vqa.metadata import KEYS, ExportMetadata

__all__ = ["GraphAdapter", "load_graph"]


class _GraphModule(nn.Module):
    """``forward(images, tokens)`` over a loaded graph; zero word offsets unless set."""

    def __init__(self, graph: nn.Module, embedding_dim: int | None) -> None:
        super().__init__()
        self.graph = graph
        self.embedding_dim = embedding_dim
        self._offsets: torch.Tensor | None = None

    def train(self, mode: bool = True) -> _GraphModule:
        """Only this wrapper's flag: an exported graph is fixed in eval mode (and a
        ``torch.export`` module refuses ``train()``)."""
        self.training = mode
        return self

    @contextmanager
    def offsets(self, offsets: torch.Tensor) -> Iterator[None]:
        """Use ``offsets`` ``[B, T, D]`` in the forward passes of the block."""
        self._offsets = offsets
        try:
            yield
        finally:
            self._offsets = None

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.embedding_dim is None:
            return self.graph(images, tokens)  # type: ignore[no-any-return]
        offsets = self._offsets
        if offsets is None:
            shape = (*tokens.shape, self.embedding_dim)
            offsets = torch.zeros(shape, dtype=images.dtype, device=images.device)
        return self.graph(images, tokens, offsets)  # type: ignore[no-any-return]


class GraphAdapter(TorchAdapter):
    """Load an exported graph file and serve probabilities and gradients from it.

    Args:
        path: the ``.pt2`` or ``.torchscript`` file written by ``bbvqa export``.
        device: torch device; default CUDA when available, else CPU.
        name: display name (default: the source model's name from the metadata).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        name: str | None = None,
    ) -> None:
        target = torch.device(device) if device is not None else (
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.path = Path(path)
        graph, props = load_graph(self.path, target)
        if not ExportMetadata.present(props):
            raise ModelLoadError(
                f"{self.path} carries no blackbox_vqa metadata; export it with `bbvqa export`"
            )
        meta = ExportMetadata.from_props(props, source=str(self.path))
        if meta.output not in OUTPUT_KINDS:
            raise ModelLoadError(f"{self.path}: unknown output kind {meta.output!r}")
        self.metadata = meta
        pre = meta.preprocessing
        super().__init__(
            _GraphModule(graph, meta.word_embedding_dim),
            meta.answers,
            meta.word_tokenizer(),
            image_size=pre.image_size,
            mean=pre.mean,
            std=pre.std,
            output=meta.output,  # type: ignore[arg-type]
            device=target,
            name=name or meta.source_model or self.path.name,
        )

    def _word_offsets(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        dim = self.metadata.word_embedding_dim
        if dim is None:
            return None, "the exported graph has no word-embedding input (no single nn.Embedding)"
        zeros = torch.zeros((*tokens.shape, dim), dtype=torch.float32, device=self.device)
        return zeros.requires_grad_(True), ""

    def _logits_with_offsets(
        self, image_tensor: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor | None
    ) -> torch.Tensor:
        # No JIT optimisation: its autodiff subgraphs replace ReLU's backward
        # (threshold_backward) with their own formula, which guided mode could not see.
        module: _GraphModule = self.module  # type: ignore[assignment]
        with torch.jit.optimized_execution(False):  # type: ignore[attr-defined]
            if offsets is None:
                return self.logits(image_tensor, tokens)
            with module.offsets(offsets):
                return self.logits(image_tensor, tokens)


def load_graph(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, str]]:
    """Load a graph written by :func:`save_graph`: ``(module, metadata props)``.

    Raises :class:`ModelLoadError` for a missing or unreadable file.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"exported graph not found: {file}")
    extra: dict[str, Any] = dict.fromkeys(KEYS, "")
    try:
        if file.suffix == ".pt2":
            program = torch.export.load(str(file), extra_files=extra)
            module: nn.Module = program.module().to(device)
        else:
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(file), map_location=device, _extra_files=extra
            )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load exported graph {file}: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    props = {
        key: value.decode("utf-8") if isinstance(value, bytes) else str(value)
        for key, value in extra.items()
        if value
    }
    return module, props

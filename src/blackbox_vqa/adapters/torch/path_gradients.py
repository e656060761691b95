"""The path-gradient protocol: gradients at many points between an input and a baseline.

Integrated gradients (and any path method) needs the gradient of one answer's score at a
batch of inputs that are not images or questions but points in the model's own input
space: the preprocessed image tensor and the word-embedding vectors. A model offers this
with two methods:

- ``gradient_inputs(image, question)`` returns :class:`GradientInputs`: the model-space
  image ``[3, H, W]``, the token embeddings ``[T, D]``, the padding token's embedding
  ``[D]`` (the word baseline), which token positions make up each question word, and the
  scores on the input;
- ``path_gradients(inputs, images, embeddings, answer_index)`` takes a batch of points
  ``images [N, 3, H, W]`` and ``embeddings [N, T, D]`` for the same question and returns
  :class:`PathGradients`: the score of the answer at each point and its gradients.

:class:`~blackbox_vqa.adapters.torch.module.TorchAdapter` implements it with the functions
below (the word embeddings are replaced at the output of the module's only
``nn.Embedding``); :class:`~blackbox_vqa.adapters.hf.vqa.HfAdapter` at the output of
``get_input_embeddings()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.torch.hooks import embedding_output_hook
from blackbox_vqa.errors import BlackboxVQAError, InputError, ModelError
from blackbox_vqa.images import ImageInput

__all__ = [
    "GradientInputs",
    "PathGradientModel",
    "PathGradients",
    "embedding_replaced",
    "has_path_gradients",
    "score_gradients",
]


@dataclass(frozen=True)
class GradientInputs:
    """One image and question in the model's differentiable coordinates.

    Attributes:
        question: the (stripped) question.
        image: ``float32 [3, H, W]`` preprocessed image tensor (model resolution).
        embeddings: ``float32 [T, D]`` word-embedding vector of each of the ``T`` tokens
            (``D == 0`` when the model has no usable word embedding; see ``words_note``).
        pad_embedding: ``float32 [D]`` embedding of the padding token (the word baseline).
        word_positions: for each word of the question (``text.split_words``), the token
            positions that belong to it (several for sub-words; none for a word the
            tokenizer dropped). Positions in no word (``[CLS]``, ``?``...) stay fixed on
            a path.
        token_ids: the ``T`` token ids.
        scores: ``float64 [A]`` scores on the input.
        words_note: why there are no word embeddings (empty otherwise).
    """

    question: str
    image: NDArray[np.float32]
    embeddings: NDArray[np.float32]
    pad_embedding: NDArray[np.float32]
    word_positions: tuple[tuple[int, ...], ...]
    token_ids: tuple[int, ...]
    scores: NDArray[np.float64]
    words_note: str = ""

    @property
    def predicted_index(self) -> int:
        """Index of the highest-scoring answer on the input."""
        return int(np.argmax(self.scores))


@dataclass(frozen=True)
class PathGradients:
    """Score of one answer and its gradients at ``N`` points.

    Attributes:
        scores: ``float64 [N]`` score of the answer at each point.
        image: ``float32 [N, 3, H, W]`` gradient with respect to the image tensor.
        embeddings: ``float32 [N, T, D]`` gradient with respect to the token embeddings.
    """

    scores: NDArray[np.float64]
    image: NDArray[np.float32]
    embeddings: NDArray[np.float32]


@runtime_checkable
class PathGradientModel(Protocol):
    """A model that gives gradients at points of its own input space (see module doc)."""

    @property
    def answers(self) -> Sequence[str]: ...

    def gradient_inputs(self, image: ImageInput, question: str) -> GradientInputs: ...

    def path_gradients(
        self,
        inputs: GradientInputs,
        images: NDArray[np.float32],
        embeddings: NDArray[np.float32],
        answer_index: int,
    ) -> PathGradients: ...


def has_path_gradients(model: object) -> bool:
    """Whether ``model`` offers the path-gradient protocol."""
    return isinstance(model, PathGradientModel)


def check_points(
    inputs: GradientInputs, images: NDArray[Any], embeddings: NDArray[Any]
) -> None:
    """Raise :class:`InputError` unless ``images``/``embeddings`` are ``N`` points of ``inputs``."""
    if images.ndim != 4 or images.shape[1:] != inputs.image.shape:
        raise InputError(
            f"images must have shape [N, {', '.join(map(str, inputs.image.shape))}], "
            f"got {list(images.shape)}"
        )
    if embeddings.shape != (images.shape[0], *inputs.embeddings.shape):
        raise InputError(
            f"embeddings must have shape [{images.shape[0]}, "
            f"{', '.join(map(str, inputs.embeddings.shape))}], got {list(embeddings.shape)}"
        )


@contextmanager
def embedding_replaced(
    embedding: nn.Module | None, values: torch.Tensor | None
) -> Iterator[None]:
    """Within the block, ``embedding``'s output is ``values`` (a forward hook, removed on exit).

    The embedding must run exactly once per forward pass with an output of ``values``'
    shape, else :class:`ModelError`. ``None`` for either argument: nothing is hooked.
    """
    if embedding is None or values is None:
        yield
        return
    # a copy: models may add to the embedding output in place (BLIP does)
    with embedding_output_hook(embedding, tuple(values.shape),
                               lambda output: values.to(output.dtype).clone(),
                               what="word embedding"):
        yield


def score_gradients(
    score_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    images: torch.Tensor,
    embeddings: torch.Tensor | None,
    *,
    name: str,
) -> tuple[NDArray[np.float64], NDArray[np.float32], NDArray[np.float32] | None]:
    """Scores ``[N]`` of ``score_fn(images, embeddings)`` and their gradients.

    ``score_fn`` maps leaves ``[N, 3, H, W]`` (and ``[N, T, D]``) to the answer's scores
    ``[N]``; each point's score depends only on its own inputs, so the gradient of their sum
    is each point's own gradient. Errors of the model are raised as :class:`ModelError`.
    """
    image_leaf = images.detach().clone().requires_grad_(True)
    word_leaf = None if embeddings is None else embeddings.detach().clone().requires_grad_(True)
    wrt = [image_leaf] if word_leaf is None else [image_leaf, word_leaf]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            scores = score_fn(image_leaf, word_leaf)
            grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
    except BlackboxVQAError:
        raise
    except Exception as exc:
        raise ModelError(f"{name}: gradient pass failed: {type(exc).__name__}: {exc}") from exc
    out = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt, strict=True)]
    values = scores.detach().double().cpu().numpy()
    if not np.isfinite(values).all():
        raise ModelError(f"{name} returned NaN or infinite scores")
    words = None if word_leaf is None else out[1].detach().float().cpu().numpy()
    return values, out[0].detach().float().cpu().numpy(), words

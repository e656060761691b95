"""The gradient protocol: input gradients of one answer's score, as an optional capability.

Adapters that can differentiate their score (a live PyTorch module, an exported graph, a
Hugging Face model) implement :class:`GradientModel`; explainers test it with
:func:`has_gradients`. The machinery that computes the gradients (guided ReLUs, embedding
hooks) lives with the PyTorch family in :mod:`blackbox_vqa.adapters.torch.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError
from blackbox_vqa.images import ImageInput

__all__ = ["GradientModel", "InputGradients", "answer_index", "has_gradients"]


@dataclass(frozen=True)
class InputGradients:
    """Input gradients of the score of one answer, for one image and question.

    Attributes:
        image: ``float32 [3, H, W]``, gradient with respect to the preprocessed image
            tensor (model resolution, after normalisation).
        words: ``float32 [W, D]``, gradient with respect to each word's embedding vector,
            or ``None`` when the model has no single ``nn.Embedding`` (see ``words_note``).
            For a model with one token per word (TorchAdapter) row ``i`` is token ``i``;
            for sub-word tokenizers (HfAdapter) row ``i`` is the sum of the gradients of
            the tokens of the question's ``i``-th word (``text.split_words``).
        token_ids: the token ids the model saw (all of them, special tokens included).
        answer_index: index of the answer whose score was differentiated.
        predicted_index: index of the highest-scoring answer.
        scores: the model's scores ``[A]`` (``float64``) on the input.
        guided: whether every ReLU was guided.
        words_note: why ``words`` is ``None`` (empty otherwise).
        relus_guided: with ``guided``, how many ReLU backward passes were guided (``0``:
            the model has no ReLU on the path, e.g. GELU transformers, and the gradient is
            the plain one); ``None`` for plain gradients or when not counted.
    """

    image: NDArray[np.float32]
    words: NDArray[np.float32] | None
    token_ids: tuple[int, ...]
    answer_index: int
    predicted_index: int
    scores: NDArray[np.float64]
    guided: bool
    words_note: str = ""
    relus_guided: int | None = None


@runtime_checkable
class GradientModel(Protocol):
    """A model with the gradient protocol (on top of the model protocol)."""

    @property
    def answers(self) -> Sequence[str]: ...

    def input_gradients(
        self,
        image: ImageInput,
        question: str,
        *,
        answer: str | int | None = None,
        guided: bool = False,
    ) -> InputGradients:
        """Gradients of the score of ``answer`` (default: the predicted one)."""
        ...


def has_gradients(model: object) -> bool:
    """Whether ``model`` offers the gradient protocol."""
    return isinstance(model, GradientModel)


def answer_index(answers: Sequence[str], answer: str | int | None, predicted: int) -> int:
    """Resolve ``answer`` (a string, an index, or ``None`` for ``predicted``) to an index."""
    if answer is None:
        return predicted
    if isinstance(answer, bool):
        raise InputError(f"answer must be a string or an index, got {answer!r}")
    if isinstance(answer, (int, np.integer)):
        if not 0 <= int(answer) < len(answers):
            raise InputError(f"answer index must be in [0, {len(answers)}), got {answer}")
        return int(answer)
    if answer not in answers:
        raise InputError(f"answer {answer!r} is not one of the model's answers")
    return list(answers).index(answer)

"""The gradient protocol, and the machinery that makes every ReLU guided.

Guided backpropagation (Springenberg et al. 2015) changes the backward pass of every
ReLU from ``G_l = [h_l > 0] * G_{l+1}`` to ``G_l = [h_l > 0] * [G_{l+1} > 0] * G_{l+1}``.
Whatever wrote the ReLU (an ``nn.ReLU`` module, ``F.relu``, ``torch.relu``, ``relu_``,
an in-place ReLU, a traced or exported graph), its backward runs the ATen operator
``threshold_backward(grad, input, threshold)``. :func:`guided_relu` is a
``TorchDispatchMode`` that, while active, clamps the incoming gradient of that operator at
zero; nothing of the user's module is swapped or hooked, and leaving the block (normally
or by an exception) leaves PyTorch exactly as it was.

Word gradients are taken at the output of the model's single ``nn.Embedding``: a zero
tensor ``offsets`` of the embedding output's shape is added there by a forward hook
(:func:`embedding_offsets`), and the gradient with respect to ``offsets`` is the gradient
with respect to each token's embedding vector.
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
from torch.utils._python_dispatch import TorchDispatchMode

from blackbox_vqa.errors import InputError, ModelError
from blackbox_vqa.images import ImageInput

__all__ = [
    "GradientModel",
    "InputGradients",
    "answer_index",
    "embedding_offsets",
    "embedding_output_hook",
    "find_embedding",
    "guided_relu",
    "has_gradients",
]

_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward.default


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


class _GuidedReLU(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Dispatch mode that blocks negative gradients at every ReLU's backward."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.calls = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing is compiled inside this mode; without this, torch wraps the handler in
        # a dynamo-disable that imports torch._dynamo (seconds) on the first backward.
        return False

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is _THRESHOLD_BACKWARD:
            self.calls += 1
            grad, *rest = args
            return func(grad.clamp(min=0), *rest, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def guided_relu(enabled: bool = True) -> Iterator[_GuidedReLU | None]:
    """Within the block, every ReLU's backward is guided; run the backward pass inside it.

    Yields the mode (its ``calls`` counts the ReLU backwards it changed), or ``None`` when
    ``enabled`` is false (plain gradients). The mode is popped on exit, also on errors.
    """
    if not enabled:
        yield None
        return
    mode = _GuidedReLU()
    with mode:
        yield mode


def find_embedding(module: nn.Module) -> tuple[nn.Embedding | None, str]:
    """The module's only ``nn.Embedding`` and ``""``, or ``None`` and the reason why not."""
    found = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, "the model has no nn.Embedding, so word gradients are not available"
    return None, (
        f"the model has {len(found)} nn.Embedding modules; word gradients need exactly one"
    )


@contextmanager
def embedding_output_hook(
    embedding: nn.Module,
    shape: tuple[int, ...],
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    what: str = "nn.Embedding",
) -> Iterator[list[int]]:
    """Within the block, ``embedding``'s output becomes ``transform(output)`` (a forward
    hook, removed on exit, also on errors).

    Yields a one-item list counting the embedding's calls; a call whose output shape is not
    ``shape``, or a second call, raises :class:`ModelError` naming ``what`` (the gradient
    would be ambiguous).
    """
    calls = [0]

    def hook(mod: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 1:
            raise ModelError(f"the model's {what} ran more than once in one forward pass")
        if tuple(output.shape) != tuple(shape):
            raise ModelError(
                f"the model's {what} returned shape {tuple(output.shape)}, expected "
                f"{tuple(shape)} (batch, tokens, embedding size)"
            )
        return transform(output)

    handle = embedding.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def embedding_offsets(embedding: nn.Module, offsets: torch.Tensor) -> Iterator[list[int]]:
    """Add ``offsets`` to ``embedding``'s output for the block; see
    :func:`embedding_output_hook` (calls counted, shape and single call checked)."""
    with embedding_output_hook(embedding, tuple(offsets.shape),
                               lambda output: output + offsets) as calls:
        yield calls

"""The machinery that makes every ReLU guided, and word gradients at the embedding.

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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from blackbox_vqa.errors import ModelError

__all__ = ["embedding_offsets", "embedding_output_hook", "find_embedding", "guided_relu"]

_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward.default


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

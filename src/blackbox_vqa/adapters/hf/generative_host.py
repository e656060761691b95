"""What the generative adapter's mixins (gradients, token ablation) use of their host,
:class:`~blackbox_vqa.adapters.hf.generative.GenerativeAdapter`: its attributes and, for
type checkers only, its methods. No behaviour lives here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from blackbox_vqa.images import ImageInput

__all__ = ["GenerativeHost"]


class GenerativeHost:
    """The host adapter's state and methods, as the mixins see them."""

    module: Any
    processor: Any
    tokenizer: Any
    prompts: Any
    candidates: list[str]
    answer_ids: tuple[int, ...]
    softcap: Any
    pad_id: int
    batch_size: int
    reuse: Any
    model_type: str
    _fixed: bool
    _prepared: tuple[str, str] | None
    device: torch.device
    name: str

    if TYPE_CHECKING:  # the host's methods, declared for type checkers only
        @property
        def answers(self) -> Sequence[str]:
            raise NotImplementedError

        def encode(self, images: Sequence[NDArray[np.uint8]], questions: Sequence[str]
                   ) -> dict[str, torch.Tensor]:
            raise NotImplementedError

        def validate_question(self, question: str) -> str:
            raise NotImplementedError

        def prepare(self, image: ImageInput, question: str) -> None:
            raise NotImplementedError

        def answer_probs_batch(self, images: Sequence[ImageInput], questions: Sequence[str]
                               ) -> NDArray[np.floating[Any]]:
            raise NotImplementedError

        def _candidates_ids(self) -> list[tuple[int, ...]]:
            raise NotImplementedError

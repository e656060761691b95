"""The incremental-scoring capability: same scores as ``answer_probs_batch``, cheaper.

An adapter declares it by implementing :class:`IncrementalScoring` (structural typing,
checked with ``isinstance``). A perturbation explainer hands it the original input and
a batch of perturbed inputs; the adapter returns exactly what ``answer_probs_batch``
would return for them (up to float reassociation), computed by reusing the original
input's intermediate results. An adapter that cannot do so for a given model says why in
:attr:`IncrementalScores.note` and computes the plain way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError

__all__ = ["INCREMENTAL_MODES", "IncrementalMode", "IncrementalScores", "IncrementalScoring",
           "parse_incremental"]

IncrementalMode = Literal["exact", "off"]
INCREMENTAL_MODES: tuple[str, ...] = ("exact", "off")


def parse_incremental(value: str) -> IncrementalMode:
    """Validate an ``incremental`` option: ``"exact"`` (default) or ``"off"``."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in INCREMENTAL_MODES:
        raise InputError(
            f"incremental must be one of {', '.join(INCREMENTAL_MODES)}, got {value!r}"
        )
    return text  # type: ignore[return-value]


@dataclass(frozen=True)
class IncrementalScores:
    """Scores of one batch of perturbed inputs.

    Attributes:
        original: scores ``[A]`` of the original input (``float64``).
        scores: scores ``[B, A]`` of the perturbed inputs, in the order given.
        mode: ``"exact"`` when the incremental path computed them, ``"off"`` when the
            plain forward pass did.
        note: why the plain path ran (empty when the incremental path did), or what the
            incremental path cached.
    """

    original: NDArray[np.float64]
    scores: NDArray[np.float64]
    mode: IncrementalMode
    note: str = ""


@runtime_checkable
class IncrementalScoring(Protocol):
    """Capability: score perturbations of one original input incrementally.

    ``incremental_scores(image, question, images, questions)`` takes the original RGB
    image ``H x W x 3`` and question, and ``B`` perturbed images and questions (each pair
    differs from the original in its image or in its question); it returns
    :class:`IncrementalScores` whose ``scores`` equal ``answer_probs_batch(images,
    questions)`` and whose ``original`` equals ``answer_probs(image, question)``.
    """

    def incremental_scores(
        self,
        image: NDArray[Any],
        question: str,
        images: Sequence[NDArray[Any]],
        questions: Sequence[str],
    ) -> IncrementalScores: ...

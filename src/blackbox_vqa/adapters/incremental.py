"""The incremental-scoring capability: same scores as ``answer_probs_batch``, cheaper.

An adapter declares it by implementing :class:`IncrementalScoring` (structural typing,
checked with ``isinstance``). A perturbation explainer hands it the original input and
a batch of perturbed inputs; the adapter returns exactly what ``answer_probs_batch``
would return for them (up to float reassociation), computed by reusing the original
input's intermediate results. An adapter that cannot do so for a given model says why in
:attr:`IncrementalScores.note` and computes the plain way.

:class:`ApproximateScoring` goes past the exact limit (Krypton's projective-field
thresholding, Nakandala et al., SIGMOD 2019): the region a patch changed is capped at
``tau`` times each feature map's side, so the scores are approximate; the explainer
measures the error on a few cells it also scores exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError

__all__ = ["DEFAULT_TAU", "INCREMENTAL_MODES", "ApproximateScoring", "IncrementalMode",
           "IncrementalScores", "IncrementalScoring", "approx_tau", "parse_incremental"]

IncrementalMode = Literal["exact", "off", "approx"]
INCREMENTAL_MODES: tuple[str, ...] = ("exact", "off", "approx", "approx:TAU")

# The default share of a feature map's side an approximate update may cover
# (benchmarks/approx.py, BENCHMARKS.md "Approximate incremental occlusion").
DEFAULT_TAU = 0.6


def parse_incremental(value: str) -> str:
    """Validate an ``incremental`` option: ``"exact"`` (default), ``"off"``, ``"approx"``
    (``tau`` = :data:`DEFAULT_TAU`) or ``"approx:TAU"`` with ``0 < TAU <= 1``.

    Returns the normalised text: ``"exact"``, ``"off"`` or ``"approx:TAU"``.
    """
    if not isinstance(value, str):
        raise InputError(f"incremental must be exact, off, approx or approx:TAU, got {value!r}")
    text = value.strip().lower()
    if text in ("exact", "off"):
        return text
    if text == "approx":
        return f"approx:{DEFAULT_TAU:g}"
    head, sep, tail = text.partition(":")
    if head != "approx" or not sep:
        raise InputError(
            f"incremental must be exact, off, approx or approx:TAU, got {value!r}"
        )
    try:
        tau = float(tail)
    except ValueError:
        raise InputError(
            f"incremental approx:TAU needs a number TAU in (0, 1], got {value!r}"
        ) from None
    if not 0.0 < tau <= 1.0:  # also refuses nan
        raise InputError(f"incremental approx:TAU needs TAU in (0, 1], got {value!r}")
    return f"approx:{tau:g}"


def approx_tau(value: str) -> float | None:
    """``TAU`` of a normalised ``"approx:TAU"`` option, ``None`` for ``exact`` / ``off``."""
    text = parse_incremental(value)
    return float(text.partition(":")[2]) if text.startswith("approx:") else None


@dataclass(frozen=True)
class IncrementalScores:
    """Scores of one batch of perturbed inputs.

    Attributes:
        original: scores ``[A]`` of the original input (``float64``).
        scores: scores ``[B, A]`` of the perturbed inputs, in the order given.
        mode: ``"exact"`` when the incremental path computed them, ``"approx"`` when the
            approximate one did, ``"off"`` when the plain forward pass did.
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


@runtime_checkable
class ApproximateScoring(Protocol):
    """Capability: score image perturbations approximately (projective-field thresholding).

    ``approximate_scores(image, question, images, questions, tau=...)`` is
    :meth:`IncrementalScoring.incremental_scores` except that, past each layer, the region
    a patch changed is capped at ``tau`` (in ``(0, 1]``) times the feature map's side,
    centred on the patch; what lies beyond keeps the original's activations. ``mode`` is
    ``"approx"`` when that path ran (``"exact"`` / ``"off"`` with the reason in ``note``
    otherwise).
    """

    def approximate_scores(
        self,
        image: NDArray[Any],
        question: str,
        images: Sequence[NDArray[Any]],
        questions: Sequence[str],
        *,
        tau: float,
    ) -> IncrementalScores: ...

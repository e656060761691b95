"""The model protocol every explainer talks to, and a small base class for adapters.

A VQA model, for this package, is any object with:

- ``answers``: the answer vocabulary, index-aligned with the scores;
- ``answer_probs(image, question)``: scores of shape ``[A]``;
- ``answer_probs_batch(images, questions)``: scores of shape ``[B, A]``.

Images are ``H x W x 3`` RGB arrays (``uint8``, or ``float32`` on the 0-255 scale).
Scores need not sum to one, but must be finite and non-negative. :func:`check_scores`
enforces that on every batch the explainers receive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError, ModelLoadError, ModelOutputError
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.text import validate_question

__all__ = [
    "OUTPUT_KINDS",
    "BaseAdapter",
    "ImageArray",
    "OutputKind",
    "VQAModel",
    "check_model",
    "check_pairs",
    "check_scores",
    "model_name",
]

ImageArray = NDArray[np.uint8] | NDArray[np.float32]

#: How a model's raw outputs become scores: softmax, sigmoid, or used as they are.
OutputKind = Literal["softmax", "sigmoid", "probs"]
OUTPUT_KINDS: tuple[str, ...] = ("softmax", "sigmoid", "probs")


@runtime_checkable
class VQAModel(Protocol):
    """Structural type of a VQA model (see the module docstring)."""

    @property
    def answers(self) -> Sequence[str]: ...

    def answer_probs(self, image: ImageInput, question: str) -> NDArray[np.floating[Any]]: ...

    def answer_probs_batch(
        self, images: Sequence[ImageInput], questions: Sequence[str]
    ) -> NDArray[np.floating[Any]]: ...


def check_model(model: object, *, source: str = "model") -> VQAModel:
    """Return ``model`` if it has the model protocol, else raise :class:`ModelLoadError`."""
    missing = [
        attr
        for attr in ("answers", "answer_probs", "answer_probs_batch")
        if not hasattr(model, attr)
    ]
    if missing:
        raise ModelLoadError(
            f"{source} returned a {type(model).__name__} without the model protocol "
            f"(missing: {', '.join(missing)})"
        )
    answers = model.answers  # type: ignore[attr-defined]
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ModelLoadError(f"{source}: 'answers' must be a non-empty sequence of strings")
    if not all(isinstance(a, str) for a in answers):
        raise ModelLoadError(f"{source}: every answer must be a string")
    return model  # type: ignore[return-value]


def model_name(model: object) -> str:
    """A display name: the model's ``name`` attribute, else its class name."""
    name = getattr(model, "name", None)
    return name if isinstance(name, str) and name else type(model).__name__


def check_pairs(images: Sequence[object], questions: Sequence[object]) -> None:
    """Raise :class:`InputError` unless there is one question per image."""
    if len(images) != len(questions):
        raise InputError(
            f"got {len(images)} images but {len(questions)} questions; they must pair up"
        )


def check_scores(scores: object, batch: int, n_answers: int, *, source: str) -> NDArray[np.float64]:
    """Validate a batch of scores and return it as a ``float64`` array ``[batch, n_answers]``.

    Raises :class:`ModelOutputError` naming ``source`` for a wrong shape, NaN, infinite or
    negative values.
    """
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ModelOutputError(f"{source} returned scores that are not numbers: {exc}") from exc
    if array.shape != (batch, n_answers):
        raise ModelOutputError(
            f"{source} returned scores of shape {array.shape}, expected ({batch}, {n_answers}) "
            f"for {batch} input(s) and {n_answers} answers"
        )
    if not np.isfinite(array).all():
        raise ModelOutputError(f"{source} returned NaN or infinite scores")
    if (array < 0).any():
        raise ModelOutputError(
            f"{source} returned negative scores (min {array.min():.4g}); scores must be >= 0"
        )
    return array


class BaseAdapter(ABC):
    """Base class for adapters: converts inputs at the edge, supplies ``answer_probs``.

    Subclasses set ``answers`` and implement :meth:`_predict_batch`, which receives RGB
    arrays and stripped questions and returns scores ``[B, A]``.
    """

    name: str = "model"

    def __init__(self, answers: Sequence[str], *, name: str | None = None) -> None:
        answers = list(answers)
        if not answers or not all(isinstance(a, str) for a in answers):
            raise InputError("answers must be a non-empty list of strings")
        if len(set(answers)) != len(answers):
            raise InputError("answers must be unique")
        self._answers: tuple[str, ...] = tuple(answers)
        if name is not None:
            self.name = name

    @property
    def answers(self) -> Sequence[str]:
        """The answer vocabulary, index-aligned with the scores."""
        return self._answers

    def validate_question(self, question: str) -> str:
        """Return the stripped question, or raise :class:`QuestionError`."""
        return validate_question(question)

    def answer_probs(self, image: ImageInput, question: str) -> NDArray[np.float64]:
        """Scores ``[A]`` for one image and question."""
        return self.answer_probs_batch([image], [question])[0]

    def answer_probs_batch(
        self, images: Sequence[ImageInput], questions: Sequence[str]
    ) -> NDArray[np.float64]:
        """Scores ``[B, A]`` (``float64``) for ``B`` images and questions."""
        check_pairs(images, questions)
        if len(images) == 0:
            return np.zeros((0, len(self._answers)), dtype=np.float64)
        arrays = [to_rgb_array(image) for image in images]
        scores = self._predict_batch(arrays, [str(q) for q in questions])
        return check_scores(scores, len(arrays), len(self._answers), source=self.name)

    @abstractmethod
    def _predict_batch(
        self, images: list[ImageArray], questions: list[str]
    ) -> NDArray[np.floating[Any]]:
        """Scores ``[B, A]`` for RGB arrays ``H x W x 3`` and question strings."""

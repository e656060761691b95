"""Guided backpropagation (and plain gradients) through the gradient protocol.

The image map is the maximum over the three channels of the absolute gradient with
respect to the preprocessed image tensor, at the model's input resolution; the word map
is the L2 norm of the gradient with respect to each token's embedding vector. The answer
explained is the one predicted on the input unless another is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import VQAModel, check_model, model_name
from blackbox_vqa.adapters.gradients import GradientModel, InputGradients, has_gradients
from blackbox_vqa.errors import GradientUnavailableError
from blackbox_vqa.explanation import Attribution
from blackbox_vqa.images import ImageInput
from blackbox_vqa.text import split_words, validate_question

__all__ = [
    "GuidedBackprop",
    "GuidedBackpropResult",
    "gradient_attribution",
    "gradient_dict",
    "image_saliency",
    "word_saliency",
]


def image_saliency(gradient: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """``[3, H, W]`` gradient -> ``[H, W]`` map: max over channels of ``|gradient|`` (>= 0)."""
    return np.abs(np.asarray(gradient, dtype=np.float64)).max(axis=0)


def word_saliency(gradients: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """``[T, D]`` embedding gradients -> ``[T]`` L2 norms (>= 0)."""
    return np.linalg.norm(np.asarray(gradients, dtype=np.float64), axis=1)


@dataclass(frozen=True)
class GuidedBackpropResult:
    """What one gradient explanation found.

    Attributes:
        answer, answer_index: the answer explained (predicted unless one was asked for).
        predicted_index: the answer the model predicts on the input.
        scores: the model's scores ``[A]`` (``float64``).
        mode: ``"guided"`` (every ReLU guided) or ``"plain"`` (ordinary gradients).
        gradient: raw ``float32 [3, H, W]`` gradient with respect to the preprocessed image.
        image_map: ``float64 [H, W]`` max over channels of ``|gradient|``.
        tokens: one label per token the model saw (the question's words when the
            tokenizer gives one token per word, else ``"#id"``).
        word_map: ``float64 [T]`` L2 norm of each token's embedding gradient; empty when
            the model offers no word gradients (``words_note`` says why).
        relus_guided: guided mode: how many ReLU backward steps were guided (0: none was
            met, so the map equals the plain gradient); None when not counted or plain.
    """

    answer: str
    answer_index: int
    predicted_index: int
    scores: NDArray[np.float64]
    mode: Literal["guided", "plain"]
    gradient: NDArray[np.float32]
    image_map: NDArray[np.float64]
    tokens: tuple[str, ...]
    word_map: NDArray[np.float64]
    words_note: str = ""
    relus_guided: int | None = None

    @property
    def guided_note(self) -> str:
        """Says when guided mode met no ReLU (the map is the plain gradient); else empty."""
        return PLAIN_NOTE if self.mode == "guided" and self.relus_guided == 0 else ""

    @property
    def probability(self) -> float:
        """Score of the explained answer on the input."""
        return float(self.scores[self.answer_index])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the model's input."""
        return int(self.gradient.shape[1]), int(self.gradient.shape[2])


class GuidedBackprop:
    """Gradient explainer for models with the gradient protocol.

    Args:
        model: an object with ``answers`` and ``input_gradients`` (a TorchAdapter, an
            exported-graph adapter...).
        guided: make every ReLU guided (default); ``False`` gives plain gradients.
    """

    def __init__(self, model: object, *, guided: bool = True) -> None:
        checked = check_model(model) if isinstance(model, VQAModel) else model
        if not has_gradients(checked):
            raise GradientUnavailableError(
                f"{model_name(model)} offers no gradients; guided backpropagation needs a "
                "PyTorch model or graph (see `bbvqa export`)"
            )
        self.model: GradientModel = checked  # type: ignore[assignment]
        self.guided = bool(guided)

    def explain(
        self, image: ImageInput, question: str, *, answer: str | int | None = None
    ) -> GuidedBackpropResult:
        """Gradients of the score of ``answer`` (default: predicted); see the result type."""
        question = validate_question(question)
        grads = self.model.input_gradients(image, question, answer=answer, guided=self.guided)
        return _result(grads, list(self.model.answers), split_words(question))


def _token_labels(grads: InputGradients, words: list[str]) -> tuple[str, ...]:
    rows = 0 if grads.words is None else len(grads.words)
    if len(words) == rows:
        return tuple(words)
    return tuple(f"#{t}" for t in grads.token_ids)


def _result(grads: InputGradients, answers: list[str], words: list[str]) -> GuidedBackpropResult:
    image = np.asarray(grads.image, dtype=np.float32)
    if grads.words is None:
        word_map = np.zeros(0, dtype=np.float64)
        tokens: tuple[str, ...] = ()
    else:
        word_map = word_saliency(grads.words)
        tokens = _token_labels(grads, words)
    return GuidedBackpropResult(
        answer=answers[grads.answer_index],
        answer_index=grads.answer_index,
        predicted_index=grads.predicted_index,
        scores=np.asarray(grads.scores, dtype=np.float64),
        mode="guided" if grads.guided else "plain",
        gradient=image,
        image_map=image_saliency(image),
        tokens=tokens,
        word_map=word_map,
        words_note=grads.words_note,
        relus_guided=grads.relus_guided if grads.guided else None,
    )


def gradient_dict(
    result: GuidedBackpropResult, *, gradient_file: str, source: str
) -> dict[str, Any]:
    """The ``guided_backprop`` (or ``gradient``) section of ``explanation.json``."""
    height, width = result.image_size
    return {
        "available": True,
        "mode": result.mode,
        "answer": result.answer,
        "answer_index": result.answer_index,
        "probability": result.probability,
        "source": source,
        "image_size": [height, width],
        "image": result.image_map.tolist(),
        "gradient_file": gradient_file,
        "gradient_shape": [3, height, width],
        "tokens": list(result.tokens),
        "words": result.word_map.tolist(),
        "words_note": result.words_note or None,
        **_guided_note(result),
    }


PLAIN_NOTE = (
    "guided mode met no ReLU on the backward path (the model uses other activations, e.g. "
    "GELU or SiLU), so this map equals the plain gradient"
)


def _guided_note(result: GuidedBackpropResult) -> dict[str, Any]:
    """``relus_guided`` (guided mode, when counted) and a note when it is 0."""
    if result.mode != "guided" or result.relus_guided is None:
        return {}
    found: dict[str, Any] = {"relus_guided": result.relus_guided}
    if result.guided_note:
        found["note"] = result.guided_note
    return found


def gradient_attribution(
    result: GuidedBackpropResult, *, method: str, key: str, source: str
) -> Attribution:
    """``result`` as an attribution: the section ``bbvqa explain`` writes under ``key``, the
    raw gradient as ``<key>.npy`` beside it."""
    file_name = f"{key}.npy"
    section = gradient_dict(result, gradient_file=file_name, source=source)
    extras = {k: v for k, v in section.items() if k not in ("image", "words")}
    return Attribution(
        method=method,
        key=key,
        signed=False,
        answer=result.answer,
        answer_index=result.answer_index,
        probability=result.probability,
        image_map=result.image_map,
        word_map=result.word_map,
        tokens=result.tokens,
        extras=extras,
        stats={"probability": result.probability},
        arrays={file_name: result.gradient},
    )

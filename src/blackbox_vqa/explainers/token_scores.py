"""Per-answer-token scores for black-box methods, through the model's
:class:`~blackbox_vqa.adapters.capabilities.SupportsAnswerTokenScores` capability.

A method that compares scores of perturbed inputs asks the model for its scores and, from
the same forward passes, each answer token's log-probability given its prefix; the map of
token ``i`` is then the method's own map with ``log p(token_i | input, tokens_<i)`` as the
score. Models without the capability are scored through ``answer_probs_batch`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import model_name
from blackbox_vqa.adapters.capabilities import SupportsAnswerTokenScores, answer_tokens
from blackbox_vqa.errors import ModelOutputError
from blackbox_vqa.explanation import TokenMaps

__all__ = ["score_batch", "token_maps", "token_scoring"]


def token_scoring(model: object) -> bool:
    """Whether ``model`` (already prepared for the input) scores an answer token by token."""
    return isinstance(model, SupportsAnswerTokenScores) and model.token_answer is not None


def score_batch(
    model: Any, images: Sequence[Any], questions: Sequence[str], *, tokens: bool
) -> tuple[Any, NDArray[np.float64] | None]:
    """The model's raw scores of a batch and, with ``tokens``, its answer tokens'
    log-probabilities ``float64 [B, L]`` from the same forward passes (else None)."""
    if not tokens:
        return model.answer_probs_batch(images, questions), None
    scores, found = model.answer_probs_with_token_logprobs(images, questions)
    array = np.asarray(found, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != len(images) or not np.isfinite(array).all():
        raise ModelOutputError(f"{model_name(model)} returned answer-token log-probabilities "
                               f"of shape {array.shape} (or not finite) for {len(images)} "
                               "input(s)")
    return scores, array


def token_maps(
    model: object,
    answer: str,
    original: NDArray[np.float64] | None,
    image_maps: Sequence[NDArray[np.float64]],
    word_maps: Sequence[NDArray[np.float64]],
) -> TokenMaps | None:
    """The per-token maps of ``answer`` (None when the model does not score its tokens one
    by one, or it has a single token). ``original`` is ``[L]``, the tokens'
    log-probabilities on the original input; the maps are one per token, in order."""
    found = answer_tokens(model, answer)
    if found is None or original is None or len(original) != len(found.labels):
        return None
    return TokenMaps(tokens=found.labels, texts=found.texts,
                     logprobs=np.asarray(original, dtype=np.float64),
                     image_maps=tuple(np.asarray(m, dtype=np.float64) for m in image_maps),
                     word_maps=tuple(np.asarray(m, dtype=np.float64) for m in word_maps))

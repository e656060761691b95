"""The ``explanation.json`` document (schema ``blackbox_vqa.explanation/1``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.explainers.occlusion import OcclusionResult

__all__ = ["SCHEMA", "explanation_dict", "occlusion_dict", "top_answers"]

SCHEMA = "blackbox_vqa.explanation/1"


def top_answers(
    answers: Sequence[str], scores: NDArray[np.floating[Any]], k: int = 5
) -> list[dict[str, Any]]:
    """The ``k`` highest-scoring answers as ``{"answer", "score"}``, best first."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [{"answer": answers[i], "score": float(scores[i])} for i in order]


def occlusion_dict(result: OcclusionResult) -> dict[str, Any]:
    """The ``occlusion`` section."""
    return {
        "mode": result.mode,
        "grid": result.grid,
        "window": list(result.window) if result.window else None,
        "stride": list(result.stride) if result.stride else None,
        "baseline": result.baseline,
        "baseline_rgb": list(result.baseline_rgb) if result.baseline_rgb else None,
        "image": result.image_map.tolist(),
        "words": result.word_map.tolist(),
        "flips": {
            "image": result.image_flips,
            "words": result.word_flips,
            "image_total": result.image_perturbations,
            "words_total": len(result.words),
        },
        "batch_size": result.batch_size,
        "evaluations": result.evaluations,
    }


def explanation_dict(
    *,
    model: str,
    answers: Sequence[str],
    question: str,
    image: Mapping[str, Any],
    occlusion: OcclusionResult | None,
    primary: Any = None,
    sections: Mapping[str, Any] | None = None,
    timing: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Assemble the whole document; ``sections`` adds or overrides top-level keys.

    The answer fields come from ``occlusion``, or from ``primary`` (any result with
    ``answer``, ``answer_index``, ``predicted_index`` and ``scores``, e.g. a gradient
    result) when occlusion did not run; ``tokens`` are the question's words.
    """
    from blackbox_vqa import __version__
    from blackbox_vqa.text import split_words

    result = occlusion if occlusion is not None else primary
    if result is None:
        raise ValueError("explanation_dict needs an occlusion result or a primary result")
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "model": model,
        "question": question,
        "tokens": split_words(question),
        "image": dict(image),
        "answer": result.answer,
        "answer_index": result.answer_index,
        "predicted_answer": answers[result.predicted_index],
        "probability": float(result.scores[result.answer_index]),
        "top_answers": top_answers(answers, result.scores),
        "occlusion": occlusion_dict(occlusion) if occlusion is not None else None,
        "guided_backprop": None,
        "timing": dict(timing or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
    }
    doc.update(sections or {})
    return doc

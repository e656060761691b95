"""Token occlusion: ablate a cell's image tokens after the vision embedding.

For models whose image path is a lattice of patch tokens (the
:class:`~blackbox_vqa.adapters.capabilities.SupportsTokenAblation` capability: ViLT, and
the generative VLMs of ``hf:``: LLaVA, Idefics3/SmolVLM, Qwen2-VL, PaliGemma).
The image is embedded once; for each cell of a ``grid x grid`` lattice over the image,
the patch tokens whose patches overlap the cell are ablated (the model says how: both
leave them out of attention) and the input is scored again; importance =
``p(a | original) - p(a | cell's tokens ablated)``.

This answers a different question from pixel occlusion: not "what if these pixels were
grey" but "what if the model could not attend to these patches' tokens". No baseline
image enters the model, so no out-of-distribution patch is created, but the change is
coarser (whole patches) and happens inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_model, check_scores, model_name
from blackbox_vqa.adapters.capabilities import (
    SupportsTokenAblation,
    check_question,
    own_answer,
    prepare_model,
    token_ablation_refusal,
)
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.explainers.occlusion import Score, answer_score, parse_score
from blackbox_vqa.explanation import Attribution
from blackbox_vqa.images import ImageInput, to_rgb_array

__all__ = ["TokenOcclusion", "TokenOcclusionResult", "cell_tokens",
           "token_occlusion_attribution"]

Cell = list[tuple[int, int]]


def cell_tokens(rows: int, cols: int, grid: int) -> list[Cell]:
    """The ``(row, col)`` tokens of a ``rows x cols`` patch lattice whose patches overlap
    each cell of a ``grid x grid`` lattice over the same image, cells row-major: token row
    ``r`` spans ``[r / rows, (r + 1) / rows)`` of the height, cell row ``i`` spans
    ``[i / grid, (i + 1) / grid)``; they overlap when ``r * grid < (i + 1) * rows`` and
    ``i * rows < (r + 1) * grid``."""
    def span(n: int, i: int) -> list[int]:
        return [r for r in range(n) if r * grid < (i + 1) * n and i * n < (r + 1) * grid]

    return [[(r, c) for r in span(rows, i) for c in span(cols, j)]
            for i in range(grid) for j in range(grid)]


@dataclass(frozen=True)
class TokenOcclusionResult:
    """What one token-occlusion explanation found.

    Attributes:
        answer, answer_index: the answer explained; ``scores``: ``[A]`` on the original.
        image_map: ``grid x grid`` importances ``p(a|original) - p(a|tokens ablated)``.
        token_grid: ``(rows, cols)`` of the model's patch tokens.
        cells: each cell's tokens as ``(row, col)`` pairs, cells row-major.
        baseline: what replaced an ablated token (the model's ``token_baseline``).
        flips: cells whose ablation changed the predicted answer.
    """

    answer: str
    answer_index: int
    scores: NDArray[np.float64]
    image_map: NDArray[np.float64]
    grid: int
    token_grid: tuple[int, int]
    cells: tuple[tuple[tuple[int, int], ...], ...]
    baseline: str
    flips: int
    score: Score = "probability"

    @property
    def probability(self) -> float:
        return float(self.scores[self.answer_index])


class TokenOcclusion:
    """Token occlusion for a model with the ``SupportsTokenAblation`` capability.

    Args:
        model: the model.
        grid: cells per side (default 16).
        score: ``"probability"`` or ``"log-probability"``.

    Raises:
        NotSupportedError: the model has no patch-token image path.
    """

    def __init__(self, model: object, *, grid: int = 16, score: Score = "probability") -> None:
        self.model = check_model(model)
        if not isinstance(model, SupportsTokenAblation):
            raise NotSupportedError(
                f"token occlusion: {model_name(model)} has no patch-token image path "
                "(ViLT and the generative VLMs through hf: have one)"
            )
        reason = token_ablation_refusal(model)
        if reason:
            raise NotSupportedError(f"token occlusion: {model_name(model)}: {reason}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise InputError(f"grid must be a positive integer, got {grid!r}")
        self.grid = grid
        self.score = parse_score(score)

    def explain(
        self, image: ImageInput, question: str, *, answer: str | None = None
    ) -> TokenOcclusionResult:
        question = check_question(self.model, question)
        pixels = to_rgb_array(image).astype(np.float32)
        prepare_model(self.model, pixels, question)
        model: Any = self.model
        rows, cols = model.image_token_grid(pixels)
        cells = cell_tokens(rows, cols, self.grid)
        raw = model.token_ablation_scores(pixels, question, cells)
        scores = check_scores(raw, 1 + len(cells), len(self.model.answers),
                              source=model_name(self.model))
        predicted = int(np.argmax(scores[0]))
        index = _answer_index(self.model.answers, answer or own_answer(self.model), predicted)
        compared = answer_score(scores, self.score)
        deltas = compared[0, index] - compared[1:, index]
        return TokenOcclusionResult(
            answer=self.model.answers[index], answer_index=index, scores=scores[0].copy(),
            image_map=deltas.reshape(self.grid, self.grid), grid=self.grid,
            token_grid=(rows, cols), cells=tuple(tuple(c) for c in cells),
            baseline=str(model.token_baseline),
            flips=int((scores[1:].argmax(axis=1) != predicted).sum()), score=self.score,
        )


def _answer_index(answers: Sequence[str], answer: str | None, predicted: int) -> int:
    if answer is None:
        return predicted
    if answer not in answers:
        raise InputError(f"answer {answer!r} is not one of the model's answers")
    return list(answers).index(answer)


def token_occlusion_attribution(result: TokenOcclusionResult) -> Attribution:
    """``result`` as the ``token_occlusion`` section of ``explanation.json``."""
    extras: dict[str, Any] = {
        "grid": result.grid,
        "token_grid": list(result.token_grid),
        "baseline": result.baseline,
        "cells": [[list(rc) for rc in cell] for cell in result.cells],
        "flips": {"image": result.flips, "image_total": len(result.cells)},
    }
    if result.score != "probability":
        extras["score"] = result.score
    return Attribution(
        method="token-occlusion", key="token_occlusion", signed=True, answer=result.answer,
        answer_index=result.answer_index, probability=result.probability,
        image_map=np.asarray(result.image_map, dtype=np.float64),
        word_map=np.zeros(0, dtype=np.float64), tokens=(), extras=extras,
        stats={"image_flips": float(result.flips), "image_total": float(len(result.cells))},
    )

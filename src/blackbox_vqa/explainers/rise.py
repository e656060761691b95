"""RISE: randomised input sampling (Petsiuk, Das & Saenko 2018), through ``answer_probs_batch``.

Masks: ``N`` binary ``cells x cells`` grids, each cell kept with probability ``p``; each
is upsampled bilinearly to ``(cells + 1) * ch x (cells + 1) * cw`` (``ch = ceil(H /
cells)``, ``cw`` likewise) and cropped to the image's ``H x W`` at a random shift
``(dy, dx)`` in ``[0, ch) x [0, cw)``, giving a smooth mask ``M_i`` with values in
``[0, 1]``. The masked image is ``M_i * image + (1 - M_i) * baseline``. Importance of a
pixel is the mask-weighted mean score over the masks, normalised as the paper does:
``S = sum_i f(masked_i) M_i / (N p)``, where ``f`` is the answer's score
(``"probability"``) or its natural log (``"log-probability"``). The answer is the one
predicted on the original image unless another is asked for. Everything random comes
from ``seed``.

Bilinear upsampling uses pixel centres (``align_corners=False`` in PyTorch's terms):
output pixel ``i`` reads the grid at ``(i + 0.5) cells / size - 0.5``, clamped to the
grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_model, check_scores, model_name
from blackbox_vqa.adapters.capabilities import check_question, prepare_model
from blackbox_vqa.errors import InputError
from blackbox_vqa.explainers.batching import auto_batch_size, parse_batch_size
from blackbox_vqa.explainers.masks import baseline_image, parse_baseline
from blackbox_vqa.explainers.occlusion import Score, answer_score, parse_score
from blackbox_vqa.explainers.token_scores import score_batch, token_maps, token_scoring
from blackbox_vqa.explanation import Attribution, TokenMaps
from blackbox_vqa.images import ImageInput, to_rgb_array

__all__ = [
    "DEFAULT_CELLS",
    "DEFAULT_MASKS",
    "DEFAULT_P",
    "Rise",
    "RiseResult",
    "bilinear_weights",
    "rise_masks",
    "upsample",
]

DEFAULT_MASKS = 2000
DEFAULT_CELLS = 8
DEFAULT_P = 0.5

ProgressCallback = Callable[[int, int], None]


def bilinear_weights(size_in: int, size_out: int) -> NDArray[np.float64]:
    """``[size_out, size_in]`` bilinear interpolation weights (pixel centres, edges clamped)."""
    if size_in < 1 or size_out < 1:
        raise InputError(f"sizes must be >= 1, got {size_in} -> {size_out}")
    source = (np.arange(size_out, dtype=np.float64) + 0.5) * size_in / size_out - 0.5
    source = np.clip(source, 0.0, size_in - 1.0)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    frac = source - low
    weights = np.zeros((size_out, size_in), dtype=np.float64)
    rows = np.arange(size_out)
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def upsample(grids: NDArray[Any], height: int, width: int) -> NDArray[np.float64]:
    """Bilinear upsampling of ``[N, s, t]`` grids to ``[N, height, width]``."""
    values = np.asarray(grids, dtype=np.float64)
    rows = bilinear_weights(values.shape[1], height)
    cols = bilinear_weights(values.shape[2], width)
    return np.einsum("hs,nst,wt->nhw", rows, values, cols, optimize=True)


def rise_masks(
    grids: NDArray[np.bool_], shifts: NDArray[np.int64], height: int, width: int
) -> NDArray[np.float32]:
    """``float32 [N, H, W]`` masks from binary ``[N, s, s]`` grids and ``[N, 2]`` shifts
    ``(dy, dx)``: upsample to ``(s + 1) * ceil(H / s)`` by ``(s + 1) * ceil(W / s)`` and crop.

    Only the cropped rows and columns are computed: ``R[dy:dy+H] @ grid @ C[dx:dx+W].T``
    with the bilinear weight matrices ``R`` and ``C`` (:func:`bilinear_weights`).
    """
    cells = grids.shape[1]
    ch, cw = math.ceil(height / cells), math.ceil(width / cells)
    rows = bilinear_weights(cells, (cells + 1) * ch).astype(np.float32)
    cols = bilinear_weights(grids.shape[2], (cells + 1) * cw).astype(np.float32)
    dy, dx = shifts[:, 0], shifts[:, 1]
    row_w = rows[dy[:, None] + np.arange(height)[None, :]]  # [N, H, s]
    col_w = cols[dx[:, None] + np.arange(width)[None, :]]  # [N, W, s]
    out = np.matmul(np.matmul(row_w, grids.astype(np.float32)), col_w.transpose(0, 2, 1))
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class RiseResult:
    """What one RISE explanation found.

    Attributes:
        answer, answer_index: the answer explained (predicted unless one was asked for).
        predicted_index: the answer the model predicts on the original image.
        scores: the model's scores ``[A]`` on the original image (``float64``).
        image_map: ``float64 [H, W]`` importance ``sum_i f_i M_i / (N p)`` at the image's
            size (probabilities: in ``[0, 1 / p]``; log-probabilities: ``<= 0``).
        evaluations: inputs scored (the original and one per mask).
        settings: ``masks``, ``cells``, ``p``, ``seed``, ``baseline``, ``score``,
            ``batch_size``.
        token_maps: for a model that scores the answer token by token (generative
            models), one ``H x W`` map per answer token, ``sum_i f_i M_i / (N p)`` with
            ``f_i = log p(token | masked_i, prefix)``; they sum over the tokens to the
            ``"log-probability"`` map. None otherwise.
    """

    answer: str
    answer_index: int
    predicted_index: int
    scores: NDArray[np.float64]
    image_map: NDArray[np.float64]
    evaluations: int
    settings: dict[str, Any]
    token_maps: TokenMaps | None = None

    @property
    def probability(self) -> float:
        """Score of the explained answer on the original image."""
        return float(self.scores[self.answer_index])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the answer, its probability, the ``H x W`` map as nested lists,
        the settings and the number of inputs evaluated."""
        return {
            "answer": self.answer,
            "answer_index": self.answer_index,
            "predicted_index": self.predicted_index,
            "probability": self.probability,
            "image": self.image_map.tolist(),
            "image_size": list(self.image_map.shape),
            "settings": dict(self.settings),
            "evaluations": self.evaluations,
        }


class Rise:
    """RISE explainer for any object with the model protocol.

    Args:
        model: the model (``answers``, ``answer_probs_batch``).
        masks: number of random masks ``N`` (default 2000).
        cells: side of the low-resolution grid (default 8).
        p: probability that a cell is kept (default 0.5).
        seed: seed of the masks and shifts.
        baseline: what masked pixels become: ``"imagenet-mean"`` (default; the paper
            multiplies the normalised image by the mask, which fills with the data set's
            mean), ``"black"``, ``"blur"``, ``"R,G,B"`` or an RGB tuple (0-255).
        batch_size: ``"auto"`` or a positive int.
        score: ``"probability"`` (default) or ``"log-probability"``.
        progress: called as ``progress(done, total)`` after each batch.
    """

    def __init__(
        self,
        model: object,
        *,
        masks: int = DEFAULT_MASKS,
        cells: int = DEFAULT_CELLS,
        p: float = DEFAULT_P,
        seed: int = 0,
        baseline: str | tuple[float, float, float] = "imagenet-mean",
        batch_size: int | str = "auto",
        score: Score = "probability",
        progress: ProgressCallback | None = None,
    ) -> None:
        self.model = check_model(model)
        for name, value in (("masks", masks), ("cells", cells)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise InputError(f"p must be in (0, 1], got {p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative int, got {seed!r}")
        self.n_masks = masks
        self.cells = cells
        self.p = float(p)
        self.seed = seed
        if isinstance(baseline, tuple):
            baseline = ",".join(str(v) for v in baseline)
        self.baseline = parse_baseline(baseline)
        self.batch_size = parse_batch_size(batch_size)
        self.score = parse_score(score)
        self.progress = progress

    def _draw(self, height: int, width: int) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
        """The seeded binary grids ``[N, s, s]`` and shifts ``[N, 2]`` for an image size."""
        if height < self.cells or width < self.cells:
            raise InputError(
                f"an image of {height}x{width} px is smaller than the {self.cells}-cell grid"
            )
        rng = np.random.default_rng(self.seed)
        grids = rng.random((self.n_masks, self.cells, self.cells)) < self.p
        ch, cw = math.ceil(height / self.cells), math.ceil(width / self.cells)
        shifts = np.stack([rng.integers(0, ch, self.n_masks),
                           rng.integers(0, cw, self.n_masks)], axis=1).astype(np.int64)
        return grids, shifts

    def masks(self, height: int, width: int) -> NDArray[np.float32]:
        """All ``float32 [N, H, W]`` masks this explainer uses on an ``H x W`` image."""
        grids, shifts = self._draw(height, width)
        return rise_masks(grids, shifts, height, width)

    def explain(
        self, image: ImageInput, question: str, *, answer: str | None = None
    ) -> RiseResult:
        """Explain the answer to ``question`` on ``image``; see :class:`RiseResult`."""
        question = check_question(self.model, question)
        pixels = to_rgb_array(image).astype(np.float32)
        prepare_model(self.model, pixels, question)
        height, width = pixels.shape[:2]
        grids, shifts = self._draw(height, width)
        sigma = max(1.0, max(height, width) / self.cells)
        fill = baseline_image(pixels, self.baseline, blur_sigma=sigma).astype(np.float32)
        total = 1 + self.n_masks
        batch = self.batch_size or auto_batch_size(self.model, pixels.shape, total)
        with_tokens = token_scoring(self.model)
        found, first = self._scores([pixels], question, with_tokens)
        original = found[0]
        predicted = int(np.argmax(original))
        index = self._answer_index(answer, predicted)
        saliency = np.zeros((height, width), dtype=np.float64)
        per_token = None if first is None else np.zeros((first.shape[1], height, width))
        done = 1
        for start in range(0, self.n_masks, batch):
            stop = min(self.n_masks, start + batch)
            masks = rise_masks(grids[start:stop], shifts[start:stop], height, width)
            images = fill + masks[..., None] * (pixels - fill)
            scores, logp = self._scores(list(images), question, with_tokens)
            values = answer_score(scores[:, index], self.score)
            weights = masks.astype(np.float64)
            saliency += np.tensordot(values, weights, axes=1)
            if per_token is not None and logp is not None:
                per_token += np.tensordot(logp.T, weights, axes=1)
            done += stop - start
            if self.progress is not None:
                self.progress(done, total)
        maps = None
        if per_token is not None and first is not None:
            norm = self.n_masks * self.p
            maps = token_maps(self.model, self.model.answers[index], first[0],
                              [m / norm for m in per_token],
                              [np.zeros(0) for _ in per_token])
        return RiseResult(
            answer=self.model.answers[index],
            answer_index=index,
            predicted_index=predicted,
            scores=original,
            image_map=saliency / (self.n_masks * self.p),
            evaluations=total,
            settings={
                "masks": self.n_masks, "cells": self.cells, "p": self.p, "seed": self.seed,
                "baseline": "rgb" if isinstance(self.baseline, tuple) else self.baseline,
                "score": self.score, "batch_size": batch,
            },
            token_maps=maps,
        )

    def _scores(self, images: list[NDArray[np.float32]], question: str, tokens: bool
                ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
        result, logp = score_batch(self.model, images, [question] * len(images),
                                   tokens=tokens)
        return check_scores(result, len(images), len(self.model.answers),
                            source=model_name(self.model)), logp

    def _answer_index(self, answer: str | None, predicted: int) -> int:
        if answer is None:
            return predicted
        if answer not in self.model.answers:
            raise InputError(f"answer {answer!r} is not one of the model's answers")
        return list(self.model.answers).index(answer)


def rise_attribution(result: RiseResult) -> Attribution:
    """``result`` as the ``rise`` attribution (an image map at the image's size; no word
    map)."""
    return Attribution(
        method="rise",
        key="rise",
        signed=False,
        answer=result.answer,
        answer_index=result.answer_index,
        probability=result.probability,
        image_map=np.asarray(result.image_map, dtype=np.float64),
        word_map=np.zeros(0, dtype=np.float64),
        tokens=(),
        extras={"image_size": list(result.image_map.shape), "settings": dict(result.settings),
                "evaluations": result.evaluations},
        stats={"evaluations": float(result.evaluations)},
        answer_tokens=result.token_maps,
    )

"""Modality share (MM-SHAP, Parcalabescu & Frank, ACL 2023) through ``answer_probs_batch``.

Players: the cells of a ``grid x grid`` lattice of the image (row-major, top row first,
cut as occlusion cuts it) and the words of the question, ``n = grid**2 + words``. The
value of a coalition ``S`` is the score of the explained answer when every cell outside
``S`` is filled with the baseline and every word outside ``S`` is dropped from the
question (both exactly as occlusion does). Shapley values ``phi`` are estimated from
permutations: a permutation's marginal contributions ``v(prefix + i) - v(prefix)``
telescope, so every permutation, and any mean of them, satisfies
``sum(phi) = v(all) - v(none)`` (efficiency) to rounding.

Sampling: ``"antithetic"`` (default) draws ``permutations / 2`` random permutations and
adds each one reversed (a pair is one sampling unit; reversing cancels every pairwise
interaction's noise); ``"plain"`` draws ``permutations`` independent ones (each a unit);
``"exhaustive"`` walks all ``n!`` permutations (exact; small ``n`` only). Standard
errors: the sample standard deviation over units over ``sqrt(units)``.

Modality share: ``T-SHAP = sum|phi_words| / (sum|phi_words| + sum|phi_cells|)``,
``V-SHAP = 1 - T-SHAP``; its standard error by the delta method: the units' ``phi``
vectors are projected on the gradient of ``T`` (``sign(phi_w) B / (A + B)**2`` for a word,
``-sign(phi_c) A / (A + B)**2`` for a cell, ``A``/``B`` the word/cell sums) and the
projection's standard error is reported.

Each distinct coalition is scored once (a cache keyed by the coalition); coalitions are
sent in batches of whole permutations where the batch size allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_model, check_scores, model_name
from blackbox_vqa.adapters.capabilities import check_question, prepare_model
from blackbox_vqa.errors import InputError
from blackbox_vqa.explainers.batching import auto_batch_size, parse_batch_size
from blackbox_vqa.explainers.masks import baseline_image, cell_edges, grid_boxes, parse_baseline
from blackbox_vqa.explainers.occlusion import Score, answer_score, parse_score
from blackbox_vqa.explainers.shapley import (
    EXHAUSTIVE_MAX_PLAYERS,
    SAMPLINGS,
    modality_share,
    modality_share_evaluations,
    permutation_marginals,
    permutation_units,
    prefix_masks,
    t_shap_standard_error,
    unit_estimate,
)
from blackbox_vqa.explainers.token_scores import score_batch, token_maps, token_scoring
from blackbox_vqa.explanation import Attribution, TokenMaps
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.text import keep_words, split_words

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_PERMUTATIONS",
    "ModalityShare",
    "ModalityShareResult",
    "Sampling",
    "modality_share_attribution",
]

Sampling = Literal["antithetic", "plain", "exhaustive"]
DEFAULT_GRID = 4
# 32 permutations (16 antithetic pairs): on 20 easy-VQA items the reference model's s.e. of
# T-SHAP is then 0.028 (median; benchmarks/BENCHMARKS.md), for ~n - 1 inputs a permutation.
DEFAULT_PERMUTATIONS = 32

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ModalityShareResult:
    """What one MM-SHAP explanation found.

    Attributes:
        answer, answer_index: the answer explained (predicted unless one was asked for).
        predicted_index: the answer predicted on the original input; ``scores`` the
            model's scores ``[A]`` there (``float64``).
        grid: cells per side; ``words`` the question's words (the word players).
        phi, phi_se: ``float64 [grid**2 + len(words)]`` Shapley values (cells row-major,
            then words) and their standard errors (0 when exhaustive, NaN with one unit).
        t_shap, v_shap, t_shap_se: the modality shares and the s.e. of T-SHAP (NaN when
            undefined).
        value_all, value_none: the value of every player / of none (the original input;
            all cells filled and all words dropped).
        permutations, units: permutations walked and sampling units (pairs when
            antithetic).
        evaluations, model_calls: inputs scored (distinct coalitions) and
            ``answer_probs_batch`` calls.
        settings: ``grid``, ``permutations``, ``sampling``, ``seed``, ``baseline``,
            ``score``, ``batch_size``.
        token_maps: for a model that scores the answer token by token (generative
            models), the Shapley values of each answer token's log-probability given its
            prefix (same permutations, same model calls), as ``grid x grid`` and word
            maps; they sum over the tokens to the ``"log-probability"`` values. Else None.
    """

    answer: str
    answer_index: int
    predicted_index: int
    scores: NDArray[np.float64]
    grid: int
    words: tuple[str, ...]
    phi: NDArray[np.float64]
    phi_se: NDArray[np.float64]
    t_shap: float
    v_shap: float
    t_shap_se: float
    value_all: float
    value_none: float
    permutations: int
    units: int
    evaluations: int
    model_calls: int
    settings: dict[str, Any]
    token_maps: TokenMaps | None = None

    @property
    def cells(self) -> int:
        """Number of image players (``grid**2``)."""
        return self.grid * self.grid

    @property
    def image_map(self) -> NDArray[np.float64]:
        """The cells' Shapley values as a ``grid x grid`` map."""
        return self.phi[: self.cells].reshape(self.grid, self.grid)

    @property
    def word_map(self) -> NDArray[np.float64]:
        """The words' Shapley values, one per word."""
        return self.phi[self.cells:]

    @property
    def probability(self) -> float:
        """Score of the explained answer on the original input."""
        return float(self.scores[self.answer_index])

    @property
    def efficiency_gap(self) -> float:
        """``sum(phi) - (value_all - value_none)``: zero up to rounding."""
        return float(self.phi.sum() - (self.value_all - self.value_none))


class _Coalitions:
    """Scores coalitions of one input (cache, batching); coalitions are Python int
    bitmasks, bit ``k`` = player ``k`` present (cells row-major, then words).

    ``scores`` maps each coalition scored to the value of answer ``index`` (set once the
    answer is known); ``calls`` counts ``answer_probs_batch`` calls.
    """

    def __init__(self, model: Any, pixels: NDArray[np.float32], fill: NDArray[np.float32],
                 *, grid: int, question: str, score: Score) -> None:
        self.model, self.pixels, self.fill, self.score = model, pixels, fill, score
        self.boxes = grid_boxes(pixels.shape[0], pixels.shape[1], grid)
        self.cells, self.question = grid * grid, question
        self.words = len(split_words(question))
        self.scores: dict[int, float] = {}
        self._questions: dict[bytes, str] = {}
        self.calls = 0
        self.index = -1
        self.tokens = token_scoring(model)
        self.token_scores: dict[int, NDArray[np.float64]] = {}

    def present(self, masks: Sequence[int]) -> NDArray[np.bool_]:
        """``bool [len(masks), players]`` membership of each coalition."""
        players = self.cells + self.words
        size = (players + 7) // 8
        raw = np.frombuffer(b"".join(m.to_bytes(size, "little") for m in masks),
                            dtype=np.uint8).reshape(len(masks), size)
        return np.unpackbits(raw, axis=1, bitorder="little")[:, :players].astype(bool)

    def inputs(self, masks: Sequence[int]) -> tuple[list[NDArray[np.float32]], list[str]]:
        present = self.present(masks)
        cells = present[:, : self.cells]
        images = np.empty((len(masks), *self.pixels.shape), dtype=np.float32)
        images[...] = self.pixels
        for k, (top, bottom, left, right) in enumerate(self.boxes):
            absent = np.flatnonzero(~cells[:, k])
            if absent.size:
                images[absent, top:bottom, left:right] = self.fill[top:bottom, left:right]
        questions = []
        for row in present[:, self.cells:]:
            key = row.tobytes()
            text = self._questions.get(key)
            if text is None:
                text = self._questions[key] = keep_words(self.question, list(row))
            questions.append(text)
        return list(images), questions

    def raw(self, masks: Sequence[int]) -> NDArray[np.float64]:
        images, questions = self.inputs(masks)
        result, logp = score_batch(self.model, images, questions, tokens=self.tokens)
        self.calls += 1
        if logp is not None:
            self.token_scores.update(zip(masks, logp, strict=True))
        return check_scores(result, len(masks), len(self.model.answers),
                            source=model_name(self.model))

    def score_all(self, masks: Sequence[int], batch: int) -> None:
        for start in range(0, len(masks), batch):
            chunk = masks[start: start + batch]
            values = answer_score(self.raw(chunk)[:, self.index], self.score)
            self.scores.update(zip(chunk, values.tolist(), strict=True))


class ModalityShare:
    """MM-SHAP explainer for any object with the model protocol.

    Args:
        model: the model (``answers``, ``answer_probs_batch``).
        grid: image cells per side (default 4: 16 image players).
        permutations: permutations sampled (default 32); even for ``"antithetic"``;
            ignored for ``"exhaustive"``.
        sampling: ``"antithetic"`` (default), ``"plain"`` or ``"exhaustive"``.
        seed: seed of the permutations.
        baseline: fill of absent cells: ``"imagenet-mean"`` (default), ``"black"``,
            ``"blur"``, ``"R,G,B"`` or an RGB tuple (0-255).
        batch_size: ``"auto"`` or a positive int (inputs per model call).
        score: ``"probability"`` (default) or ``"log-probability"``: the coalition value.
        progress: called as ``progress(permutations done, permutations)``.
    """

    def __init__(
        self,
        model: object,
        *,
        grid: int = DEFAULT_GRID,
        permutations: int = DEFAULT_PERMUTATIONS,
        sampling: str = "antithetic",
        seed: int = 0,
        baseline: str | tuple[float, float, float] = "imagenet-mean",
        batch_size: int | str = "auto",
        score: str = "probability",
        progress: ProgressCallback | None = None,
    ) -> None:
        self.model = check_model(model)
        for name, value in (("grid", grid), ("permutations", permutations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if sampling not in SAMPLINGS:
            raise InputError(f"sampling must be one of {', '.join(SAMPLINGS)}, got "
                             f"{sampling!r}")
        if sampling == "antithetic" and permutations % 2:
            raise InputError("permutations must be even with antithetic sampling (pairs of "
                             f"a permutation and its reverse), got {permutations}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.grid, self.permutations, self.seed = grid, permutations, seed
        self.sampling: Sampling = sampling  # type: ignore[assignment]
        if isinstance(baseline, tuple):
            baseline = ",".join(str(v) for v in baseline)
        self.baseline = parse_baseline(baseline)
        self.batch_size = parse_batch_size(batch_size)
        self.score = parse_score(score)
        self.progress = progress

    @staticmethod
    def players_of(image_shape: Sequence[int], question: str, grid: int) -> int:
        """Players of an input: ``grid**2`` cells plus the question's words; InputError
        when the image cannot be cut into the grid."""
        try:
            cell_edges(int(image_shape[0]), grid)
            cell_edges(int(image_shape[1]), grid)
        except InputError as exc:
            raise InputError(f"mm-shap grid {grid}: {exc}") from exc
        return grid * grid + len(split_words(question))

    def explain(
        self, image: ImageInput, question: str, *, answer: str | None = None
    ) -> ModalityShareResult:
        """Estimate the Shapley values and modality shares; see :class:`ModalityShareResult`."""
        question = check_question(self.model, question)
        pixels = to_rgb_array(image).astype(np.float32)
        prepare_model(self.model, pixels, question)
        players = self.players_of(pixels.shape, question, self.grid)
        if self.sampling == "exhaustive" and players > EXHAUSTIVE_MAX_PLAYERS:
            raise InputError(f"exhaustive sampling walks n! permutations: at most "
                             f"{EXHAUSTIVE_MAX_PLAYERS} players, this input has {players} "
                             f"({self.grid}x{self.grid} cells + words)")
        sigma = max(1.0, max(pixels.shape[:2]) / self.grid)
        fill = baseline_image(pixels, self.baseline, blur_sigma=sigma).astype(np.float32)
        coalitions = _Coalitions(self.model, pixels, fill, grid=self.grid, question=question,
                                 score=self.score)
        full = (1 << players) - 1
        planned = modality_share_evaluations(players, self.permutations, self.sampling)
        batch = self.batch_size or auto_batch_size(self.model, pixels.shape, planned)
        ends = coalitions.raw([full, 0])
        original = ends[0]
        predicted = int(np.argmax(original))
        index = self._answer_index(answer, predicted)
        coalitions.index = index
        values = answer_score(ends[:, index], self.score)
        coalitions.scores.update({full: float(values[0]), 0: float(values[1])})
        units, token_units = self._units(coalitions, players, batch)
        phi, phi_se = unit_estimate(units)
        if self.sampling == "exhaustive":
            phi_se = np.zeros_like(phi)
        cells = self.grid * self.grid
        t_shap, v_shap = modality_share(phi, cells)
        t_se = 0.0 if self.sampling == "exhaustive" and math.isfinite(t_shap) else \
            t_shap_standard_error(units, cells)
        return ModalityShareResult(
            answer=self.model.answers[index], answer_index=index, predicted_index=predicted,
            scores=original, grid=self.grid, words=tuple(split_words(question)),
            phi=phi, phi_se=phi_se, t_shap=t_shap, v_shap=v_shap, t_shap_se=t_se,
            value_all=coalitions.scores[full], value_none=coalitions.scores[0],
            permutations=units.shape[0] * (2 if self.sampling == "antithetic" else 1),
            units=units.shape[0], evaluations=len(coalitions.scores),
            model_calls=coalitions.calls,
            settings={"grid": self.grid, "permutations": self.permutations,
                      "sampling": self.sampling, "seed": self.seed,
                      "baseline": "rgb" if isinstance(self.baseline, tuple) else self.baseline,
                      "score": self.score, "batch_size": batch},
            token_maps=self._token_maps(coalitions, token_units, index),
        )

    def _token_maps(self, coalitions: _Coalitions, token_units: NDArray[np.float64] | None,
                    index: int) -> TokenMaps | None:
        """Per answer token: the mean over units of its Shapley vectors ``[U, n, L]``."""
        if token_units is None or not len(token_units):
            return None
        phi = token_units.mean(axis=0)  # [n, L]
        cells = self.grid * self.grid
        full = (1 << phi.shape[0]) - 1
        return token_maps(self.model, self.model.answers[index], coalitions.token_scores[full],
                          [phi[:cells, i].reshape(self.grid, self.grid)
                           for i in range(phi.shape[1])],
                          [phi[cells:, i].copy() for i in range(phi.shape[1])])

    def _units(self, coalitions: _Coalitions, players: int, batch: int
               ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
        """Every unit's Shapley vector ``[U, n]``: whole permutations are scored together
        (pending coalitions go to the model when the next unit would not fit a batch);
        with answer-token scores also each unit's per-token vectors ``[U, n, L]``."""
        total = math.factorial(players) if self.sampling == "exhaustive" else \
            self.permutations
        rows: list[NDArray[np.float64]] = []
        token_rows: list[NDArray[np.float64]] = []
        pending: list[list[NDArray[np.int64]]] = []
        wanted: dict[int, None] = {}
        done = 0

        def flush() -> None:
            nonlocal done
            coalitions.score_all(list(wanted), batch)
            for unit in pending:
                marginals = [permutation_marginals(order, np.array(
                    [coalitions.scores[m] for m in prefix_masks(order)])) for order in unit]
                rows.append(np.mean(marginals, axis=0))
                if coalitions.token_scores:
                    token_rows.append(np.mean([_token_marginals(order, np.array(
                        [coalitions.token_scores[m] for m in prefix_masks(order)]))
                        for order in unit], axis=0))
                done += len(unit)
            pending.clear()
            wanted.clear()
            if self.progress is not None:
                self.progress(done, total)

        for unit in permutation_units(players, self.permutations, self.sampling, self.seed):
            new = [m for order in unit for m in prefix_masks(order)
                   if m not in coalitions.scores and m not in wanted]
            if wanted and len(wanted) + len(new) > batch:
                flush()
            pending.append(unit)
            wanted.update(dict.fromkeys(new))
        flush()
        tokens = np.asarray(token_rows, dtype=np.float64) if token_rows else None
        return np.asarray(rows, dtype=np.float64), tokens

    def _answer_index(self, answer: str | None, predicted: int) -> int:
        if answer is None:
            return predicted
        if answer not in self.model.answers:
            raise InputError(f"answer {answer!r} is not one of the model's answers")
        return list(self.model.answers).index(answer)


def _token_marginals(order: NDArray[np.int64], prefix_values: NDArray[np.float64]
                     ) -> NDArray[np.float64]:
    """:func:`permutation_marginals` of ``[n + 1, L]`` prefix values: ``[n, L]``."""
    out = np.empty((order.size, prefix_values.shape[1]), dtype=np.float64)
    out[order] = np.diff(prefix_values, axis=0)
    return out


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _finite_list(values: NDArray[np.float64]) -> list[Any]:
    return [_finite(float(v)) for v in np.asarray(values).reshape(-1)]


def modality_share_attribution(result: ModalityShareResult) -> Attribution:
    """``result`` as the ``mm_shap`` attribution: the cells' Shapley values as the image
    map (``grid x grid``), the words' as the word map, T-SHAP/V-SHAP and the standard
    errors in its section (null where undefined)."""
    cells = result.cells
    grid_se = _finite_list(result.phi_se[:cells])
    extras = {
        "t_shap": _finite(result.t_shap),
        "v_shap": _finite(result.v_shap),
        "t_shap_se": _finite(result.t_shap_se),
        "se_method": "delta method over sampling units" if result.settings["sampling"] !=
        "exhaustive" else "exact (every permutation)",
        "image_se": [grid_se[r * result.grid:(r + 1) * result.grid]
                     for r in range(result.grid)],
        "words_se": _finite_list(result.phi_se[cells:]),
        "value_all": result.value_all,
        "value_none": result.value_none,
        "efficiency_gap": result.efficiency_gap,
        "players": {"cells": cells, "words": len(result.words)},
        "permutations_walked": result.permutations,
        "units": result.units,
        "settings": dict(result.settings),
        "evaluations": result.evaluations,
        "model_calls": result.model_calls,
    }
    stats = {"evaluations": float(result.evaluations),
             "model_calls": float(result.model_calls),
             "t_shap_defined": float(math.isfinite(result.t_shap))}
    for key, value in (("t_shap", result.t_shap), ("v_shap", result.v_shap),
                       ("t_shap_se", result.t_shap_se)):
        if math.isfinite(value):
            stats[key] = float(value)
    return Attribution(
        method="mm-shap",
        key="mm_shap",
        signed=True,
        answer=result.answer,
        answer_index=result.answer_index,
        probability=result.probability,
        image_map=np.asarray(result.image_map, dtype=np.float64),
        word_map=np.asarray(result.word_map, dtype=np.float64),
        tokens=result.words,
        extras=extras,
        stats=stats,
        answer_tokens=result.token_maps,
    )

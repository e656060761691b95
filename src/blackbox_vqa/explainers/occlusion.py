"""Occlusion: the paper's discrete derivatives, through ``answer_probs_batch`` only.

Image: cells of a ``grid x grid`` lattice (or sliding windows) are filled with a baseline
one at a time; importance = ``p(a | original) - p(a | occluded)``. Words: each word is
dropped from the question in turn; importance = ``p(a | original) - p(a | without it)``.
``a`` is the answer predicted on the original input unless another is asked for. Every
perturbed input goes through the model in batches; the original input is evaluated once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_model, check_scores, model_name
from blackbox_vqa.adapters.capabilities import check_question, prepare_model
from blackbox_vqa.adapters.incremental import (
    ApproximateScoring,
    IncrementalScoring,
    approx_tau,
    parse_incremental,
)
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.explainers.approx_check import ApproxEstimate, check_cells, estimate
from blackbox_vqa.explainers.batching import auto_batch_size, parse_batch_size
from blackbox_vqa.explainers.masks import (
    IMAGENET_MEAN_RGB,
    Box,
    baseline_image,
    grid_boxes,
    occluded_batch,
    parse_baseline,
    window_boxes,
    window_map,
)
from blackbox_vqa.explainers.token_scores import score_batch, token_maps, token_scoring
from blackbox_vqa.explanation import Attribution, TokenMaps
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.text import drop_word, split_words

__all__ = [
    "LOG_FLOOR",
    "SCORES",
    "Occlusion",
    "OcclusionResult",
    "ProgressCallback",
    "Score",
    "answer_score",
    "occlusion_attribution",
    "parse_score",
]

ProgressCallback = Callable[[int, int], None]
Score = Literal["probability", "log-probability"]
SCORES: tuple[str, ...] = ("probability", "log-probability")
# Scores are clipped to this before the log, so a zero score gives a finite value.
LOG_FLOOR = 1e-30


def parse_score(score: str) -> Score:
    """Check a ``score`` option: ``"probability"`` or ``"log-probability"``."""
    if score not in SCORES:
        raise InputError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    return score  # type: ignore[return-value]


def answer_score(values: NDArray[np.floating[Any]], score: Score) -> NDArray[np.float64]:
    """The model's scores as given (``"probability"``) or their natural log
    (``"log-probability"``, scores clipped to ``1e-30`` first so zero stays finite)."""
    array = np.asarray(values, dtype=np.float64)
    if score == "log-probability":
        return np.log(np.maximum(array, LOG_FLOOR))
    return array
# Perturbations per incremental call: patches of many small windows batch well, and the
# full tensors past the first global operator stay small (benchmarks/BENCHMARKS.md).
INCREMENTAL_BATCH = 64


@dataclass(frozen=True)
class OcclusionResult:
    """What one occlusion explanation found.

    Attributes:
        answer, answer_index: the answer explained (predicted unless one was asked for).
        predicted_index: the answer the model predicts on the original input.
        scores: the model's scores ``[A]`` on the original input (``float64``).
        image_map: ``grid x grid`` (mode ``"grid"``) or ``H x W`` (mode ``"window"``)
            importances ``p(a|original) - p(a|occluded)``, row-major, top row first
            (``log p`` in place of ``p`` when ``score == "log-probability"``).
        words, word_map: the question's words and one importance per word.
        image_flips, word_flips: perturbations that changed the predicted answer.
        image_perturbations: how many patches were occluded.
        batch_size, evaluations: the batch size used and the number of inputs evaluated.
        baseline: the baseline's name (``"imagenet-mean"``, ``"black"``, ``"blur"``) or
            ``"rgb"``; ``baseline_rgb`` holds the fill colour when it is one.
        score: ``"probability"`` or ``"log-probability"``: what the importances compare.
        incremental: ``"exact"`` when the model scored the perturbations incrementally
            (its ``IncrementalScoring`` capability), else ``"off"``; ``incremental_note``
            says why the plain path ran, or what the incremental path reused;
            ``"approx"`` when the image cells were scored approximately, with
            ``approx`` the error measured on a few cells also scored exactly.
        token_maps: for a model that scores the answer token by token (generative
            models), one image and word map per answer token, each with the importance
            ``log p(token_i | original, prefix) - log p(token_i | perturbed, prefix)``
            (whatever ``score``); they sum over the tokens to the ``"log-probability"``
            maps. None otherwise (and on the incremental path).
    """

    answer: str
    answer_index: int
    predicted_index: int
    scores: NDArray[np.float64]
    image_map: NDArray[np.float64]
    mode: Literal["grid", "window"]
    grid: int | None
    window: tuple[int, int] | None
    stride: tuple[int, int] | None
    baseline: str
    baseline_rgb: tuple[float, float, float] | None
    image_shape: tuple[int, int]
    words: tuple[str, ...]
    word_map: NDArray[np.float64]
    image_flips: int
    word_flips: int
    image_perturbations: int
    batch_size: int
    evaluations: int
    score: Score = "probability"
    incremental: str = "off"
    incremental_note: str = ""
    approx: ApproxEstimate | None = None
    token_maps: TokenMaps | None = None

    @property
    def probability(self) -> float:
        """Score of the explained answer on the original input."""
        return float(self.scores[self.answer_index])


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise InputError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


class Occlusion:
    """Occlusion explainer for any object with the model protocol.

    Args:
        model: the model (``answers``, ``answer_probs_batch``).
        grid: cells per side of the lattice (default 16, the paper's).
        window: sliding-window mode instead of the grid: patch size in pixels; importance
            of a pixel is the mean over the windows covering it.
        stride: sliding-window step in pixels (default: ``window``).
        baseline: ``"imagenet-mean"`` (default), ``"black"``, ``"blur"``, ``"R,G,B"`` or an
            RGB tuple on the 0-255 scale.
        blur_sigma: Gaussian sigma in pixels for ``"blur"`` (default: the cell size).
        batch_size: ``"auto"`` or a positive int.
        memory_budget: bytes the automatic batch size may plan for.
        image: whether to occlude image cells.
        words: whether to drop question words.
        progress: called as ``progress(done, total)`` after each batch.
        score: ``"probability"`` (default, the paper's) or ``"log-probability"``: the
            importances compare the answer's score or its natural log (a saturated model,
            p near 1, shows structure in log space that probabilities round away).
        incremental: ``"exact"`` (default): a model with the ``IncrementalScoring``
            capability scores the perturbations incrementally (same scores, less work);
            ``"off"``: always through ``answer_probs_batch``; ``"approx"`` or
            ``"approx:TAU"``: a model with the ``ApproximateScoring`` capability caps each
            changed region at ``TAU`` (default 0.6) of each feature map's side (Krypton's
            projective-field thresholding; approximate maps), and a seeded sample of
            cells is also scored exactly to measure the error.
    """

    def __init__(
        self,
        model: object,
        *,
        grid: int = 16,
        window: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        baseline: str | tuple[float, float, float] = "imagenet-mean",
        blur_sigma: float | None = None,
        batch_size: int | str = "auto",
        memory_budget: int = 512 * 2**20,
        image: bool = True,
        words: bool = True,
        progress: ProgressCallback | None = None,
        score: Score = "probability",
        incremental: str = "exact",
    ) -> None:
        self.model = check_model(model)
        self.score = parse_score(score)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise InputError(f"grid must be a positive integer, got {grid!r}")
        self.grid = grid
        self.window = _pair(window, "window")
        self.stride = _pair(stride, "stride") or self.window
        if self.stride is not None and self.window is None:
            raise InputError("stride needs a window")
        self.baseline = parse_baseline(baseline) if isinstance(baseline, str) else baseline
        if isinstance(self.baseline, tuple):
            self.baseline = parse_baseline(",".join(str(v) for v in self.baseline))
        if blur_sigma is not None and not blur_sigma > 0:
            raise InputError(f"blur_sigma must be > 0, got {blur_sigma!r}")
        self.blur_sigma = blur_sigma
        self.batch_size = parse_batch_size(batch_size)
        if memory_budget < 1:
            raise InputError(f"memory_budget must be positive, got {memory_budget!r}")
        self.memory_budget = memory_budget
        if not (image or words):
            raise InputError("nothing to occlude: enable image or words")
        self.occlude_image = image
        self.occlude_words = words
        self.progress = progress
        self.incremental = parse_incremental(incremental)
        self.tau = approx_tau(self.incremental)
        if self.tau is not None and not isinstance(self.model, ApproximateScoring):
            raise NotSupportedError(
                f"incremental {self.incremental}: {model_name(self.model)} has no approximate "
                "incremental scoring (a PyTorch module through TorchAdapter has it); use exact "
                "or off"
            )

    def boxes(self, height: int, width: int) -> list[Box]:
        """The patches this explainer occludes on an ``height x width`` image."""
        if self.window is not None and self.stride is not None:
            return window_boxes(height, width, self.window, self.stride)
        return grid_boxes(height, width, self.grid)

    def explain(
        self, image: ImageInput, question: str, *, answer: str | None = None
    ) -> OcclusionResult:
        """Occlude ``image`` and ``question``; see :class:`OcclusionResult`."""
        question = check_question(self.model, question)
        pixels = to_rgb_array(image).astype(np.float32)
        prepare_model(self.model, pixels, question)
        height, width = pixels.shape[:2]
        boxes = self.boxes(height, width) if self.occlude_image else []
        words = split_words(question) if self.occlude_words else []
        fill = self._fill(pixels)
        mode, note = "off", ""
        tokens: NDArray[np.float64] | None = None
        if self.tau is not None or (
                self.incremental == "exact" and isinstance(self.model, IncrementalScoring)):
            scores, batch, mode, note = self._run_incremental(
                self.model, pixels, fill, boxes, question, words  # type: ignore[arg-type]
            )
        else:
            scores, batch, tokens = self._run(pixels, fill, boxes, question, words)
            if self.incremental == "off":
                note = "incremental scoring turned off"
        result = self._result(scores, batch, boxes, words, (height, width), answer)
        result = replace(result, incremental=mode, incremental_note=note)
        if mode == "off" and tokens is not None:
            result = replace(result, token_maps=self._token_maps(
                result.answer, tokens, boxes, (height, width)))
        if mode == "approx" and self.tau is not None:
            checked = self._check(pixels, fill, boxes, question, scores, result.answer_index,
                                  self.tau)
            result = replace(result, approx=checked,
                             evaluations=result.evaluations + len(checked.cells))
        return result

    def _check(
        self,
        pixels: NDArray[np.float32],
        fill: NDArray[np.float32],
        boxes: list[Box],
        question: str,
        scores: NDArray[np.float64],
        index: int,
        tau: float,
    ) -> ApproxEstimate:
        """Score a seeded sample of the cells exactly and compare their importances."""
        cells = check_cells(len(boxes))
        images = list(occluded_batch(pixels, fill, [boxes[i] for i in cells]))
        questions = [question] * len(cells)
        if isinstance(self.model, IncrementalScoring):
            raw: Any = self.model.incremental_scores(pixels, question, images, questions).scores
        else:
            raw = self.model.answer_probs_batch(images, questions)
        exact = check_scores(raw, len(cells), scores.shape[1], source=model_name(self.model))
        original = answer_score(scores[0, index], self.score)
        approximate = original - answer_score(scores[[1 + i for i in cells], index], self.score)
        exact_map = original - answer_score(exact[:, index], self.score)
        return estimate(tau, cells, approximate, exact_map)

    def _fill(self, pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        sigma = self.blur_sigma
        if sigma is None:
            side = max(pixels.shape[0], pixels.shape[1])
            cell = self.window[0] if self.window else side / self.grid
            sigma = max(1.0, float(cell))
        return baseline_image(pixels, self.baseline, blur_sigma=sigma)

    def _run(
        self,
        pixels: NDArray[np.float32],
        fill: NDArray[np.float32],
        boxes: list[Box],
        question: str,
        words: list[str],
    ) -> tuple[NDArray[np.float64], int, NDArray[np.float64] | None]:
        """Scores ``[1 + len(boxes) + len(words), A]`` (original, cells, words), the batch
        size, and the answer tokens' log-probabilities ``[same rows, L]`` when the model
        gives them (same forward passes), else None."""
        total = 1 + len(boxes) + len(words)
        with_tokens = token_scoring(self.model)
        tokens: NDArray[np.float64] | None = None
        batch = self.batch_size or auto_batch_size(
            self.model, pixels.shape, total, memory_budget=self.memory_budget
        )
        dropped = [drop_word(question, i) for i in range(len(words))]
        out = np.empty((0, 0), dtype=np.float64)
        name = model_name(self.model)
        for start in range(0, total, batch):
            stop = min(total, start + batch)
            images, questions = self._items(pixels, fill, boxes, question, dropped, start, stop)
            result, logp = score_batch(self.model, images, questions, tokens=with_tokens)
            if start == 0:  # read after the first call: a model may learn its answers in it
                out = np.empty((total, len(self.model.answers)), dtype=np.float64)
                if logp is not None:
                    tokens = np.empty((total, logp.shape[1]), dtype=np.float64)
            out[start:stop] = check_scores(result, stop - start, out.shape[1], source=name)
            if tokens is not None and logp is not None:
                tokens[start:stop] = logp
            if self.progress is not None:
                self.progress(stop, total)
        return out, batch, tokens

    def _token_maps(
        self, answer: str, tokens: NDArray[np.float64], boxes: list[Box],
        shape: tuple[int, int],
    ) -> TokenMaps | None:
        """One image and word map per answer token: ``tokens`` ``[rows, L]`` in
        :meth:`_run`'s row order, compared in log space."""
        image_deltas = tokens[0] - tokens[1 : 1 + len(boxes)]
        word_deltas = tokens[0] - tokens[1 + len(boxes) :]
        images = [self._image_map(image_deltas[:, i], boxes, shape)[0]
                  for i in range(tokens.shape[1])]
        words = [word_deltas[:, i].copy() for i in range(tokens.shape[1])]
        return token_maps(self.model, answer, tokens[0], images, words)

    def _run_incremental(
        self,
        model: IncrementalScoring | ApproximateScoring,
        pixels: NDArray[np.float32],
        fill: NDArray[np.float32],
        boxes: list[Box],
        question: str,
        words: list[str],
    ) -> tuple[NDArray[np.float64], int, str, str]:
        """:meth:`_run` through the model's incremental scoring: the original input once,
        the perturbations in batches of ``batch_size`` (default :data:`INCREMENTAL_BATCH`).
        Also returns the mode (``"exact"`` only if every batch was) and the model's note."""
        total = 1 + len(boxes) + len(words)
        batch = self.batch_size or min(INCREMENTAL_BATCH, total - 1)
        n_answers = len(self.model.answers)
        dropped = [drop_word(question, i) for i in range(len(words))]
        out = np.empty((total, n_answers), dtype=np.float64)
        name = model_name(self.model)
        modes: set[str] = set()
        note = ""
        for start in range(1, total, batch):
            stop = min(total, start + batch)
            images, questions = self._items(pixels, fill, boxes, question, dropped, start, stop)
            if self.tau is not None:
                assert isinstance(model, ApproximateScoring)
                result = model.approximate_scores(pixels, question, images, questions,
                                                  tau=self.tau)
            else:
                assert isinstance(model, IncrementalScoring)
                result = model.incremental_scores(pixels, question, images, questions)
            out[0] = check_scores(np.asarray(result.original)[None], 1, n_answers, source=name)[0]
            out[start:stop] = check_scores(result.scores, stop - start, n_answers, source=name)
            modes.add(result.mode)
            if result.note and (result.mode == "off" or not note):
                note = result.note
            if self.progress is not None:
                self.progress(stop, total)
        if modes == {"exact"}:
            mode = "exact"
        elif "approx" in modes and modes <= {"approx", "exact"}:
            mode = "approx"
        else:
            mode = "off"
        return out, batch, mode, note

    @staticmethod
    def _items(
        pixels: NDArray[np.float32],
        fill: NDArray[np.float32],
        boxes: list[Box],
        question: str,
        dropped: list[str],
        start: int,
        stop: int,
    ) -> tuple[list[NDArray[np.float32]], list[str]]:
        images: list[NDArray[np.float32]] = []
        questions: list[str] = []
        if start == 0:
            images.append(pixels)
            questions.append(question)
        first_box, last_box = max(start - 1, 0), min(stop - 1, len(boxes))
        if first_box < last_box:
            images.extend(occluded_batch(pixels, fill, boxes[first_box:last_box]))
            questions.extend([question] * (last_box - first_box))
        first_word = max(start - 1 - len(boxes), 0)
        last_word = stop - 1 - len(boxes)
        if first_word < last_word:
            images.extend([pixels] * (last_word - first_word))
            questions.extend(dropped[first_word:last_word])
        return images, questions

    def _result(
        self,
        scores: NDArray[np.float64],
        batch: int,
        boxes: list[Box],
        words: list[str],
        shape: tuple[int, int],
        answer: str | None,
    ) -> OcclusionResult:
        original = scores[0]
        predicted = int(np.argmax(original))
        compared = answer_score(scores, self.score)
        if answer is None:
            index = predicted
        elif answer in self.model.answers:
            index = list(self.model.answers).index(answer)
        else:
            raise InputError(f"answer {answer!r} is not one of the model's answers")
        image_scores = scores[1 : 1 + len(boxes)]
        word_scores = scores[1 + len(boxes) :]
        image_deltas = compared[0, index] - compared[1 : 1 + len(boxes), index]
        image_map, mode = self._image_map(image_deltas, boxes, shape)
        baseline = self.baseline
        return OcclusionResult(
            answer=self.model.answers[index],
            answer_index=index,
            predicted_index=predicted,
            scores=original.copy(),
            image_map=image_map,
            mode=mode,
            grid=self.grid if mode == "grid" else None,
            window=self.window if mode == "window" else None,
            stride=self.stride if mode == "window" else None,
            baseline="rgb" if isinstance(baseline, tuple) else baseline,
            baseline_rgb=_baseline_rgb(baseline),
            image_shape=shape,
            words=tuple(words),
            word_map=compared[0, index] - compared[1 + len(boxes) :, index],
            image_flips=int((image_scores.argmax(axis=1) != predicted).sum()),
            word_flips=int((word_scores.argmax(axis=1) != predicted).sum()),
            image_perturbations=len(boxes),
            batch_size=batch,
            evaluations=len(scores),
            score=self.score,
        )

    def _image_map(
        self, deltas: NDArray[np.float64], boxes: list[Box], shape: tuple[int, int]
    ) -> tuple[NDArray[np.float64], Literal["grid", "window"]]:
        if not self.occlude_image:
            return np.zeros((0, 0), dtype=np.float64), "grid"
        if self.window is not None:
            return window_map(deltas, boxes, *shape), "window"
        return deltas.reshape(self.grid, self.grid), "grid"


def _baseline_rgb(baseline: Any) -> tuple[float, float, float] | None:
    if isinstance(baseline, tuple):
        return baseline
    if baseline == "imagenet-mean":
        return IMAGENET_MEAN_RGB
    if baseline == "black":
        return (0.0, 0.0, 0.0)
    return None


def occlusion_attribution(result: OcclusionResult) -> Attribution:
    """``result`` as the ``occlusion`` attribution (its section of ``explanation.json``)."""
    extras = {
        "mode": result.mode,
        "grid": result.grid,
        "window": list(result.window) if result.window else None,
        "stride": list(result.stride) if result.stride else None,
        "baseline": result.baseline,
        "baseline_rgb": list(result.baseline_rgb) if result.baseline_rgb else None,
        "flips": {
            "image": result.image_flips,
            "words": result.word_flips,
            "image_total": result.image_perturbations,
            "words_total": len(result.words),
        },
        "batch_size": result.batch_size,
        "evaluations": result.evaluations,
    }
    if result.score != "probability":
        extras["score"] = result.score
    extras["incremental"] = result.incremental
    extras["incremental_note"] = result.incremental_note or None
    if result.approx is not None:
        extras["approx"] = result.approx.to_json()
    return Attribution(
        method="occlusion",
        key="occlusion",
        signed=True,
        answer=result.answer,
        answer_index=result.answer_index,
        probability=result.probability,
        image_map=np.asarray(result.image_map, dtype=np.float64),
        word_map=np.asarray(result.word_map, dtype=np.float64),
        tokens=tuple(result.words),
        extras=extras,
        stats={
            "image_flips": float(result.image_flips),
            "word_flips": float(result.word_flips),
            "image_total": float(result.image_perturbations),
            "evaluations": float(result.evaluations),
        },
        answer_tokens=result.token_maps,
    )

"""Is the map faithful to the model? Deletion/insertion curves and word erasure.

Everything goes through ``answer_probs_batch`` only, so it works on any model, black box
or not, and on any image map (a ``grid x grid`` occlusion map, an ``H x W`` gradient or
RISE map).

**Image units.** A map of ``h x w`` values on an ``H x W`` image splits the image into the
occlusion lattice: unit ``(r, c)`` covers rows ``floor(r H / h) .. floor((r + 1) H / h) - 1``
and columns likewise (a pixel map, ``h x w == H x W``, has one pixel per unit). A map
larger than the image is first area-resized to ``H x W``.

**Order.** Units are taken from the most to the least important (the map's values as
given: pass ``|map|`` to rank by magnitude); ties keep row-major order (a stable sort of
the negated values).

**Steps.** Step ``k = 0..S`` has the first ``floor(k n / S)`` of the ``n`` units removed
(deletion: filled with the baseline) or inserted (insertion: copied from the image into
the fully filled, or blurred, image). The curve's x axis is the fraction of the image's
pixels removed or inserted (``0..1``), its y axis the score of the answer (the one
predicted on the original input unless another is asked for). The normalised area under
the curve is the trapezoid rule over that x axis, so it lies in the scores' range.
Default ``S``: one step per unit for maps of up to 32 units, else 32 steps for maps
smaller than the image (half a row of a 16 x 16 grid per step) and 20 steps (5 % of the
pixels each) for pixel maps. A faithful map has a low deletion AUC and a high insertion
AUC next to a random order's (``random_orders`` seeded permutations; their mean curve).

**Words** (ERASER's comprehensiveness and sufficiency): with the words ranked by the word
map (ties: left to right), for ``k = 1 .. n - 1``: comprehensiveness ``p(q) - p(q without
the top k words)``, sufficiency ``p(q) - p(only the top k words)``; the questions are
rebuilt with :func:`~blackbox_vqa.text.drop_word`. AOPC is the mean over ``k``. ``k = n``
is left out (it would leave an empty question). A faithful word map has a high
comprehensiveness and a low sufficiency next to a random order's.

**Cost** (model calls, default settings, a 16 x 16 map and an ``n``-word question): image
``2 + 2 (S - 1) (1 + R)`` = 312 for ``S = 32``, ``R = 4`` random orders (the original and
the fully filled image are shared by all curves; a separate insertion baseline adds one);
words ``1 + 2 (n - 1) (1 + R)`` = 41 for 5 words. Occlusion of the same input takes
``1 + 256 + n`` = 262, so the metrics take 1.35x its calls (at most 2x, the project's
budget). Every result counts its calls in ``evaluations``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_model, check_scores, model_name
from blackbox_vqa.adapters.capabilities import check_question
from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.human_attention import area_resize
from blackbox_vqa.explainers.batching import auto_batch_size, parse_batch_size
from blackbox_vqa.explainers.masks import baseline_image, cell_edges, parse_baseline
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.text import drop_word, split_words

__all__ = [
    "DEFAULT_RANDOM_ORDERS",
    "GRID_STEPS",
    "PIXEL_STEPS",
    "Curve",
    "Faithfulness",
    "ImageFaithfulness",
    "WordCurve",
    "WordFaithfulness",
    "default_steps",
    "importance_order",
    "keep_words",
    "normalised_auc",
    "remove_words",
    "step_counts",
    "unit_map",
]

GRID_STEPS = 32
PIXEL_STEPS = 20
DEFAULT_RANDOM_ORDERS = 4

Baseline = str | tuple[float, float, float]


# -- pure maths ------------------------------------------------------------------------


def unit_map(map_shape: tuple[int, int], image_shape: tuple[int, int]) -> NDArray[np.int64]:
    """``int64 [H, W]``: the row-major unit index of each pixel of an ``H x W`` image for a
    map of ``map_shape`` (``h x w``, each at most the image's side)."""
    (h, w), (height, width) = map_shape, image_shape
    rows = np.searchsorted(cell_edges(height, h), np.arange(height), side="right") - 1
    cols = np.searchsorted(cell_edges(width, w), np.arange(width), side="right") - 1
    return (rows[:, None] * w + cols[None, :]).astype(np.int64)


def importance_order(values: NDArray[Any]) -> NDArray[np.int64]:
    """Indices of the flattened ``values`` from the largest to the smallest; ties keep
    their (row-major) order."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.argsort(-flat, kind="stable").astype(np.int64)


def step_counts(units: int, steps: int) -> NDArray[np.int64]:
    """``[steps + 1]`` units removed after each step: ``floor(k units / steps)``."""
    if steps < 1 or units < 1:
        raise InputError(f"steps and units must be >= 1, got steps={steps}, units={units}")
    return (np.arange(steps + 1, dtype=np.int64) * units) // steps


def default_steps(units: int, pixel_map: bool) -> int:
    """One step per unit up to ``GRID_STEPS`` units; else ``GRID_STEPS`` (maps smaller than
    the image) or ``PIXEL_STEPS`` (pixel maps, 5 % of the pixels per step)."""
    if units <= GRID_STEPS:
        return units
    return PIXEL_STEPS if pixel_map else GRID_STEPS


def normalised_auc(fractions: NDArray[Any], scores: NDArray[Any]) -> float:
    """Trapezoid-rule area under ``scores`` over ``fractions`` (an x axis from 0 to 1)."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def remove_words(question: str, indices: Sequence[int]) -> str:
    """``question`` without the words at ``indices`` (rebuilt by ``drop_word``, right to left)."""
    for index in sorted(set(int(i) for i in indices), reverse=True):
        question = drop_word(question, index)
    return question


def keep_words(question: str, indices: Sequence[int]) -> str:
    """``question`` with only the words at ``indices`` (the others dropped)."""
    keep = set(int(i) for i in indices)
    return remove_words(question, [i for i in range(len(split_words(question))) if i not in keep])


# -- results ---------------------------------------------------------------------------


def _floats(values: NDArray[Any]) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


@dataclass(frozen=True)
class Curve:
    """One deletion or insertion curve.

    Attributes:
        fractions: ``float64 [S + 1]`` fraction of the image's pixels removed (deletion)
            or inserted (insertion) after each step, from 0 to 1.
        scores: ``float64 [S + 1]`` the answer's score after each step.
    """

    fractions: NDArray[np.float64]
    scores: NDArray[np.float64]

    @property
    def auc(self) -> float:
        """Normalised area under the curve (trapezoid rule over ``fractions``)."""
        return normalised_auc(self.fractions, self.scores)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"fractions": _floats(self.fractions), "scores": _floats(self.scores),
                "auc": self.auc}


@dataclass(frozen=True)
class ImageFaithfulness:
    """Deletion and insertion of one image map, beside a random order's.

    Attributes:
        answer, answer_index: the answer whose score the curves follow.
        deletion, insertion: the map's curves.
        random_deletion, random_insertion: mean curves over ``random_orders`` orders.
        map_shape: ``(h, w)`` of the map as used (after resizing a map larger than the image).
        units, steps: units of the lattice and steps per curve.
        baseline, insertion_baseline: fill names (``"rgb"`` for a colour given as numbers).
        random_orders, seed: the random reference's orders and the seed they come from.
        evaluations: model calls made (inputs scored).
    """

    answer: str
    answer_index: int
    deletion: Curve
    insertion: Curve
    random_deletion: Curve
    random_insertion: Curve
    map_shape: tuple[int, int]
    units: int
    steps: int
    baseline: str
    insertion_baseline: str
    random_orders: int
    seed: int
    evaluations: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; AUCs at the top level for tables."""
        return {
            "answer": self.answer,
            "deletion_auc": self.deletion.auc,
            "insertion_auc": self.insertion.auc,
            "random_deletion_auc": self.random_deletion.auc,
            "random_insertion_auc": self.random_insertion.auc,
            "deletion": self.deletion.to_dict(),
            "insertion": self.insertion.to_dict(),
            "random_deletion": self.random_deletion.to_dict(),
            "random_insertion": self.random_insertion.to_dict(),
            "map_shape": list(self.map_shape),
            "units": self.units,
            "steps": self.steps,
            "baseline": self.baseline,
            "insertion_baseline": self.insertion_baseline,
            "random_orders": self.random_orders,
            "seed": self.seed,
            "evaluations": self.evaluations,
        }


@dataclass(frozen=True)
class WordCurve:
    """Score drops ``p(q) - p(q')`` for ``k = 1 .. n - 1`` words (``float64 [n - 1]``)."""

    drops: NDArray[np.float64]

    @property
    def aopc(self) -> float:
        """Area over the perturbation curve: the mean drop (NaN for fewer than 2 words)."""
        return float(np.mean(self.drops)) if self.drops.size else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN AOPC becomes None)."""
        aopc = self.aopc
        return {"drops": _floats(self.drops), "aopc": aopc if math.isfinite(aopc) else None}


@dataclass(frozen=True)
class WordFaithfulness:
    """Comprehensiveness and sufficiency of one word map, beside a random order's.

    Attributes:
        answer, answer_index: the answer whose score is compared.
        words: the question's words; ``order``: their indices, most important first.
        comprehensiveness: drops when the top ``k`` words are removed.
        sufficiency: drops when only the top ``k`` words are kept.
        random_comprehensiveness, random_sufficiency: means over ``random_orders`` orders.
        evaluations: model calls made.
    """

    answer: str
    answer_index: int
    words: tuple[str, ...]
    order: tuple[int, ...]
    comprehensiveness: WordCurve
    sufficiency: WordCurve
    random_comprehensiveness: WordCurve
    random_sufficiency: WordCurve
    random_orders: int
    seed: int
    evaluations: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; AOPCs at the top level for tables."""
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "answer": self.answer,
            "words": list(self.words),
            "order": list(self.order),
            "comprehensiveness": finite(self.comprehensiveness.aopc),
            "sufficiency": finite(self.sufficiency.aopc),
            "random_comprehensiveness": finite(self.random_comprehensiveness.aopc),
            "random_sufficiency": finite(self.random_sufficiency.aopc),
            "curves": {
                "comprehensiveness": self.comprehensiveness.to_dict(),
                "sufficiency": self.sufficiency.to_dict(),
                "random_comprehensiveness": self.random_comprehensiveness.to_dict(),
                "random_sufficiency": self.random_sufficiency.to_dict(),
            },
            "random_orders": self.random_orders,
            "seed": self.seed,
            "evaluations": self.evaluations,
        }


# -- the model-facing part -------------------------------------------------------------


def _baseline_name(baseline: Baseline) -> str:
    return "rgb" if isinstance(baseline, tuple) else baseline


def _parse(baseline: Baseline, name: str) -> Baseline:
    try:
        if isinstance(baseline, tuple):
            return parse_baseline(",".join(str(v) for v in baseline))
        return parse_baseline(baseline)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None


class Faithfulness:
    """Deletion/insertion and word comprehensiveness/sufficiency for any model.

    Args:
        model: the model (``answers``, ``answer_probs_batch``).
        steps: steps per image curve; ``None`` for the default (module docstring).
        baseline: deletion fill: ``"imagenet-mean"`` (default, occlusion's), ``"black"``,
            ``"blur"``, ``"R,G,B"`` or an RGB tuple (0-255).
        insertion_baseline: the image units are inserted into; default ``baseline``.
        blur_sigma: Gaussian sigma in pixels for ``"blur"`` (default: one unit's side).
        random_orders: random orders averaged for the reference (default 4).
        seed: seed of the random orders.
        batch_size: ``"auto"`` or a positive int.
    """

    def __init__(
        self,
        model: object,
        *,
        steps: int | None = None,
        baseline: Baseline = "imagenet-mean",
        insertion_baseline: Baseline | None = None,
        blur_sigma: float | None = None,
        random_orders: int = DEFAULT_RANDOM_ORDERS,
        seed: int = 0,
        batch_size: int | str = "auto",
    ) -> None:
        self.model = check_model(model)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise InputError(f"steps must be a positive int or None, got {steps!r}")
        self.steps = steps
        self.baseline = _parse(baseline, "baseline")
        self.insertion_baseline = (
            self.baseline if insertion_baseline is None
            else _parse(insertion_baseline, "insertion_baseline")
        )
        if blur_sigma is not None and not blur_sigma > 0:
            raise InputError(f"blur_sigma must be > 0, got {blur_sigma!r}")
        self.blur_sigma = blur_sigma
        if isinstance(random_orders, bool) or not isinstance(random_orders, int) \
                or random_orders < 1:
            raise InputError(f"random_orders must be a positive int, got {random_orders!r}")
        self.random_orders = random_orders
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self.batch_size = parse_batch_size(batch_size)

    # -- scoring -----------------------------------------------------------------------

    def _score(
        self,
        images: Sequence[NDArray[np.float32]],
        questions: Sequence[str],
        shape: tuple[int, ...],
    ) -> NDArray[np.float64]:
        """Scores ``[N, A]`` of the pairs, in batches."""
        total = len(images)
        n_answers = len(self.model.answers)
        out = np.empty((total, n_answers), dtype=np.float64)
        batch = self.batch_size or auto_batch_size(self.model, shape, max(total, 1))
        name = model_name(self.model)
        for start in range(0, total, batch):
            stop = min(total, start + batch)
            result = self.model.answer_probs_batch(list(images[start:stop]),
                                                   list(questions[start:stop]))
            out[start:stop] = check_scores(result, stop - start, n_answers, source=name)
        return out

    def _answer_index(self, original: NDArray[np.float64], answer: str | int | None) -> int:
        if answer is None:
            return int(np.argmax(original))
        answers = list(self.model.answers)
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(answers):
                raise InputError(f"answer index must be in [0, {len(answers)}), got {answer}")
            return answer
        if answer not in answers:
            raise InputError(f"answer {answer!r} is not one of the model's answers")
        return answers.index(answer)

    # -- images ------------------------------------------------------------------------

    def deletion_insertion(
        self,
        image: ImageInput,
        question: str,
        image_map: NDArray[Any],
        *,
        answer: str | int | None = None,
    ) -> ImageFaithfulness:
        """Deletion and insertion curves of ``image_map`` (``h x w``) on ``image``."""
        question = self._question(question)
        pixels = to_rgb_array(image).astype(np.float32)
        values = _map_for(image_map, pixels.shape[:2])
        units = values.size
        pixel_map = values.shape == pixels.shape[:2]
        steps = self.steps if self.steps is not None else default_steps(units, pixel_map)
        steps = min(steps, units)
        counts = step_counts(units, steps)
        index_map = unit_map(values.shape, pixels.shape[:2])  # type: ignore[arg-type]
        unit_pixels = np.bincount(index_map.reshape(-1), minlength=units)
        rng = np.random.default_rng(self.seed)
        orders = [importance_order(values)] + [
            rng.permutation(units).astype(np.int64) for _ in range(self.random_orders)
        ]
        sigma = self.blur_sigma or max(1.0, pixels.shape[0] / values.shape[0],
                                       pixels.shape[1] / values.shape[1])
        fill = baseline_image(pixels, self.baseline, blur_sigma=sigma).astype(np.float32)
        same_fill = self.insertion_baseline == self.baseline
        start = fill if same_fill else baseline_image(
            pixels, self.insertion_baseline, blur_sigma=sigma).astype(np.float32)
        # Inputs: original, fully filled, [insertion start], then for each order the
        # interior deletion steps and the interior insertion steps.
        images: list[NDArray[np.float32]] = [pixels, fill] + ([] if same_fill else [start])
        for order in orders:
            rank = np.empty(units, dtype=np.int64)
            rank[order] = np.arange(units)
            pixel_rank = rank[index_map]
            inner = counts[1:-1]
            images.extend(np.where((pixel_rank < c)[..., None], fill, pixels) for c in inner)
            images.extend(np.where((pixel_rank < c)[..., None], pixels, start) for c in inner)
        scores = self._score(images, [question] * len(images), pixels.shape)
        index = self._answer_index(scores[0], answer)
        column = scores[:, index]
        head = 2 if same_fill else 3
        original, filled, empty = column[0], column[1], column[head - 1]
        inner_n = steps - 1
        deletions, insertions = [], []
        for k in range(len(orders)):
            block = column[head + 2 * k * inner_n : head + 2 * (k + 1) * inner_n]
            deletions.append(np.r_[original, block[:inner_n], filled])
            insertions.append(np.r_[empty, block[inner_n:], original])
        area = float(pixels.shape[0] * pixels.shape[1])
        fractions_by_order = [np.r_[0, np.cumsum(unit_pixels[order])][counts] / area
                              for order in orders]
        # Units may differ in size (floor lattice), so each order has its own x axis;
        # the random orders' mean curve is taken on the ranked map's x axis by
        # interpolation (exact when units are equal in size).
        x = fractions_by_order[0]
        random_del = np.mean([np.interp(x, fx, d) for fx, d in
                              zip(fractions_by_order[1:], deletions[1:], strict=True)], axis=0)
        random_ins = np.mean([np.interp(x, fx, d) for fx, d in
                              zip(fractions_by_order[1:], insertions[1:], strict=True)], axis=0)
        return ImageFaithfulness(
            answer=self.model.answers[index],
            answer_index=index,
            deletion=Curve(x, deletions[0]),
            insertion=Curve(x, insertions[0]),
            random_deletion=Curve(x, random_del),
            random_insertion=Curve(x, random_ins),
            map_shape=(int(values.shape[0]), int(values.shape[1])),
            units=units,
            steps=steps,
            baseline=_baseline_name(self.baseline),
            insertion_baseline=_baseline_name(self.insertion_baseline),
            random_orders=self.random_orders,
            seed=self.seed,
            evaluations=len(images),
        )

    # -- words -------------------------------------------------------------------------

    def comprehensiveness_sufficiency(
        self,
        image: ImageInput,
        question: str,
        word_map: NDArray[Any] | Sequence[float],
        *,
        answer: str | int | None = None,
    ) -> WordFaithfulness:
        """Comprehensiveness and sufficiency of ``word_map`` (one value per word)."""
        question = self._question(question)
        pixels = to_rgb_array(image).astype(np.float32)
        words = split_words(question)
        values = np.asarray(word_map, dtype=np.float64).reshape(-1)
        if values.size != len(words):
            raise InputError(
                f"word_map has {values.size} values but the question has {len(words)} words"
            )
        if not np.isfinite(values).all():
            raise InputError("word_map contains NaN or infinite values")
        rng = np.random.default_rng(self.seed)
        orders = [importance_order(values)] + [
            rng.permutation(len(words)).astype(np.int64) for _ in range(self.random_orders)
        ]
        ks = range(1, len(words))
        questions = [question]
        for order in orders:
            questions.extend(remove_words(question, order[:k].tolist()) for k in ks)
            questions.extend(keep_words(question, order[:k].tolist()) for k in ks)
        scores = self._score([pixels] * len(questions), questions, pixels.shape)
        index = self._answer_index(scores[0], answer)
        drops = scores[0, index] - scores[1:, index]
        n = len(ks)
        comp = [drops[2 * k * n : 2 * k * n + n] for k in range(len(orders))]
        suff = [drops[2 * k * n + n : 2 * (k + 1) * n] for k in range(len(orders))]
        return WordFaithfulness(
            answer=self.model.answers[index],
            answer_index=index,
            words=tuple(words),
            order=tuple(int(i) for i in orders[0]),
            comprehensiveness=WordCurve(comp[0]),
            sufficiency=WordCurve(suff[0]),
            random_comprehensiveness=WordCurve(np.mean(comp[1:], axis=0)),
            random_sufficiency=WordCurve(np.mean(suff[1:], axis=0)),
            random_orders=self.random_orders,
            seed=self.seed,
            evaluations=len(questions),
        )

    def _question(self, question: str) -> str:
        return check_question(self.model, question)


def _map_for(image_map: NDArray[Any], image_shape: tuple[int, ...]) -> NDArray[np.float64]:
    """The map as ``float64 h x w`` with ``h <= H`` and ``w <= W`` (area-resized if larger)."""
    values = np.asarray(image_map, dtype=np.float64)
    if values.ndim != 2 or min(values.shape) < 1:
        raise InputError(f"image_map must be a non-empty 2-D array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise InputError("image_map contains NaN or infinite values")
    height, width = int(image_shape[0]), int(image_shape[1])
    if values.shape[0] > height or values.shape[1] > width:
        values = area_resize(values, (min(values.shape[0], height), min(values.shape[1], width)))
    return values

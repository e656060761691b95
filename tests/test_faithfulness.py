"""Deletion/insertion and word erasure checked against curves computed by hand.

On :class:`toys.BrightnessModel`, ``p(bright) = mean(image) / 255``: removing a pixel
(filling it with black) lowers the mean by its value over the pixel count, so every
point of every curve has a closed form. :class:`WordToy` scores ``yes`` from which words
the question keeps, so comprehensiveness and sufficiency are sums of hand-set weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from blackbox_vqa.adapters.base import BaseAdapter
from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.faithfulness import (
    Faithfulness,
    default_steps,
    importance_order,
    keep_words,
    normalised_auc,
    remove_words,
    step_counts,
    unit_map,
)
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.text import split_words

from toys import BrightnessModel

# 2 x 2 image, grey pixels 200, 100 / 50, 0: the map below ranks them as they are.
VALUES = np.array([[200.0, 100.0], [50.0, 0.0]])
IMAGE = np.repeat(VALUES[..., None], 3, axis=2).astype(np.uint8)


class WordToy(BaseAdapter):
    """``p(yes) = 0.1 + 0.4 [red kept] + 0.2 [big kept]``; ``p(no) = 1 - p(yes)``."""

    def __init__(self) -> None:
        super().__init__(["yes", "no"], name="words")
        self.calls: list[int] = []

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        self.calls.append(len(images))
        out = []
        for question in questions:
            words = split_words(question)
            yes = 0.1 + 0.4 * ("red" in words) + 0.2 * ("big" in words)
            out.append([yes, 1.0 - yes])
        return np.asarray(out)


def test_pure_helpers() -> None:
    assert importance_order(np.array([[1.0, 3.0], [3.0, 0.0]])).tolist() == [1, 2, 0, 3]
    assert importance_order(np.zeros((2, 2))).tolist() == [0, 1, 2, 3]  # ties: row-major
    assert step_counts(256, 32).tolist() == list(range(0, 257, 8))
    assert step_counts(5, 2).tolist() == [0, 2, 5]
    assert default_steps(256, pixel_map=False) == 32
    assert default_steps(4096, pixel_map=True) == 20
    assert default_steps(9, pixel_map=False) == 9
    assert normalised_auc(np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0])) == 0.5
    # rows split at floor(5 / 2) = 2, columns at floor(3 / 2) = 1
    assert unit_map((2, 2), (5, 3)).tolist() == [[0, 1, 1], [0, 1, 1],
                                                 [2, 3, 3], [2, 3, 3], [2, 3, 3]]
    question = "is the big red ball here?"
    assert remove_words(question, [3, 2]) == "is the ball here?"
    assert keep_words(question, [3, 2]) == "big red?"
    with pytest.raises(InputError, match="steps and units"):
        step_counts(4, 0)


def test_deletion_and_insertion_equal_the_hand_curves() -> None:
    model = BrightnessModel()
    result = Faithfulness(model, baseline="black", random_orders=2, seed=3).deletion_insertion(
        IMAGE, "is it bright?", VALUES, answer="bright")
    assert result.answer == "bright" and result.steps == 4 and result.units == 4
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    # deletion: remove 200, then 100, then 50, then 0 -> pixel sums 350, 150, 50, 0, 0
    deletion = np.array([350.0, 150.0, 50.0, 0.0, 0.0]) / 4 / 255
    insertion = np.array([0.0, 200.0, 300.0, 350.0, 350.0]) / 4 / 255
    np.testing.assert_allclose(result.deletion.fractions, x)
    np.testing.assert_allclose(result.deletion.scores, deletion, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.insertion.scores, insertion, rtol=0, atol=1e-12)
    assert result.deletion.auc == pytest.approx((350 + 2 * 150 + 2 * 50) / 2 / 4 / 4 / 255)
    assert result.insertion.auc == pytest.approx(
        (2 * 200 + 2 * 300 + 2 * 350 + 350) / 2 / 4 / 4 / 255)
    # random reference: the mean curve of the seeded permutations, drawn in turn
    rng = np.random.default_rng(3)
    flat = VALUES.reshape(-1)
    curves_del, curves_ins = [], []
    for _ in range(2):
        order = rng.permutation(4)
        removed = np.r_[0.0, np.cumsum(flat[order])]
        curves_del.append((350.0 - removed) / 4 / 255)
        curves_ins.append(removed / 4 / 255)
    np.testing.assert_allclose(result.random_deletion.scores, np.mean(curves_del, axis=0),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.random_insertion.scores, np.mean(curves_ins, axis=0),
                               rtol=0, atol=1e-12)
    # the calls: original + all black, 3 inner steps per curve, 2 curves, 3 orders
    assert result.evaluations == 2 + 3 * 2 * 3 == sum(model.calls)
    data = result.to_dict()
    assert data["deletion_auc"] == result.deletion.auc and data["steps"] == 4
    assert data["baseline"] == "black" and data["insertion_baseline"] == "black"


def test_ties_are_taken_row_major_and_steps_group_units() -> None:
    result = Faithfulness(BrightnessModel(), baseline="black", steps=2).deletion_insertion(
        IMAGE, "q?", np.ones((2, 2)), answer="bright")
    # two steps of two units: first the top row (200 + 100), then the bottom row
    np.testing.assert_allclose(result.deletion.scores, np.array([350.0, 50.0, 0.0]) / 4 / 255,
                               atol=1e-12)
    np.testing.assert_allclose(result.deletion.fractions, [0.0, 0.5, 1.0])


def test_grid_map_on_a_larger_image_and_unequal_units() -> None:
    image = np.zeros((5, 3, 3), dtype=np.uint8)
    image[:2, :2] = 255  # unit 0 (2 px) and half of unit 1 white, the rest black
    result = Faithfulness(BrightnessModel(), baseline="black").deletion_insertion(
        image, "q?", np.array([[0.0, 0.0], [1.0, 0.0]]), answer="bright")
    # order: unit 2 (3 px), then units 0 (2 px), 1 (4 px), 3 (6 px): 15 px in all
    np.testing.assert_allclose(result.deletion.fractions, [0, 3 / 15, 5 / 15, 9 / 15, 1])
    np.testing.assert_allclose(result.deletion.scores, [4 / 15, 4 / 15, 2 / 15, 0, 0],
                               atol=1e-12)


def test_insertion_into_another_baseline_and_a_map_larger_than_the_image() -> None:
    model = BrightnessModel()
    faith = Faithfulness(model, baseline="black", insertion_baseline="255,255,255")
    result = faith.deletion_insertion(IMAGE, "q?", np.kron(VALUES, np.ones((2, 2))),
                                      answer="bright")
    assert result.map_shape == (2, 2)  # area-resized to the image
    assert result.insertion_baseline == "rgb"
    # insert 200, 100, 50, 0 into white (255 each): sums 1020, 965, 810, 605, 350
    np.testing.assert_allclose(result.insertion.scores,
                               np.array([1020.0, 965.0, 810.0, 605.0, 350.0]) / 4 / 255,
                               atol=1e-12)
    assert result.evaluations == 3 + 3 * 2 * (1 + 4) == sum(model.calls)


def test_comprehensiveness_and_sufficiency_equal_the_hand_values() -> None:
    model = WordToy()
    question = "is the big red ball here?"
    word_map = [0.0, 0.0, 0.2, 0.4, 0.0, 0.0]
    result = Faithfulness(model, random_orders=3, seed=1).comprehensiveness_sufficiency(
        np.zeros((4, 4, 3), dtype=np.uint8), question, word_map)
    assert result.answer == "yes"  # 0.7
    assert result.order == (3, 2, 0, 1, 4, 5)
    np.testing.assert_allclose(result.comprehensiveness.drops, [0.4, 0.6, 0.6, 0.6, 0.6])
    np.testing.assert_allclose(result.sufficiency.drops, [0.2, 0.0, 0.0, 0.0, 0.0], atol=1e-12)
    assert result.comprehensiveness.aopc == pytest.approx(0.56)
    assert result.sufficiency.aopc == pytest.approx(0.04)

    def p_yes(kept: set[int]) -> float:
        return 0.1 + 0.4 * (3 in kept) + 0.2 * (2 in kept)

    rng = np.random.default_rng(1)
    comp, suff = [], []
    for _ in range(3):
        order = rng.permutation(6)
        comp.append([0.7 - p_yes(set(range(6)) - set(order[:k])) for k in range(1, 6)])
        suff.append([0.7 - p_yes(set(order[:k])) for k in range(1, 6)])
    np.testing.assert_allclose(result.random_comprehensiveness.drops, np.mean(comp, axis=0),
                               atol=1e-12)
    np.testing.assert_allclose(result.random_sufficiency.drops, np.mean(suff, axis=0),
                               atol=1e-12)
    assert result.evaluations == 1 + 2 * 5 * 4 == sum(model.calls)
    assert result.to_dict()["comprehensiveness"] == pytest.approx(0.56)


def test_one_word_has_no_curve() -> None:
    result = Faithfulness(WordToy()).comprehensiveness_sufficiency(
        np.zeros((2, 2, 3), dtype=np.uint8), "red?", [1.0])
    assert result.comprehensiveness.drops.size == 0
    assert result.to_dict()["comprehensiveness"] is None


def test_default_cost_is_at_most_twice_occlusion() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    question = "what color is the shape?"
    occlusion = Occlusion(BrightnessModel()).explain(image, question)
    faith = Faithfulness(BrightnessModel())
    image_part = faith.deletion_insertion(image, question, occlusion.image_map)
    words_part = faith.comprehensiveness_sufficiency(image, question, occlusion.word_map)
    assert image_part.steps == 32 and image_part.evaluations == 2 + 2 * 31 * 5
    assert words_part.evaluations == 1 + 2 * 4 * 5
    assert occlusion.evaluations == 1 + 256 + 5
    assert image_part.evaluations + words_part.evaluations <= 2 * occlusion.evaluations
    pixel = faith.deletion_insertion(image, question, np.abs(image[..., 0]).astype(float))
    assert pixel.steps == 20 and pixel.evaluations == 2 + 2 * 19 * 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "steps must be a positive int"),
     ({"random_orders": 0}, "random_orders must be a positive int"),
     ({"seed": -1}, "seed must be a non-negative int"),
     ({"baseline": "pink"}, "baseline: baseline must be one of"),
     ({"insertion_baseline": "pink"}, "insertion_baseline: "),
     ({"blur_sigma": 0.0}, "blur_sigma must be > 0")],
)
def test_bad_options_name_the_parameter(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        Faithfulness(BrightnessModel(), **kwargs)


def test_bad_maps_are_refused() -> None:
    faith = Faithfulness(BrightnessModel())
    with pytest.raises(InputError, match="2-D"):
        faith.deletion_insertion(IMAGE, "q?", np.zeros(4))
    with pytest.raises(InputError, match="NaN"):
        faith.deletion_insertion(IMAGE, "q?", np.full((2, 2), np.nan))
    with pytest.raises(InputError, match="2 words"):
        faith.comprehensiveness_sufficiency(IMAGE, "is it?", [1.0])
    with pytest.raises(InputError, match="not one of the model's answers"):
        faith.deletion_insertion(IMAGE, "q?", VALUES, answer="maybe")

"""RISE checked against its closed form on the brightness toy.

For :class:`toys.BrightnessModel`, ``p(bright) = mean(image) / 255`` is linear in the
pixels, so the score of each masked image ``M * x + (1 - M) * b`` is
``mean(M x + (1 - M) b) / 255`` and RISE's map is ``sum_i f_i M_i / (N p)``, computed
here from the explainer's own masks with plain loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from blackbox_vqa.errors import InputError
from blackbox_vqa.explainers.rise import Rise, bilinear_weights, rise_masks, upsample

from toys import BrightnessModel

FILL = np.array([123.68, 116.779, 103.939], dtype=np.float32)


def toy_image() -> np.ndarray:
    image = np.zeros((12, 10, 3), dtype=np.uint8)
    image[2:6, 3:9] = (250, 200, 150)
    image[8:, :3, 1] = 90
    return image


def closed_form(rise: Rise, image: np.ndarray, answer: int, log: bool) -> np.ndarray:
    masks = rise.masks(*image.shape[:2]).astype(np.float64)
    pixels = image.astype(np.float64)
    fill = FILL.astype(np.float64)
    total = np.zeros(image.shape[:2])
    for mask in masks:
        masked = mask[..., None] * pixels + (1.0 - mask[..., None]) * fill
        bright = masked.mean() / 255.0
        score = bright if answer == 1 else 1.0 - bright
        total += (math.log(score) if log else score) * mask
    return total / (len(masks) * rise.p)


@pytest.mark.parametrize("score", ["probability", "log-probability"])
def test_map_equals_the_closed_form(score: str) -> None:
    image = toy_image()
    model = BrightnessModel()
    rise = Rise(model, masks=50, cells=3, p=0.4, seed=7, batch_size=16, score=score)  # type: ignore[arg-type]
    result = rise.explain(image, "is it bright?")
    assert result.answer == "dark" and result.answer_index == 0
    np.testing.assert_allclose(result.image_map,
                               closed_form(rise, image, 0, score == "log-probability"),
                               rtol=1e-6, atol=1e-9)
    assert result.image_map.shape == (12, 10) and result.image_map.dtype == np.float64
    assert result.evaluations == 51 == sum(model.calls)
    assert model.calls == [1, 16, 16, 16, 2]
    assert result.settings == {"masks": 50, "cells": 3, "p": 0.4, "seed": 7,
                               "baseline": "imagenet-mean", "score": score, "batch_size": 16}
    assert result.probability == pytest.approx(1 - image.mean() / 255)
    data = result.to_dict()
    assert data["image_size"] == [12, 10] and data["evaluations"] == 51
    np.testing.assert_array_equal(np.array(data["image"]), result.image_map)


def test_another_answer_and_batch_size_independence() -> None:
    image = toy_image()
    one = Rise(BrightnessModel(), masks=20, cells=4, batch_size=3).explain(
        image, "q?", answer="bright")
    other = Rise(BrightnessModel(), masks=20, cells=4, batch_size="auto").explain(
        image, "q?", answer="bright")
    assert one.answer == "bright" and one.predicted_index == 0
    np.testing.assert_allclose(one.image_map, other.image_map, rtol=1e-12)
    np.testing.assert_allclose(one.image_map, closed_form(
        Rise(BrightnessModel(), masks=20, cells=4), image, 1, False), rtol=1e-6)
    with pytest.raises(InputError, match="not one of the model's answers"):
        Rise(BrightnessModel(), masks=2).explain(image, "q?", answer="grey")


def test_masks_are_seeded_smooth_shifted_and_kept_with_probability_p() -> None:
    rise = Rise(BrightnessModel(), masks=400, cells=4, p=0.25, seed=3)
    masks = rise.masks(16, 16)
    assert masks.shape == (400, 16, 16) and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    np.testing.assert_array_equal(masks, Rise(BrightnessModel(), masks=400, cells=4, p=0.25,
                                              seed=3).masks(16, 16))
    assert not np.array_equal(masks, Rise(BrightnessModel(), masks=400, cells=4, p=0.25,
                                          seed=4).masks(16, 16))
    assert abs(float(masks.mean()) - 0.25) < 0.02
    assert len(np.unique(masks)) > 2  # bilinear, not binary


def test_upsampling_and_cropping_by_hand() -> None:
    # 2 -> 4 pixels: centres at -0.25, 0.25, 0.75, 1.25 of the grid -> clamped
    np.testing.assert_allclose(bilinear_weights(2, 4),
                               np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]))
    np.testing.assert_allclose(upsample(np.array([[[0.0, 1.0]]]), 1, 4)[0, 0],
                               [0, 0.25, 0.75, 1])
    grids = np.array([[[True, False], [False, False]]])
    # H = W = 4, 2 cells: cell size 2, upsampled to 6 x 6, cropped at (1, 2)
    big = upsample(grids, 6, 6)[0]
    out = rise_masks(grids, np.array([[1, 2]]), 4, 4)[0]
    np.testing.assert_allclose(out, big[1:5, 2:6], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"masks": 0}, "masks must be a positive int"),
     ({"cells": 0}, "cells must be a positive int"),
     ({"p": 0.0}, r"p must be in \(0, 1\]"),
     ({"p": 1.5}, r"p must be in \(0, 1\]"),
     ({"seed": -1}, "seed must be a non-negative int"),
     ({"score": "logit"}, "score must be one of"),
     ({"baseline": "pink"}, "baseline must be one of"),
     ({"batch_size": 0}, "batch size must be")],
)
def test_bad_options_name_the_parameter(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        Rise(BrightnessModel(), **kwargs)  # type: ignore[arg-type]


def test_image_smaller_than_the_grid_is_refused() -> None:
    with pytest.raises(InputError, match="smaller than the 8-cell grid"):
        Rise(BrightnessModel(), masks=2).explain(np.zeros((4, 4, 3), dtype=np.uint8), "q?")

"""Occlusion checked against values computed by hand on the brightness toy.

For :class:`toys.BrightnessModel`, ``p(bright) = mean(image) / 255`` and
``p(dark) = 1 - p(bright)``. Filling a cell with colour ``f`` changes the mean by
``sum_cell(f - x) / (3 H W)``, so every importance has a closed form computed here with
its own loops, independent of the explainer's mask code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from blackbox_vqa.errors import ImageError, InputError, ModelOutputError, QuestionError
from blackbox_vqa.explainers.masks import gaussian_blur
from blackbox_vqa.explainers.occlusion import Occlusion

from toys import BrightnessModel, FixedOutputModel, toy_torch_model

# Perturbed images are float32 (0-255 scale), so the fill is the float32 nearest the
# ImageNet mean.
MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32).astype(np.float64)


def hand_image(height: int = 30, width: int = 20) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[3:11, 5:17] = (250, 200, 150)
    image[20:, :4, 1] = 90
    return image


def hand_grid_map(image: np.ndarray, grid: int, fill: np.ndarray) -> np.ndarray:
    """Importance of each cell for the answer 'dark', from the closed form."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float64)
    fill = np.broadcast_to(np.asarray(fill, dtype=np.float64), image.shape)
    out = np.zeros((grid, grid))
    for r in range(grid):
        for c in range(grid):
            top, bottom = math.floor(r * height / grid), math.floor((r + 1) * height / grid)
            left, right = math.floor(c * width / grid), math.floor((c + 1) * width / grid)
            change = (fill[top:bottom, left:right] - pixels[top:bottom, left:right]).sum()
            # p(dark) = 1 - mean/255: the drop in p(dark) is the rise in mean / 255
            out[r, c] = change / (3 * height * width) / 255.0
    return out


@pytest.mark.parametrize(("height", "width", "grid"), [(30, 20, 7), (32, 32, 16), (17, 23, 5)])
def test_grid_map_equals_the_hand_computation(height: int, width: int, grid: int) -> None:
    image = hand_image(height, width)
    result = Occlusion(BrightnessModel(), grid=grid).explain(image, "is it bright?")
    assert result.answer == "dark"
    assert result.mode == "grid" and result.image_map.shape == (grid, grid)
    np.testing.assert_allclose(result.image_map, hand_grid_map(image, grid, MEAN_RGB),
                               rtol=0, atol=1e-12)
    assert result.probability == pytest.approx(1 - image.mean() / 255, abs=1e-12)


@pytest.mark.parametrize(
    ("baseline", "fill"),
    [("black", np.zeros(3)), ("10,20,30", np.array([10.0, 20.0, 30.0])),
     ((255.0, 255.0, 255.0), np.full(3, 255.0))],
)
def test_every_constant_baseline(baseline: object, fill: np.ndarray) -> None:
    image = hand_image()
    result = Occlusion(BrightnessModel(), grid=4, baseline=baseline).explain(image, "q?")  # type: ignore[arg-type]
    np.testing.assert_allclose(result.image_map, hand_grid_map(image, 4, fill), atol=1e-12)
    assert result.baseline_rgb == tuple(fill)


def test_blur_baseline_takes_the_cell_from_the_blurred_copy() -> None:
    image = hand_image()
    result = Occlusion(BrightnessModel(), grid=4, baseline="blur", blur_sigma=2.0).explain(
        image, "q?"
    )
    fill = gaussian_blur(image, 2.0).astype(np.float64)
    np.testing.assert_allclose(result.image_map, hand_grid_map(image, 4, fill), atol=1e-9)
    assert result.baseline == "blur" and result.baseline_rgb is None
    assert np.abs(result.image_map).max() > 1e-4


def test_sliding_windows_average_overlapping_patches() -> None:
    image = hand_image(12, 12)
    result = Occlusion(BrightnessModel(), window=6, stride=3, baseline="black").explain(
        image, "q?"
    )
    assert result.mode == "window" and result.image_map.shape == (12, 12)
    pixels = image.astype(np.float64)
    starts = [0, 3, 6]
    expected_total = np.zeros((12, 12))
    count = np.zeros((12, 12))
    for top in starts:
        for left in starts:
            delta = (0.0 - pixels[top:top + 6, left:left + 6]).sum() / (3 * 144) / 255
            expected_total[top:top + 6, left:left + 6] += delta
            count[top:top + 6, left:left + 6] += 1
    np.testing.assert_allclose(result.image_map, expected_total / count, atol=1e-12)
    assert result.image_perturbations == 9


def test_word_occlusion_and_flips() -> None:
    image = np.full((8, 8, 3), 51, dtype=np.uint8)  # p(bright) = 0.2
    result = Occlusion(BrightnessModel(), grid=2).explain(image, "is it not bright?")
    # 'not' swaps the scores: p(bright) = 0.8 is predicted.
    assert result.answer == "bright"
    assert result.probability == pytest.approx(0.8)
    assert result.words == ("is", "it", "not", "bright")
    np.testing.assert_allclose(result.word_map, [0.0, 0.0, 0.6, 0.0], atol=1e-12)
    assert result.word_flips == 1
    assert result.image_flips == 0


def test_log_probability_score_compares_logs() -> None:
    image = hand_image()
    brightness = image.astype(np.float64).mean() / 255.0
    rise = hand_grid_map(image, 4, MEAN_RGB)  # rise in brightness when a cell is filled
    plain = Occlusion(BrightnessModel(), grid=4, score="log-probability").explain(image, "q?")
    assert plain.answer == "dark" and plain.score == "log-probability"
    # p(dark) = 1 - brightness before, 1 - brightness - rise after
    np.testing.assert_allclose(
        plain.image_map, np.log(1 - brightness) - np.log(1 - brightness - rise), rtol=0, atol=1e-12)
    # 'not' swaps the scores: p(dark) = brightness, and dropping 'not' makes it 1 - brightness
    swapped = Occlusion(BrightnessModel(), grid=4, score="log-probability").explain(
        image, "is it not bright?", answer="dark")
    np.testing.assert_allclose(
        swapped.image_map, np.log(brightness) - np.log(brightness + rise), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        swapped.word_map, [0.0, 0.0, math.log(brightness) - math.log(1 - brightness), 0.0],
        rtol=0, atol=1e-12)
    assert Occlusion(BrightnessModel(), grid=4).explain(image, "q?").score == "probability"


def test_image_flips_are_counted() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[:2, :2] = 255  # mean 63.75: p(bright) = 0.25
    result = Occlusion(BrightnessModel(), grid=2, baseline="255,255,255").explain(image, "q?")
    # Whitening any black cell lifts the mean to 127.5 (p = 0.5, argmax ties go to dark);
    # whitening the white cell changes nothing: no flips.
    assert result.image_flips == 0
    result = Occlusion(BrightnessModel(), grid=1, baseline="255,255,255").explain(image, "q?")
    assert result.image_flips == 1


def test_explaining_another_answer_and_unknown_answers() -> None:
    image = hand_image()
    dark = Occlusion(BrightnessModel(), grid=4).explain(image, "q?")
    bright = Occlusion(BrightnessModel(), grid=4).explain(image, "q?", answer="bright")
    assert bright.answer == "bright" and bright.predicted_index == 0
    np.testing.assert_allclose(bright.image_map, -dark.image_map, atol=1e-12)
    with pytest.raises(InputError, match="answer 'maybe' is not one of"):
        Occlusion(BrightnessModel(), grid=4).explain(image, "q?", answer="maybe")


def test_every_input_in_batches_and_the_original_once() -> None:
    model = BrightnessModel()
    result = Occlusion(model, grid=16, batch_size=50).explain(hand_image(32, 32), "a b c")
    assert model.calls == [50, 50, 50, 50, 50, 10]  # 1 + 256 + 3 = 260 inputs
    assert result.evaluations == 260 and result.batch_size == 50


def test_result_does_not_depend_on_the_batch_size() -> None:
    model = toy_torch_model()
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    results = [
        Occlusion(model, grid=8, batch_size=size).explain(image, "what color is the shape?")
        for size in (1, 7, "auto")
    ]
    # Not bit for bit: the float32 kernels a CPU library picks (and so the order of the sums)
    # depend on the batch size, which moves the last bits (6e-8 seen on an Intel Xeon).
    # Probabilities are <= 1, so 1e-6 is far below any real difference between cells.
    for other in results[1:]:
        np.testing.assert_allclose(other.image_map, results[0].image_map, rtol=0, atol=1e-6)
        np.testing.assert_allclose(other.word_map, results[0].word_map, rtol=0, atol=1e-6)
    assert np.abs(results[0].image_map).max() > 1e-3  # the comparison is not between zeros


def test_progress_is_reported_per_batch() -> None:
    seen: list[tuple[int, int]] = []
    Occlusion(BrightnessModel(), grid=2, batch_size=2,
              progress=lambda d, t: seen.append((d, t))).explain(hand_image(), "a b")
    assert seen == [(2, 7), (4, 7), (6, 7), (7, 7)]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda b: np.full((b, 2), np.nan), "NaN or infinite"),
        (lambda b: np.full((b, 2), -0.5), "negative scores"),
        (lambda b: np.ones((b, 3)), r"shape \(\d+, 3\), expected"),
        (lambda b: np.ones((b + 1, 2)), "expected"),
        (lambda b: [["x", "y"]] * b, "not numbers"),
    ],
)
def test_bad_model_outputs_are_refused(output: object, message: str) -> None:
    with pytest.raises(ModelOutputError, match=message):
        Occlusion(FixedOutputModel(output), grid=2).explain(hand_image(), "q?")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": 0}, "grid must be a positive integer"),
        ({"grid": True}, "grid must be a positive integer"),
        ({"window": 0}, "window must be a positive int"),
        ({"stride": 2}, "stride needs a window"),
        ({"baseline": "purple"}, "baseline must be one of"),
        ({"batch_size": 0}, "batch size must be 'auto' or a positive integer"),
        ({"batch_size": "many"}, "batch size must be 'auto'"),
        ({"blur_sigma": -1.0}, "blur_sigma must be > 0"),
        ({"image": False, "words": False}, "nothing to occlude"),
        ({"score": "logit"}, "score must be one of probability, log-probability"),
    ],
)
def test_bad_options_name_the_parameter(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        Occlusion(BrightnessModel(), **kwargs)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    explainer = Occlusion(BrightnessModel(), grid=16)
    with pytest.raises(InputError, match="cannot be split into a 16-cell grid"):
        explainer.explain(np.zeros((8, 40, 3), dtype=np.uint8), "q?")
    with pytest.raises(QuestionError, match="empty"):
        explainer.explain(hand_image(), "   ")
    with pytest.raises(ImageError, match="not found"):
        explainer.explain("/no/such/image.png", "q?")


def test_words_only_and_image_only() -> None:
    words = Occlusion(BrightnessModel(), image=False).explain(hand_image(), "is it not dark")
    assert words.image_map.size == 0 and words.evaluations == 5
    image = Occlusion(BrightnessModel(), grid=2, words=False).explain(hand_image(), "a b")
    assert image.words == () and image.evaluations == 5

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from blackbox_vqa.errors import InputError
from blackbox_vqa.explainers.masks import (
    baseline_image,
    cell_edges,
    cell_index_map,
    gaussian_blur,
    grid_boxes,
    occluded_batch,
    occlusion_evaluations,
    parse_baseline,
    window_boxes,
    window_map,
)


def test_cell_edges_follow_the_floor_formula() -> None:
    assert cell_edges(10, 4).tolist() == [0, 2, 5, 7, 10]
    assert cell_edges(64, 16).tolist() == list(range(0, 65, 4))
    assert cell_edges(3, 3).tolist() == [0, 1, 2, 3]


def test_cell_edges_refuse_small_images_and_bad_grids() -> None:
    with pytest.raises(InputError, match="image side of 5 px cannot be split into a 16-cell"):
        cell_edges(5, 16)
    with pytest.raises(InputError, match="grid must be >= 1"):
        cell_edges(5, 0)


def test_grid_boxes_uneven_row_major() -> None:
    boxes = grid_boxes(7, 5, 3)
    # rows: floor(k*7/3) = 0, 2, 4, 7; cols: floor(k*5/3) = 0, 1, 3, 5
    assert boxes[:3] == [(0, 2, 0, 1), (0, 2, 1, 3), (0, 2, 3, 5)]
    assert boxes[3] == (2, 4, 0, 1)
    assert boxes[-1] == (4, 7, 3, 5)
    covered = np.zeros((7, 5), dtype=int)
    for top, bottom, left, right in boxes:
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all()


def test_cell_index_map_matches_boxes() -> None:
    index = cell_index_map(7, 5, 3)
    for k, (top, bottom, left, right) in enumerate(grid_boxes(7, 5, 3)):
        assert (index[top:bottom, left:right] == k).all()


def test_window_boxes_add_a_last_window_flush_with_the_edge() -> None:
    tops = sorted({b[0] for b in window_boxes(10, 10, (5, 5), (3, 3))})
    assert tops == [0, 3, 5]
    tops = sorted({b[0] for b in window_boxes(10, 10, (4, 4), (3, 3))})
    assert tops == [0, 3, 6]
    assert window_boxes(4, 6, (4, 3), (4, 3)) == [(0, 4, 0, 3), (0, 4, 3, 6)]
    with pytest.raises(InputError, match="larger than the image"):
        window_boxes(4, 4, (5, 1), (1, 1))
    with pytest.raises(InputError, match="must be >= 1"):
        window_boxes(4, 4, (2, 2), (0, 1))


def test_window_map_is_the_mean_over_covering_windows() -> None:
    boxes = [(0, 2, 0, 2), (0, 2, 1, 3)]
    result = window_map(np.array([1.0, 3.0]), boxes, 2, 3)
    assert result.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("imagenet-mean", "imagenet-mean"),
        ("BLACK", "black"),
        (" blur ", "blur"),
        ("10,20.5,255", (10.0, 20.5, 255.0)),
    ],
)
def test_parse_baseline(spec: str, expected: object) -> None:
    assert parse_baseline(spec) == expected


@pytest.mark.parametrize("spec", ["grey", "1,2", "1,2,3,4", "0,0,256", "-1,0,0", "a,b,c"])
def test_parse_baseline_refuses(spec: str) -> None:
    with pytest.raises(InputError, match="baseline must be one of"):
        parse_baseline(spec)


def test_baseline_images() -> None:
    image = np.zeros((3, 4, 3), dtype=np.uint8)
    mean = baseline_image(image, "imagenet-mean", blur_sigma=1.0)
    assert mean.shape == (3, 4, 3)
    assert mean[2, 3].tolist() == pytest.approx([123.68, 116.779, 103.939], abs=1e-4)
    assert (baseline_image(image, "black", blur_sigma=1.0) == 0).all()
    assert (baseline_image(image, (1.0, 2.0, 3.0), blur_sigma=1.0)[1, 1] == [1, 2, 3]).all()


def test_gaussian_blur_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(13, 11, 3)).astype(np.uint8)
    ours = gaussian_blur(image, 2.0)
    reference = gaussian_filter(image.astype(np.float64), sigma=(2.0, 2.0, 0), mode="reflect",
                                truncate=3.0)
    np.testing.assert_allclose(ours, reference, atol=1e-3)
    flat = np.full((6, 6, 3), 77, dtype=np.uint8)
    np.testing.assert_allclose(gaussian_blur(flat, 1.5), 77.0, atol=1e-4)
    with pytest.raises(InputError, match="sigma must be > 0"):
        gaussian_blur(flat, 0.0)


def test_occluded_batch_copies_only_the_box() -> None:
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    fill = np.full((4, 4, 3), -1.0, dtype=np.float32)
    batch = occluded_batch(image, fill, [(0, 2, 0, 2), (3, 4, 1, 4)])
    assert batch.dtype == np.float32 and batch.shape == (2, 4, 4, 3)
    expected0 = image.astype(np.float32)
    expected0[0:2, 0:2] = -1
    expected1 = image.astype(np.float32)
    expected1[3:4, 1:4] = -1
    assert np.array_equal(batch[0], expected0)
    assert np.array_equal(batch[1], expected1)


def test_gaussian_blur_kernel_reaches_ceil_three_sigma_with_reflected_edges() -> None:
    impulse = np.zeros((21, 21, 3), dtype=np.float32)
    impulse[10, 10, 1] = 1000.0
    blurred = gaussian_blur(impulse, 1.5)  # radius ceil(4.5) = 5
    rows, cols = np.nonzero(blurred[..., 1])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 15, 5, 15)
    assert not blurred[..., 0].any() and not blurred[..., 2].any()  # channels stay apart
    assert blurred.dtype == np.float32 and blurred.sum() == pytest.approx(1000.0, rel=1e-6)
    # Edges mirror with the edge pixel repeated (numpy's "symmetric" padding), radius 3.
    edge = np.zeros((9, 9, 3), dtype=np.uint8)
    edge[0] = 90
    offsets = np.arange(-3, 4)
    weights = np.exp(-0.5 * (offsets / 0.8) ** 2)
    padded = np.pad(edge[:, 0, 0].astype(np.float64), 3, mode="symmetric")
    profile = [weights @ padded[i:i + 7] / weights.sum() for i in range(9)]
    np.testing.assert_allclose(gaussian_blur(edge, 0.8)[:, 4, 2], profile, rtol=1e-6)


def test_occlusion_evaluations_count_the_inputs_an_explanation_scores() -> None:
    from blackbox_vqa.explainers.occlusion import Occlusion

    from toys import BrightnessModel

    assert occlusion_evaluations(480, 640, 5) == 1 + 256 + 5  # the paper's 16 x 16 grid
    assert occlusion_evaluations(64, 64, 3, grid=4) == 1 + 16 + 3
    assert occlusion_evaluations(64, 64, 3, image=False) == 4
    # Windows: as many as window_boxes makes (the last one flush with the edge).
    assert occlusion_evaluations(64, 64, 2, window=(16, 16)) == 1 + 16 + 2
    assert occlusion_evaluations(64, 64, 2, window=(24, 24), stride=(16, 16)) == 1 + 16 + 2
    # ... and what an explanation really scores.
    image = np.zeros((40, 30, 3), dtype=np.uint8)
    for settings in ({"grid": 5}, {"window": (8, 6), "stride": (5, 4)}):
        result = Occlusion(BrightnessModel(), **settings).explain(image, "is it not bright?")
        counted = occlusion_evaluations(40, 30, 4, **settings)  # type: ignore[arg-type]
        assert result.evaluations == counted
    with pytest.raises(InputError, match="words must be an integer >= 0, got -1"):
        occlusion_evaluations(64, 64, -1)
    with pytest.raises(InputError, match="cannot be split into a 16-cell grid"):
        occlusion_evaluations(8, 64, 1)

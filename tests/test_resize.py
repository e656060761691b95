"""The NumPy antialiased bilinear resize against torch's CPU kernel, and the torch-free
preprocessing against the torch one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blackbox_vqa.adapters.torch.preprocessing import to_tensor
from blackbox_vqa.preprocess import Preprocessing
from blackbox_vqa.resize import resize_antialiased, resize_weights

# Torch accumulates the taps of its two passes in float32, this in float64: measured worst
# 7.7e-4 (640x480 -> 384), 2.1e-4 on the small sizes, on the 0-255 scale (relative 3e-6).
TOLERANCE = 1e-3


def _torch_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def _sizes(count: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(19)
    # Output width 1 is left out: torch's CPU kernel then gives every row the same value.
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in
            zip(rng.integers(1, 120, count), rng.integers(1, 120, count),
                rng.integers(1, 120, count), rng.integers(2, 120, count), strict=True)]


@pytest.mark.parametrize(("height", "width", "out_h", "out_w"),
                         [*_sizes(60), (224, 224, 32, 32), (17, 9, 224, 224), (640, 480, 384, 384)])
def test_the_numpy_resize_matches_torch(height: int, width: int, out_h: int, out_w: int) -> None:
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), np.uint8)
    ours = resize_antialiased(image, (out_h, out_w))
    assert ours.shape == (out_h, out_w, 3)
    np.testing.assert_allclose(ours, _torch_resize(image, (out_h, out_w)), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(("size_in", "size_out"), [(10, 4), (4, 10), (7, 3), (50, 13), (5, 1)])
def test_the_weights_are_torchs_and_rows_sum_to_one(size_in: int, size_out: int) -> None:
    # Torch's weights read off by resizing unit impulses along one axis.
    torch_rows = []
    for k in range(size_in):
        x = torch.zeros(1, 1, size_in, 3)
        x[0, 0, k, :] = 1
        out = F.interpolate(x, size=(size_out, 3), mode="bilinear", align_corners=False,
                            antialias=True)
        torch_rows.append(out[0, 0, :, 1].numpy())
    weights = resize_weights(size_in, size_out)
    np.testing.assert_allclose(weights, np.stack(torch_rows).T, rtol=0, atol=1e-7)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)


def test_hand_computed_weights() -> None:
    # 4 -> 2: scale 2; output 0 is centred at 1.0 with support 2, so taps 0, 1, 2 at
    # distances (-0.25, 0.25, 0.75) after dividing by the scale: 1 - |x| = (3, 3, 1) / 4,
    # normalised to (3, 3, 1) / 7; output 1 mirrors it.
    np.testing.assert_allclose(resize_weights(4, 2), np.array([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7,
                               rtol=0, atol=1e-7)
    # 2 -> 4 (enlarging): plain bilinear, clamped at the edges.
    assert resize_weights(2, 4).tolist() == [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]


def test_numpy_preprocessing_matches_torch_preprocessing() -> None:
    pre = Preprocessing.create((24, 20))
    rng = np.random.default_rng(3)
    same = [rng.integers(0, 256, (24, 20, 3), np.uint8) for _ in range(3)]
    mixed = [rng.integers(0, 256, shape, np.uint8) for shape in ((40, 31, 3), (7, 9, 3))]
    assert np.array_equal(pre.array(same), to_tensor(pre, same).numpy())
    np.testing.assert_allclose(pre.array(mixed), to_tensor(pre, mixed).numpy(), rtol=0,
                               atol=TOLERANCE / 255 / min(pre.std))

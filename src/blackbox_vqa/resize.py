"""Antialiased bilinear resize in NumPy, with the weights of torch's CPU kernel.

``F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)``
resamples each axis with a triangle filter stretched by the downscale factor (plain
bilinear when enlarging) and normalised to sum to one; here the same per-axis weights
form two matrices and the resize is ``W_h @ image @ W_w^T`` per channel, in float64.
Agrees with torch to 1e-3 on the 0-255 scale: torch accumulates in float32, this in
float64 (tests/test_resize.py).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["resize_antialiased", "resize_weights"]


@lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> NDArray[np.float64]:
    """``float64 [out_size, in_size]`` matrix of one axis' antialiased bilinear weights.

    Computed in float32 step by step as torch's kernel does for float input (the
    float32 roundings of the weights matter at ~1e-3 on the 0-255 scale)."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    f32 = np.float32
    scale = f32(f32(in_size) / f32(out_size))
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(f32(1.0) / scale) if scale >= 1.0 else f32(1.0)
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(center) - float(support) + 0.5), 0)
        hi = min(int(float(center) + float(support) + 0.5), in_size)
        row = np.empty(hi - lo, dtype=np.float32)
        total = f32(0.0)
        for k, j in enumerate(range(lo, hi)):
            x = abs(f32((float(f32(f32(j) - center)) + 0.5) * float(invscale)))
            row[k] = f32(1.0) - x if x < 1.0 else f32(0.0)
            total = f32(total + row[k])
        if total != 0.0:
            row = row / total
        weights[i, lo:hi] = row
    return weights


def resize_antialiased(image: NDArray[Any], size: tuple[int, int]) -> NDArray[np.float64]:
    """Resize ``H x W x C`` (any real dtype) to ``size = (h, w)``: ``float64 h x w x C``."""
    height, width = image.shape[:2]
    rows = resize_weights(height, size[0])
    cols = resize_weights(width, size[1])
    data = np.asarray(image, dtype=np.float64)
    # (h, H) @ (H, W*C) then contract W with (w, W): einsum keeps the channel axis last.
    tall = (rows @ data.reshape(height, -1)).reshape(size[0], width, -1)
    return np.einsum("hWc,wW->hwc", tall, cols)

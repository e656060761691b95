"""Image preprocessing shared by the PyTorch and exported-model adapters (torch-free).

Resize to ``(H, W)`` (bilinear, antialiased, on the 0-255 scale), scale to 0-1 and
normalise with ``mean``/``std`` given on the 0-1 scale (as torchvision's ``Normalize``).
An image already at ``(H, W)`` gives bit-identical tensors here and in the PyTorch adapter
(:mod:`blackbox_vqa.adapters.torch.preprocessing`); a resized one agrees to 1e-3 on the
0-255 scale (this module resizes in NumPy with torch's weights, summed in float64, so that
the ONNX adapter loads no torch; see :mod:`blackbox_vqa.resize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError
from blackbox_vqa.resize import resize_antialiased

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be three numbers, got {values!r}") from exc
    if len(triple) != 3 or not all(np.isfinite(triple)):
        raise InputError(f"{name} must be three finite numbers, got {values!r}")
    return triple  # type: ignore[return-value]


def _size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        pair: tuple[int, ...] = (value, value)
    else:
        pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise InputError(f"image_size must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its image: size ``(H, W)``, ``mean`` and ``std`` on the 0-1 scale."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def create(
        cls,
        image_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> Preprocessing:
        """Validated constructor: raises :class:`InputError` naming the bad parameter."""
        std3 = _triple(std, "std")
        if min(std3) <= 0:
            raise InputError(f"std must be positive, got {std!r}")
        return cls(_size(image_size), _triple(mean, "mean"), std3)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std)}

    def array(self, images: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        """Stack RGB arrays ``H x W x 3`` (0-255) into a normalised ``float32 [B, 3, H, W]``,
        resizing in NumPy (:mod:`blackbox_vqa.resize`, torch's weights) where sizes differ."""
        height, width = self.image_size
        out = np.empty((len(images), 3, height, width), dtype=np.float32)
        scale = np.array([1.0 / (255.0 * s) for s in self.std], dtype=np.float32)
        offset = np.array([-m / s for m, s in zip(self.mean, self.std, strict=True)],
                          dtype=np.float32)
        for slot, image in zip(out, images, strict=True):
            if image.shape[:2] != self.image_size:
                image = resize_antialiased(image, self.image_size).astype(np.float32)
            elif image.dtype != np.uint8 and image.dtype != np.float32:
                image = image.astype(np.float32)  # as torch's .float() before the multiply
            np.multiply(image.transpose(2, 0, 1), scale[:, None, None], out=slot)
        out += offset[:, None, None]
        return out

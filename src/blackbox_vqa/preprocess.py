"""Image preprocessing shared by the PyTorch and exported-model adapters.

One implementation, so a model and its exported copy see bit-identical input tensors:
resize to ``(H, W)`` (bilinear, antialiased, on the 0-255 scale), scale to 0-1 and
normalise with ``mean``/``std`` given on the 0-1 scale (as torchvision's ``Normalize``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError

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

    def tensor(
        self, images: Sequence[NDArray[Any]], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Stack RGB arrays ``H x W x 3`` (0-255) into a normalised ``float32 [B, 3, H, W]``."""
        same = all(img.shape == images[0].shape for img in images)
        cpu = torch.device(device).type == "cpu"
        if same and cpu and len(images) > 0 and images[0].shape[:2] == self.image_size:
            return self._normalised_cpu(images)
        if same:
            batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
            if batch.dtype != torch.uint8 or tuple(batch.shape[-2:]) != self.image_size:
                batch = self._resized(batch.float())
        else:
            batch = torch.cat(
                [
                    self._resized(torch.from_numpy(np.ascontiguousarray(img)).to(device)
                                  .permute(2, 0, 1)[None].float())
                    for img in images
                ]
            )
        return self._normalised(batch)

    def _normalised(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch * (1 / (255 std)) + (-mean / std)`` into a new contiguous ``float32``
        ``[B, 3, H, W]`` tensor: one pass that also lays an ``H x W x 3`` view out as
        ``3 x H x W``, then the offset in place (the same float32 roundings as a multiply
        and an add, and several times faster than normalising the permuted view)."""
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=batch.device)
        offset = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)],
                              device=batch.device)
        out = torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
        torch.mul(batch, scale.view(1, 3, 1, 1), out=out)
        return out.add_(offset.view(1, 3, 1, 1))

    def _normalised_cpu(self, images: Sequence[NDArray[Any]]) -> torch.Tensor:
        """:meth:`_normalised` for CPU images already at ``image_size``, in NumPy: each
        image is scaled straight into its ``3 x H x W`` slot (no stacked copy, and a faster
        transposing pass than torch's); the values are bit-identical."""
        height, width = self.image_size
        out = np.empty((len(images), 3, height, width), dtype=np.float32)
        scale = np.array([1.0 / (255.0 * s) for s in self.std], dtype=np.float32)
        offset = np.array([-m / s for m, s in zip(self.mean, self.std, strict=True)],
                          dtype=np.float32)
        for slot, image in zip(out, images, strict=True):
            if image.dtype != np.uint8 and image.dtype != np.float32:
                image = image.astype(np.float32)  # as torch's .float() before the multiply
            np.multiply(image.transpose(2, 0, 1), scale[:, None, None], out=slot)
        out += offset[:, None, None]
        return torch.from_numpy(out)

    def _resized(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[-2:]) == self.image_size:
            return batch
        return F.interpolate(
            batch, size=self.image_size, mode="bilinear", align_corners=False, antialias=True
        )

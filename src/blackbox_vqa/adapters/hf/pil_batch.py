"""The PIL image processors' pipeline run over a batch at once, bit for bit.

Without torchvision, ``transformers`` processes images with its PIL backend
(``PilBackend``: CLIP for LLaVA, SigLIP for PaliGemma), one image at a time: each image
crosses to PIL and back, is channel-moved, cropped, rescaled and normalised by separate
calls. On an occlusion batch of small images that Python work costs about three times
the resampling itself. :func:`processed` runs the same steps over the whole batch: PIL's
resampling per image (the one step that must be), then cropping, rescaling and
normalising the stacked batch with the same numpy arithmetic in the same order.

It applies only where the processor's class keeps the backend's own steps (no override of
``_preprocess``, ``process_image``, ``resize``, ``center_crop``, ``rescale`` or
``normalize``), to ``uint8`` RGB images of one shape, without padding, when the call asks
for tensors (without, the processor returns a list of arrays). Before its first
use on a processor, image shape and call settings, the result on one image is compared
with the processor's own output: any difference in value, dtype or key and the processor
is used plainly for them from then on. Anything else returns ``None`` and the caller runs
the processor.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["processed"]

_STEPS = ("_preprocess", "process_image", "resize", "center_crop", "rescale", "normalize",
          "preprocess", "_preprocess_image_like_inputs", "_prepare_image_like_inputs")

#: per processor: the (image shape, call settings) whose batched result was checked
#: against the plain call, and the verdict
_CHECKED: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], str], bool]] = \
    weakref.WeakKeyDictionary()


def _eligible(processor: Any) -> bool:
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # an older transformers: no PIL backend class to mirror
        return False
    cls = type(processor)
    return isinstance(processor, PilBackend) and all(
        getattr(cls, name, None) is getattr(PilBackend, name, None) for name in _STEPS)


def _batched(processor: Any, images: Sequence[NDArray[np.uint8]], settings: dict[str, Any]
             ) -> NDArray[Any] | None:
    """The backend's ``_preprocess`` over ``images`` as one ``[N, C, H, W]`` array."""
    from PIL import Image

    if settings.get("do_pad") or settings.get("input_data_format") is not None:
        return None
    batch: NDArray[Any]
    if settings.get("do_resize"):
        first = np.moveaxis(images[0], -1, 0)
        reference = processor.resize(image=first, size=settings["size"],
                                     resample=settings.get("resample"))
        if reference.dtype != np.uint8 or reference.ndim != 3:
            return None
        height, width = reference.shape[1:]
        resample = settings.get("resample")
        resample = resample if resample is not None else Image.Resampling.BILINEAR
        rows, cols = images[0].shape[:2]
        batch = np.stack([
            np.frombuffer(Image.frombuffer("RGB", (cols, rows), np.ascontiguousarray(im),
                                           "raw", "RGB", 0, 1)
                          .resize((width, height), resample=resample).tobytes(), np.uint8)
            for im in images]).reshape(len(images), height, width, 3).transpose(0, 3, 1, 2)
        if not np.array_equal(batch[0], reference):
            return None
    else:
        batch = np.stack(images).transpose(0, 3, 1, 2)
    if settings.get("do_center_crop"):
        batch = processor.center_crop(batch, settings["crop_size"])
    if settings.get("do_rescale"):
        batch = (batch.astype(np.float64) * settings["rescale_factor"]).astype(np.float32)
    if settings.get("do_normalize"):
        if not np.issubdtype(batch.dtype, np.floating):
            batch = batch.astype(np.float32)
        channels = batch.shape[1]
        mean, std = settings["image_mean"], settings["image_std"]
        mean = np.array(mean if isinstance(mean, (list, tuple)) else [mean] * channels,
                        dtype=batch.dtype)
        std = np.array(std if isinstance(std, (list, tuple)) else [std] * channels,
                       dtype=batch.dtype)
        batch = (batch - mean[:, None, None]) / std[:, None, None]
    return batch


def _same(ours: Any, plain: Any) -> bool:
    if set(ours.keys()) != set(plain.keys()):
        return False
    for key in plain:
        a, b = ours[key], plain[key]
        if isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)):
                return False
        elif not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                  and a.dtype == b.dtype and np.array_equal(a, b)):
            return False
    return True


def processed(processor: Any, images: Sequence[Any], kwargs: dict[str, Any]) -> Any | None:
    """``processor(images, **kwargs)`` computed over the batch at once (module doc), or
    None where that does not apply (the caller then calls the processor)."""
    if len(images) < 2 or kwargs.get("return_tensors") is None or \
            not _eligible(processor) or not all(
            isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3
            and im.shape[-1] == 3 and im.shape == images[0].shape for im in images):
        return None
    key = (tuple(images[0].shape), repr(sorted(kwargs.items())))
    try:
        checked = _CHECKED.setdefault(processor, {})
    except TypeError:  # a processor that cannot be weakly referenced or hashed
        return None
    if checked.get(key) is False:
        return None
    from transformers.feature_extraction_utils import BatchFeature

    tensors = kwargs.get("return_tensors")
    try:
        settings = processor._merge_and_standardize_kwargs(
            **{k: v for k, v in kwargs.items() if k != "return_tensors"})
        batch = _batched(processor, images, settings)
        if batch is None:
            return None
        out = BatchFeature(data={"pixel_values": batch}, tensor_type=tensors)
        if key not in checked:
            plain = processor(images[:1], **kwargs)
            checked[key] = _same(BatchFeature(data={"pixel_values": batch[:1]},
                                              tensor_type=tensors), plain)
            if not checked[key]:
                return None
    except Exception:  # anything unexpected: the processor's own call decides
        checked[key] = False
        return None
    return out

"""The processor's work on one batch of a generative VLM, done once per distinct image.

Word-drop inputs all carry the explained image: the image processor (resizing,
rescaling, normalising on the CPU) would otherwise run on that image once per row. While
the adapter calls its processor, :func:`images_once` swaps the processor's
``image_processor`` for a proxy that sends each distinct image through it once and
repeats its rows of the output (``gathered``), so the processor's own prompt expansion
(image tokens per image, tiles, grids) sees exactly the batch it would have built
itself. Any output the proxy cannot repeat row by row falls back to the plain call.

The text half likewise: image-occlusion rows all carry the same prompt, so the proxy
:func:`images_once` also puts over the processor's ``tokenizer`` tokenises each distinct
text of a call once and repeats its rows (the padded width is the longest distinct text's,
as in the plain call).

Images are keyed by :func:`image_key`, a SHA-1 digest of the ``uint8`` pixels (the adapter
rounds images to whole levels before the processor, and the processor is deterministic),
which also keys the vision cache of :mod:`~blackbox_vqa.adapters.hf.generative_reuse`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from blackbox_vqa.adapters.hf.pil_batch import processed

__all__ = ["gathered", "image_key", "images_once", "whole_levels"]


def whole_levels(image: NDArray[Any]) -> NDArray[np.uint8]:
    """``image`` as whole 0-255 levels (rounded to nearest): what the adapter gives the
    processor, and what :func:`image_key` digests."""
    if image.dtype == np.uint8:
        return np.asarray(image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def image_key(image: NDArray[Any]) -> str:
    """SHA-1 hex digest of an image array's shape, dtype and bytes."""
    data = np.ascontiguousarray(image)
    digest = hashlib.sha1(f"{data.shape}{data.dtype}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def gathered(out: dict[str, Any], inverse: Sequence[int], count: int) -> dict[str, Any] | None:
    """The image processor's output ``out`` over ``count`` distinct images, repeated to the
    rows ``inverse`` (row ``r`` holds distinct image ``inverse[r]``): per-image tensors,
    arrays and lists indexed by ``inverse``; Qwen2-VL's flattened patches
    (``pixel_values`` with ``image_grid_thw``) split by image first. None when a value has
    no row per image (the caller then runs the plain call)."""
    found: dict[str, Any] = {}
    index = list(inverse)
    grid = out.get("image_grid_thw")
    for key, value in out.items():
        if key == "pixel_values" and grid is not None:
            sizes = [int(np.prod(np.asarray(row))) for row in grid]
            if sum(sizes) != len(value) or len(sizes) != count:
                return None
            if isinstance(value, torch.Tensor):
                patches = torch.split(value, sizes)
                found[key] = torch.cat([patches[i] for i in index])
            else:
                chunks = np.split(np.asarray(value), np.cumsum(sizes)[:-1])
                found[key] = np.concatenate([chunks[i] for i in index])
        elif isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim and \
                len(value) == count:
            found[key] = value[torch.tensor(index) if isinstance(value, torch.Tensor)
                               else np.asarray(index)]
        elif isinstance(value, (list, tuple)) and len(value) == count:
            found[key] = [value[i] for i in index]
        else:
            return None
    return found


class _Once:
    """Stands in for an image processor: each distinct top-level image once (module doc)."""

    def __init__(self, inner: Any, keys: dict[int, str]) -> None:
        self._inner = inner
        self._keys = keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _key(self, item: Any) -> str:
        if isinstance(item, (list, tuple)):
            return "|".join(self._key(x) for x in item)
        found = self._keys.get(id(item))
        return found if found is not None else image_key(np.asarray(item))

    def _run(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        """The inner processor's output, through :func:`~.pil_batch.processed` where it
        applies (one image each: the prompt expansion's nesting is ``[[image], ...]``)."""
        flat = [item[0] if isinstance(item, (list, tuple)) and len(item) == 1 else item
                for item in images]
        found = None if args else processed(self._inner, flat, kwargs)
        return found if found is not None else self._inner(images, *args, **kwargs)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(images, (list, tuple)) or len(images) < 2:
            return self._inner(images, *args, **kwargs)
        slots: dict[str, int] = {}
        inverse = [slots.setdefault(self._key(item), len(slots)) for item in images]
        if len(slots) == len(images):
            return self._run(images, *args, **kwargs)
        first = {slot: row for row, slot in reversed(list(enumerate(inverse)))}
        distinct = [images[first[slot]] for slot in range(len(slots))]
        out = self._run(distinct, *args, **kwargs)
        data = gathered(dict(out), inverse, len(slots))
        if data is None:
            return self._inner(images, *args, **kwargs)
        for key, value in data.items():
            out[key] = value
        return out


class _TextsOnce:
    """Stands in for a tokenizer: each distinct text of a batch call once (module doc)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            return self._inner(text, *args, **kwargs)
        slots: dict[str, int] = {}
        inverse = [slots.setdefault(t, len(slots)) for t in text]
        if len(slots) == len(text):
            return self._inner(text, *args, **kwargs)
        out = self._inner(list(slots), *args, **kwargs)
        data = gathered(dict(out), inverse, len(slots))
        encodings = getattr(out, "_encodings", None)
        if data is None or (encodings is not None and len(encodings) != len(slots)):
            return self._inner(text, *args, **kwargs)
        for key, value in data.items():
            out[key] = value
        if encodings is not None:
            out._encodings = [encodings[i] for i in inverse]
        return out


@contextmanager
def images_once(processor: Any, images: Sequence[NDArray[Any]], keys: Sequence[str]
                ) -> Iterator[None]:
    """Within the block, ``processor``'s image processor runs once per distinct image of
    ``images`` (keyed by ``keys``, one per image) and its tokenizer once per distinct text
    of a call; both restored afterwards, also on error."""
    inner, tokenizer = processor.image_processor, processor.tokenizer
    processor.image_processor = _Once(inner, {id(im): k for im, k in zip(images, keys,
                                                                       strict=True)})
    processor.tokenizer = _TextsOnce(tokenizer)
    try:
        yield
    finally:
        processor.image_processor = inner
        processor.tokenizer = tokenizer

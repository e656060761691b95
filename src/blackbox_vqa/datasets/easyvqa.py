"""The easy-VQA data set (``easyvqa:train``, ``easyvqa:test``) from the ``easy-vqa`` package.

Each 64 x 64 image holds one shape on a flat background, so a ground-truth attention map
exists without human data: the shape's pixels. :func:`shape_map` derives it from the image
(pixels whose colour differs from the background colour by more than ``tolerance`` in some
channel); it stands in for human attention, since every question is about the one shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.datasets.items import DatasetListing, Item
from blackbox_vqa.errors import InputError

__all__ = ["SHAPE_TOLERANCE", "SPLITS", "background_colour", "list_easyvqa", "shape_map"]

SPLITS = ("train", "test")
SHAPE_TOLERANCE = 16


def list_easyvqa(split: str) -> DatasetListing:
    """All questions of an easy-VQA split, in the package's order (keys ``q000123``)."""
    if split not in SPLITS:
        raise InputError(f"easy-VQA split must be one of {', '.join(SPLITS)}, got {split!r}")
    try:
        import easy_vqa
    except ImportError as exc:
        raise InputError("the easy-vqa package is not installed (pip install easy-vqa)") from exc
    if split == "train":
        texts, labels, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, labels, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    items: list[Item] = []
    missing = 0
    width = len(str(len(texts)))
    for index, (text, label, image_id) in enumerate(zip(texts, labels, ids, strict=True)):
        path = paths.get(int(image_id))
        if path is None:
            missing += 1
            continue
        items.append(
            Item(
                key=f"q{index:0{width}d}",
                question=str(text),
                image=str(path),
                answer=str(label),
                map_kind="shape",
            )
        )
    skipped = {"no image": missing} if missing else {}
    return DatasetListing(
        name=f"easyvqa:{split}",
        items=tuple(items),
        skipped=skipped,
        identity={"dataset": f"easyvqa:{split}", "questions": len(texts)},
    )


def background_colour(pixels: NDArray[Any]) -> NDArray[np.int64]:
    """The most common colour of the image's border pixels, ``int64 [3]``."""
    image = np.asarray(pixels)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must be H x W x 3, got shape {image.shape}")
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.int64)
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return np.asarray(colours[int(np.argmax(counts))], dtype=np.int64)


def shape_map(pixels: NDArray[Any], *, tolerance: float = SHAPE_TOLERANCE) -> NDArray[np.float64]:
    """``float64 H x W`` map: 1.0 on the shape's pixels, 0.0 on the background.

    A pixel belongs to the shape when one of its channels differs from the background
    colour (:func:`background_colour`) by more than ``tolerance`` (0-255 scale).
    """
    if not tolerance >= 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance!r}")
    image = np.asarray(pixels).astype(np.float64)
    difference = np.abs(image - background_colour(pixels)[None, None, :]).max(axis=2)
    return (difference > tolerance).astype(np.float64)

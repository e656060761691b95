"""Data sets for dataset-scale evaluation: easy-VQA and the VQA / VQA-HAT file formats.

``open_dataset("easyvqa:test")`` or ``open_dataset("vqa", questions=..., images=...,
annotations=..., hat=...)`` lists the usable items; :func:`human_maps` reads an item's
attention maps (or derives easy-VQA's from the image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.datasets.items import DatasetListing, Item, normalise_answer
from blackbox_vqa.errors import InputError

__all__ = [
    "DatasetListing",
    "Item",
    "human_maps",
    "normalise_answer",
    "open_dataset",
    "read_item_files",
    "select_items",
]

DATASETS = ("easyvqa:train", "easyvqa:test", "vqa")


def open_dataset(
    spec: str,
    *,
    questions: str | Path | None = None,
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    hat: str | Path | None = None,
) -> DatasetListing:
    """List the items of data set ``spec`` (``easyvqa:train``, ``easyvqa:test`` or ``vqa``)."""
    name = spec.strip().lower()
    file_options = {"--questions": questions, "--annotations": annotations,
                    "--images": images, "--hat": hat}
    if name.startswith("easyvqa"):
        given = [option for option, value in file_options.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --dataset vqa, not {spec!r}")
        from blackbox_vqa.datasets.easyvqa import SPLITS, list_easyvqa

        split = name.partition(":")[2]
        if split not in SPLITS:
            raise InputError(f"--dataset {spec!r}: use easyvqa:train or easyvqa:test")
        return list_easyvqa(split)
    if name == "vqa":
        if questions is None or images is None:
            raise InputError("--dataset vqa needs --questions FILE and --images DIR")
        from blackbox_vqa.datasets.vqa import list_vqa

        return list_vqa(questions, images, annotations=annotations, hat=hat)
    raise InputError(f"--dataset must be one of {', '.join(DATASETS)}, got {spec!r}")


def human_maps(
    item: Item, pixels: NDArray[Any], *, files: Mapping[str, bytes] | None = None
) -> list[NDArray[np.float64]]:
    """The item's attention maps, each ``float64 H x W`` (any size); empty when it has none.

    ``files``: path -> bytes of files read elsewhere (:func:`read_item_files`); a path
    not in it is read here.
    """
    if item.map_kind == "shape":
        from blackbox_vqa.datasets.easyvqa import shape_map

        return [shape_map(pixels)]
    if item.map_kind == "files":
        from blackbox_vqa.datasets.vqa import load_hat_map

        given = files or {}
        return [load_hat_map(path, content=given.get(path)) for path in item.maps]
    return []


def read_item_files(item: Item) -> dict[str, bytes]:
    """path -> bytes of the item's image and map files that can be read here, so that the
    item can be evaluated on a machine without them (a missing file is left out, and is
    reported there as it would be here)."""
    found: dict[str, bytes] = {}
    for path in (item.image, *item.maps):
        try:
            found[path] = Path(path).read_bytes()
        except OSError:
            continue
    return found


def select_items(items: Sequence[Any], *, limit: int | None, seed: int) -> list[Any]:
    """All ``items``, or ``limit`` of them drawn without replacement from ``seed`` (kept in
    data-set order)."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[int(i)] for i in chosen]

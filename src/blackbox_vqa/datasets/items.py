"""One evaluation item (image, question, ground truth, attention maps) and a listing of them.

Items are small, picklable descriptions: paths and strings, no pixels. The pixels and the
attention maps are read when the item is evaluated (in a worker process, when there are
several), by :func:`blackbox_vqa.datasets.human_maps`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from blackbox_vqa.text import normalise_answer  # re-exported: it lives in text.py

__all__ = ["DatasetListing", "Item", "MapKind", "normalise_answer"]

MapKind = Literal["files", "shape", "none"]


@dataclass(frozen=True)
class Item:
    """One question about one image.

    Attributes:
        key: unique within the data set and safe as a file name.
        question: the question text.
        image: path of the image file.
        answer: the reference answer (VQA's ``multiple_choice_answer``), None if unknown.
        answers: every human answer given (ten for VQA; none for easy-VQA, whose one
            generated answer is ``answer``); VQA accuracy is computed from these.
        maps: attention-map files (``map_kind == "files"``).
        map_kind: ``"files"`` (human maps read from ``maps``), ``"shape"`` (the ground-truth
            map is derived from the image, easy-VQA) or ``"none"``.
    """

    key: str
    question: str
    image: str
    answer: str | None
    answers: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    map_kind: MapKind = "none"


@dataclass(frozen=True)
class DatasetListing:
    """The usable items of a data set and how many were skipped, by reason.

    ``identity`` describes the data set (name, files) for a run's settings.
    """

    name: str
    items: tuple[Item, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)
    identity: Mapping[str, Any] = field(default_factory=dict)

    @property
    def has_maps(self) -> bool:
        """Whether the items carry human (or ground-truth) attention maps."""
        return any(item.map_kind != "none" for item in self.items)

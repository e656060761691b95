"""How many model inputs a method scores, stated before it runs.

A :class:`~blackbox_vqa.explainers.registry.Method` entry may carry ``calls``:
``calls(CostQuery) -> CallEstimate``. The command line adds the estimates of the methods
that run (and of the faithfulness metrics on their maps, see
:func:`blackbox_vqa.evaluation.metrics.metric_inputs`) to print one figure before any
input is sent: for an endpoint taking one input per request, the requests at most (the
HTTP client does not send an input it has already answered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blackbox_vqa.errors import InputError

__all__ = ["CallEstimate", "CostQuery"]


@dataclass(frozen=True)
class CostQuery:
    """One input as a cost estimate sees it.

    Attributes:
        height, width: the image's size in pixels.
        words: words of the question (``text.split_words``).
        settings: the :class:`~blackbox_vqa.explainers.registry.MethodSettings` in force.
    """

    height: int
    width: int
    words: int
    settings: Any


@dataclass(frozen=True)
class CallEstimate:
    """What a method will score for one input.

    Attributes:
        inputs: model inputs beyond the original one (which every run scores once).
        exact: ``inputs`` is the figure (``False``: at most, e.g. sampled coalitions
            scored once each).
        image_units: units of its image map (cells, or ``height * width`` for a pixel
            map); 0 when it makes none. The metrics' cost depends on it.
        pixel_map: the image map is one value per pixel.
        word_map: it makes one value per question word.
    """

    inputs: int
    exact: bool = True
    image_units: int = 0
    pixel_map: bool = False
    word_map: bool = False

    def __post_init__(self) -> None:
        for name in ("inputs", "image_units"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be an integer >= 0, got {value!r}")

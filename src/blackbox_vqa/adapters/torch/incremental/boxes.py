"""Pure box arithmetic for incremental inference (no model involved).

A perturbed activation is its original ``[1, C, H, W]`` with a patch ``[N, C, h, w]``
pasted at per-item offsets ``top [N]``, ``left [N]``; every item of a batch shares the
patch size, so the patches stack into one tensor. Ranges are half-open ``[start, stop)``
along one spatial axis; offsets are ``int64`` tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["WindowSpec", "cap_length", "changed_boxes", "fit_starts", "item_ranges",
           "kept_ranges", "output_centre", "output_range", "source_index", "truncate_range"]

PAD_MODES = ("constant", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class WindowSpec:
    """One spatial axis of a sliding-window operator (convolution or pooling).

    ``kernel``, ``stride``, ``dilation`` and ``padding`` as in ``torch.nn.Conv2d``;
    ``mode`` is how padding is filled: ``"constant"`` (zeros, or ``-inf`` for max
    pooling), ``"reflect"``, ``"replicate"`` or ``"circular"``.
    """

    kernel: int
    stride: int
    dilation: int
    padding: int
    mode: str = "constant"

    @property
    def reach(self) -> int:
        """Extent of one window in input positions: ``dilation * (kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1


def fit_starts(starts: torch.Tensor, length: int, size: int) -> torch.Tensor:
    """Shift ranges ``[start, start + length)`` to lie inside ``[0, size)``: ``[N]`` int64."""
    return starts.clamp(min=0).clamp(max=max(size - length, 0))


def output_range(
    start: torch.Tensor, stop: torch.Tensor, spec: WindowSpec, out_size: int, in_size: int
) -> tuple[torch.Tensor, int]:
    """Output positions whose window reads any input position in ``[start, stop)``.

    Returns the per-item first output position ``[N]`` and one common length: the
    longest item's, every range shifted to fit ``[0, out_size)`` (a longer range than an
    item needs is still exact, only recomputed). Output ``o`` reads inputs
    ``o * stride - padding + j * dilation`` for ``j < kernel``. With ``reflect`` or
    ``replicate`` padding a range within ``padding`` of a border is first extended to
    it (the padding copies those positions); with ``circular`` padding it spans the
    whole axis (the copies land at the opposite border).
    """
    first, stop = item_ranges(start, stop, spec, out_size, in_size)
    length = int((stop - first).max().clamp(min=1).item())
    length = min(length, out_size)
    return fit_starts(first, length, out_size), length


def item_ranges(
    start: torch.Tensor, stop: torch.Tensor, spec: WindowSpec, out_size: int, in_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's own output range ``[first, stop)`` (``[N]`` each, at least one
    position) whose windows read input ``[start, stop)``; see :func:`output_range`."""
    if spec.mode != "constant" and spec.padding > 0:
        near_start = start <= spec.padding
        near_stop = stop >= in_size - spec.padding
        if spec.mode == "circular":
            near = near_start | near_stop
            start = torch.where(near, 0, start)
            stop = torch.where(near, in_size, stop)
        else:
            start = torch.where(near_start, 0, start)
            stop = torch.where(near_stop, in_size, stop)
    first = -torch.div(-(start + spec.padding - spec.reach + 1), spec.stride,
                       rounding_mode="floor")
    last = torch.div(stop - 1 + spec.padding, spec.stride, rounding_mode="floor")
    first = first.clamp(min=0, max=out_size - 1)
    last = torch.maximum(last.clamp(max=out_size - 1), first)
    return first, last + 1


def cap_length(tau: float, size: int) -> int:
    """The longest range approximate inference keeps on an axis of ``size`` positions:
    ``ceil(tau * size)``, at least 1 (``tau`` in ``(0, 1]``)."""
    return max(1, min(size, math.ceil(tau * size - 1e-9)))


def output_centre(start: torch.Tensor, stop: torch.Tensor, spec: WindowSpec) -> torch.Tensor:
    """Output coordinate ``[N]`` (float) whose window is centred on the middle of the
    input range ``[start, stop)``: output ``o``'s window is centred on input
    ``o * stride - padding + (reach - 1) / 2``."""
    middle = (start + stop - 1).double() / 2
    return (middle + spec.padding - (spec.reach - 1) / 2) / spec.stride


def kept_ranges(
    first: torch.Tensor, stop: torch.Tensor, centre: torch.Tensor, size: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Krypton's projective-field thresholding on one axis, per item: each range
    ``[first, stop)`` (``[N]``) longer than :func:`cap_length` is cut to that length,
    centred on ``centre`` ``[N]`` (start ``floor(centre - (cap - 1) / 2 + 0.5)``, shifted
    to fit ``[0, size)``); shorter ranges are kept whole. Returns the kept ``[start, stop)``."""
    cap = cap_length(tau, size)
    cut = stop - first > cap
    centred = fit_starts(torch.floor(centre - (cap - 1) / 2 + 0.5).to(first.dtype), cap, size)
    return torch.where(cut, centred, first), torch.where(cut, centred + cap, stop)


def truncate_range(
    first: torch.Tensor, stop: torch.Tensor, centre: torch.Tensor, size: int, tau: float
) -> tuple[torch.Tensor, int, int]:
    """:func:`kept_ranges` as one common length (the longest kept range) and per-item
    starts ``[N]`` of ranges of that length that contain each kept range, inside
    ``[0, size)``; also how many items were cut."""
    start, end = kept_ranges(first, stop, centre, size, tau)
    length = int((end - start).max().clamp(min=1).item())
    cut = int((stop - first > cap_length(tau, size)).sum().item())
    return fit_starts(start, length, size), length, cut


def source_index(
    out_start: torch.Tensor, out_length: int, spec: WindowSpec, in_size: int
) -> torch.Tensor:
    """Input positions ``[N, L]`` read by outputs ``[out_start, out_start + out_length)``.

    ``L = (out_length - 1) * stride + reach``. Positions in the padding map to the input
    position padding copies (``reflect``, ``replicate``, ``circular``) or to ``-1``
    (``constant``: filled with the padding value).
    """
    length = (out_length - 1) * spec.stride + spec.reach
    index = (out_start * spec.stride - spec.padding)[:, None] + torch.arange(length)[None, :]
    if spec.mode == "reflect":
        index = index.abs()
        index = torch.where(index >= in_size, 2 * (in_size - 1) - index, index)
    elif spec.mode == "replicate":
        index = index.clamp(0, in_size - 1)
    elif spec.mode == "circular":
        index = torch.remainder(index, in_size)
    else:
        index = torch.where((index < 0) | (index >= in_size), torch.full_like(index, -1), index)
    return index


def changed_boxes(
    original: torch.Tensor, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bounding box of where each item of ``batch`` ``[N, C, H, W]`` differs from
    ``original`` ``[1, C, H, W]``: ``top, bottom, left, right`` ``[N]`` (exclusive ends).

    An item equal to the original gets the box ``[0, 1) x [0, 1)`` (recomputing one
    unchanged position is still exact).
    """
    differs = (batch != original).any(dim=1)
    rows, cols = differs.any(dim=2), differs.any(dim=1)
    height, width = rows.shape[1], cols.shape[1]
    return (*_extent(rows, height), *_extent(cols, width))


def _extent(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(size, device=mask.device)
    some = mask.any(dim=1)
    first = torch.where(mask, positions, size).amin(dim=1)
    last = torch.where(mask, positions, -1).amax(dim=1)
    start = torch.where(some, first, 0)
    stop = torch.where(some, last + 1, 1)
    return start, stop

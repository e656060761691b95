"""Pure box arithmetic for incremental inference (no model involved).

A perturbed activation is its original ``[1, C, H, W]`` with a patch ``[N, C, h, w]``
pasted at per-item offsets ``top [N]``, ``left [N]``; every item of a batch shares the
patch size, so the patches stack into one tensor. Ranges are half-open ``[start, stop)``
along one spatial axis; offsets are ``int64`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WindowSpec", "changed_boxes", "fit_starts", "output_range", "source_index"]

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
    first = first.clamp(min=0)
    last = last.clamp(max=out_size - 1)
    length = int((last - first + 1).max().clamp(min=1).item())
    length = min(length, out_size)
    return fit_starts(first, length, out_size), length


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

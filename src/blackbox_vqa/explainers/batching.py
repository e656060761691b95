"""Batch-size choice for perturbation runs."""

from __future__ import annotations

from blackbox_vqa.adapters.capabilities import preferred_batch_size
from blackbox_vqa.errors import InputError

__all__ = ["DEFAULT_MEMORY_BUDGET", "auto_batch_size", "parse_batch_size"]

DEFAULT_MEMORY_BUDGET = 512 * 2**20
# Bytes of activations per input byte that a typical CNN keeps alive in a forward pass;
# a rough, deliberately generous factor that only sets an upper bound.
_ACTIVATION_FACTOR = 48
# Measured on a 2-core CPU (benchmarks/BENCHMARKS.md, "Occlusion"): the 64 x 64 reference
# model runs alike at 32-128 when the machine is quiet, and best at 64-128 when another
# process takes a core (short parallel regions suffer most); past 64 its activations
# outgrow what glibc keeps mapped. At 224 x 224 the memory bound gives 18, where a
# ResNet-18-sized model runs best (16-32; 1.4x slower at 1, 1.1x at 4).
_MAX_AUTO = 64


def parse_batch_size(value: str | int) -> int | None:
    """``"auto"`` -> ``None``; a positive int (or its text) -> that int."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        try:
            value = int(value)
        except ValueError:
            raise InputError(f"batch size must be 'auto' or a positive integer, got {value!r}") \
                from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"batch size must be 'auto' or a positive integer, got {value!r}")
    return value


def auto_batch_size(
    model: object,
    image_shape: tuple[int, ...],
    total: int,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """Pick a batch size for ``total`` inputs of ``image_shape`` (``H x W x 3``).

    A model may state its own
    (:class:`~blackbox_vqa.adapters.capabilities.SupportsPreferredBatchSize`); otherwise the
    size is the number of inputs whose float32 pixels, times a generous activation factor,
    fit ``memory_budget`` bytes, capped at 64 (larger CPU batches were no faster).
    """
    preferred = preferred_batch_size(model)
    if preferred is not None:
        return max(1, min(preferred, total))
    pixels = 1
    for side in image_shape:
        pixels *= int(side)
    per_item = pixels * 4 * _ACTIVATION_FACTOR
    return max(1, min(_MAX_AUTO, memory_budget // max(per_item, 1), total))

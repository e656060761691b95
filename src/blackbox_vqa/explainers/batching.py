"""Batch-size choice for perturbation runs."""

from __future__ import annotations

from blackbox_vqa.errors import InputError

__all__ = ["DEFAULT_MEMORY_BUDGET", "auto_batch_size", "parse_batch_size"]

DEFAULT_MEMORY_BUDGET = 512 * 2**20
# Bytes of activations per input byte that a typical CNN keeps alive in a forward pass;
# a rough, deliberately generous factor that only sets an upper bound.
_ACTIVATION_FACTOR = 48
# Measured on 2-core CPUs (benchmarks/BENCHMARKS.md, "Occlusion"): batches whose float32
# input exceeds a few MiB run slower per item (activations fall out of cache), and past
# about 32 items per batch a small model gains nothing more from fewer calls.
_CACHE_BUDGET = 4 * 2**20
_MAX_AUTO = 32


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

    A model may state its own with an int attribute ``preferred_batch_size``; otherwise
    the size is the number of inputs whose float32 pixels fit a few MiB (a batch that
    stays in cache), at most 32, and at most as many as fit ``memory_budget`` bytes with
    their activations (float32 pixels times a generous activation factor).
    """
    preferred = getattr(model, "preferred_batch_size", None)
    if isinstance(preferred, int) and preferred > 0:
        return max(1, min(preferred, total))
    pixels = 1
    for side in image_shape:
        pixels *= int(side)
    input_bytes = max(pixels * 4, 1)
    fits_cache = _CACHE_BUDGET // input_bytes
    fits_memory = memory_budget // (input_bytes * _ACTIVATION_FACTOR)
    return max(1, min(_MAX_AUTO, fits_cache, fits_memory, total))

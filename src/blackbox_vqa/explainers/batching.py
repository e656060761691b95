"""Batch-size choice for perturbation runs."""

from __future__ import annotations

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
# ResNet-18-sized model ran best with two threads (16-32; 1.4x slower at 1, 1.1x at 4);
# with one thread it runs best at 4-6, which TorchAdapter.batch_size_limit sees to on CPU.
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

    A model may state its own with an int attribute ``preferred_batch_size``; otherwise
    the size is the number of inputs whose float32 pixels, times a generous activation
    factor, fit ``memory_budget`` bytes, capped at 64 (larger CPU batches were no faster)
    and at the model's int attribute ``batch_size_limit`` where it has one (the largest
    batch worth handing it at once; see ``TorchAdapter.batch_size_limit``).
    """
    preferred = _positive_attribute(model, "preferred_batch_size")
    if preferred is not None:
        return max(1, min(preferred, total))
    pixels = 1
    for side in image_shape:
        pixels *= int(side)
    per_item = pixels * 4 * _ACTIVATION_FACTOR
    size = min(_MAX_AUTO, memory_budget // max(per_item, 1), total)
    limit = _positive_attribute(model, "batch_size_limit")
    if limit is not None:
        size = min(size, limit)
    return max(1, size)


def _positive_attribute(model: object, name: str) -> int | None:
    """``model.name`` if it is a positive int (not a bool), else None."""
    value = getattr(model, name, None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None

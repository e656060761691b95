"""One exception tree for the whole package.

Every error the package raises on purpose derives from :class:`BlackboxVQAError` and
carries the process exit code the CLI uses for it: ``2`` for bad usage or bad input,
``1`` for a model that failed or misbehaved. Third-party errors (PIL, torch, onnxruntime,
httpx) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "BlackboxVQAError",
    "ClusterError",
    "GradientUnavailableError",
    "ImageError",
    "ImageTooLargeError",
    "InputError",
    "ModelError",
    "ModelLoadError",
    "ModelOutputError",
    "NotSupportedError",
    "QuestionError",
    "first_line",
]


class BlackboxVQAError(Exception):
    """Base of every error raised on purpose by blackbox_vqa."""

    exit_code: int = 1


class InputError(BlackboxVQAError, ValueError):
    """The user's input or options are invalid (exit code 2)."""

    exit_code = 2


class ImageError(InputError):
    """An image is missing, unreadable, or of an unusable size."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed (refused from its header, before decoding)."""


class QuestionError(InputError):
    """A question is empty or cannot be understood by the model."""


class NotSupportedError(InputError):
    """A feature or model spec that this version does not support."""


class GradientUnavailableError(NotSupportedError):
    """A gradient method was asked of a model that offers no gradients."""


class ModelError(BlackboxVQAError, RuntimeError):
    """The model failed or returned something unusable (exit code 1)."""

    exit_code = 1


class ModelLoadError(ModelError):
    """A model could not be loaded or does not implement the model protocol."""


class ModelOutputError(ModelError):
    """A model returned scores of the wrong shape, NaN, infinite or negative values."""


class ClusterError(BlackboxVQAError, RuntimeError):
    """A compute cluster (Ray) cannot be reached or lost the run's workers (exit code 1)."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of a third-party exception's message (its type name if empty), for
    one-line errors that wrap it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

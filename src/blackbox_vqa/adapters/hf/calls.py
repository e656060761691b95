"""Calling ``transformers``: quiet while loading, its errors as one-line model errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blackbox_vqa.errors import BlackboxVQAError, ModelError, first_line

__all__ = ["quiet_transformers", "wrapped"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and only errors from transformers while loading."""
    from transformers.utils import logging

    hf_logging: Any = logging
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def wrapped(name: str, what: str) -> Iterator[None]:
    """Translate third-party errors into :class:`ModelError` naming the model and step."""
    try:
        yield
    except BlackboxVQAError:
        raise
    except Exception as exc:
        raise ModelError(f"{name}: {what} failed: {type(exc).__name__}: {first_line(exc)}") \
            from exc

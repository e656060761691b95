"""Calling ``transformers``: quiet while loading, its errors as one-line model errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blackbox_vqa.errors import BlackboxVQAError, ModelError, first_line

__all__ = ["quiet_transformers", "wrapped"]


class _Quiet:
    """How many blocks of any thread are inside :func:`quiet_transformers`, and what to
    restore when the last leaves (transformers' verbosity is process-wide)."""

    lock = threading.Lock()
    depth = 0
    level = 0
    bars = False


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and only errors from transformers within the block.

    Nested and concurrent blocks (a batch encoded on a worker thread while another is
    scored) share one quiet spell: the first to enter saves the verbosity and the last to
    leave restores it. (Each block saving and restoring on its own let an interleaving
    leave the library at the error level for good: A saves "warning", B saves "error", A
    restores "warning", B restores "error".)
    """
    from transformers.utils import logging

    hf_logging: Any = logging
    with _Quiet.lock:
        if _Quiet.depth == 0:
            _Quiet.level = hf_logging.get_verbosity()
            _Quiet.bars = hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        _Quiet.depth += 1
    try:
        yield
    finally:
        with _Quiet.lock:
            _Quiet.depth -= 1
            if _Quiet.depth == 0:
                hf_logging.set_verbosity(_Quiet.level)
                if _Quiet.bars:
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

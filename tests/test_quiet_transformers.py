"""``quiet_transformers`` (adapters/hf/calls.py): transformers' warnings and progress bars
hidden within the block, errors shown, everything as before once the last block of any
thread has left."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

pytest.importorskip("transformers")

from transformers.utils import logging as hf_logging

from blackbox_vqa.adapters.hf.calls import quiet_transformers

LOG: Any = hf_logging.get_logger("transformers.blackbox_vqa_test")


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collected() -> Any:
    """What reaches a handler of transformers' library logger (the default one writes to
    whatever ``sys.stderr`` was when transformers was imported)."""
    handler = _Collected()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)


def _state() -> tuple[int, bool]:
    return hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()


def test_warnings_hidden_errors_shown_and_all_restored(collected: list[str]) -> None:
    before = _state()
    assert before[1], "progress bars start enabled"
    with quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
        LOG.warning("inside-warning")
        LOG.error("inside-error")
        with quiet_transformers():  # nested: the same spell
            LOG.warning("nested-warning")
        LOG.warning("still-inside-warning")
    LOG.warning("after-warning")
    assert collected == ["inside-error", "after-warning"]
    assert _state() == before


def test_threads_share_one_spell_and_the_last_to_leave_ends_it(collected: list[str]
                                                               ) -> None:
    """The interleaving that a worker thread encoding the next batch makes: A enters,
    B enters, A leaves (still quiet for B), B leaves."""
    before = _state()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with quiet_transformers():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    worker = threading.Thread(target=first)
    worker.start()
    a_in.wait(5)
    with quiet_transformers():
        b_in.set()
        a_out.wait(5)
        LOG.warning("after-a-left-warning")
        assert not hf_logging.is_progress_bar_enabled()
    worker.join(5)
    LOG.warning("after-both-warning")
    assert collected == ["after-both-warning"]
    assert _state() == before

"""Model factories for the Ray executor tests (specs ``ray_toys:NAME``).

The Ray nodes the tests start have tests/ on ``PYTHONPATH`` and ``BBVQA_RAY_TEST_DIR`` in
their environment: :func:`pid_brightness` writes the loading worker's process id there,
so that a test can kill that process mid-run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np

from eval_toys import SlowBrightness

PID_DIR_ENV = "BBVQA_RAY_TEST_DIR"


def pid_brightness() -> SlowBrightness:
    """:class:`eval_toys.SlowBrightness`, after leaving ``pids/PID`` in the test folder."""
    folder = Path(os.environ[PID_DIR_ENV]) / "pids"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).write_text("loaded\n")
    return SlowBrightness()


class PoisonedBrightness(SlowBrightness):
    """Kills its own process (as the out-of-memory killer would) on the question written
    in ``poison`` in the test folder."""

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        poison = Path(os.environ[PID_DIR_ENV]) / "poison"
        if poison.exists() and poison.read_text() in questions:
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._predict_batch(images, questions)


def poisoned_brightness() -> PoisonedBrightness:
    return PoisonedBrightness()

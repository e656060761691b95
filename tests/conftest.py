"""Shared fixtures; puts tests/ on sys.path so ``toys`` imports as a module."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def square_image(tmp_path: Path) -> Path:
    """A 64x64 PNG: black with a white 20x20 square at rows 10-29, columns 20-39."""
    from PIL import Image

    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = 255
    path = tmp_path / "square.png"
    Image.fromarray(pixels).save(path)
    return path

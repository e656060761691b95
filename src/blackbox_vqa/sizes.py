"""Parsing of option values shared by several commands."""

from __future__ import annotations

import re

from blackbox_vqa.errors import InputError

__all__ = ["parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*$")


def parse_size(text: str | None, option: str) -> tuple[int, int] | None:
    """``"8"`` -> ``(8, 8)``; ``"8x4"`` or ``"8,4"`` -> ``(8, 4)`` (height, width); None stays."""
    if text is None:
        return None
    match = _SIZE_RE.match(text)
    if not match:
        raise InputError(f"{option} must be N or HxW with positive integers, got {text!r}")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 1 or width < 1:
        raise InputError(f"{option} must be positive, got {text!r}")
    return height, width

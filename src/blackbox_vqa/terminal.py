"""Text from outside (answers, questions, file names, endpoint messages) made safe to print.

A model's answer or an endpoint's error message may hold terminal control sequences
(ANSI CSI such as ``ESC [ 2 J``, OSC such as ``ESC ] 0 ; title BEL``) that would clear or
retitle the user's terminal or fake output. :func:`terminal_safe` shows every control
character escaped instead (``\\x1b``, ``\\x07``, ``\\u009b``), so nothing from outside can
drive the terminal, and what was sent stays visible. Tabs and newlines are escaped too:
one value prints as one line.
"""

from __future__ import annotations

import re

__all__ = ["terminal_safe"]

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    char = match.group(0)
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    """``text`` with every C0/C1 control character (and Unicode line separators and
    bidirectional overrides) replaced by its visible escape, e.g. ``"\\x1b[2J"``."""
    return _CONTROL_RE.sub(_escaped, text)

"""Rate-limit headers: how long a server asks its clients to hold back.

Hosted chat APIs (OpenAI and the many servers that copy its headers) announce their
buckets on every answer: ``x-ratelimit-remaining-requests`` / ``x-ratelimit-reset-requests``
and the same for ``-tokens``. A reset is a duration such as ``1s``, ``6m0s``, ``20ms`` or
``1h2m3.5s``, or a plain number of seconds. ``Retry-After`` is read by
:func:`blackbox_vqa.adapters.http.transport.parse_retry_after`; these headers say the same
when it is missing, and also say it *before* a request is refused (remaining 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

__all__ = ["BUCKETS", "parse_duration", "rate_limit_wait"]

BUCKETS = ("requests", "tokens")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in ``"1.5"``, ``"20ms"``, ``"6m0s"``, ``"1h2m3.5s"``; None if unreadable."""
    if text is None:
        return None
    value = text.strip().lower()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parts = _PART_RE.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _remaining(headers: Mapping[str, str], bucket: str) -> float | None:
    text = headers.get(f"x-ratelimit-remaining-{bucket}")
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def rate_limit_wait(headers: Mapping[str, str], *, refused: bool) -> float | None:
    """Seconds until the exhausted rate-limit buckets refill, or None when none is.

    A bucket is exhausted when its ``x-ratelimit-remaining-*`` is 0; on a refused request
    (``refused``: a 429 answer) a bucket whose remaining count is not given counts as
    exhausted too. The wait is the longest ``x-ratelimit-reset-*`` of those buckets.
    ``headers`` must look names up case-insensitively (``httpx.Headers`` does).
    """
    waits = []
    for bucket in BUCKETS:
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{bucket}"))
        if reset is None:
            continue
        remaining = _remaining(headers, bucket)
        if remaining == 0 or (refused and remaining is None):
            waits.append(reset)
    return max(waits) if waits else None

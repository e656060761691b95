"""Output files that are never half-written: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from blackbox_vqa.errors import InputError

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "new_output_dir",
    "prepare_output_dir",
    "slugify",
]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (NaN refused: it is not JSON)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def slugify(text: str, *, max_length: int = 48) -> str:
    """A file-name-safe lower-case slug of ``text`` (``"explanation"`` if nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length].strip("-")
    return slug or "explanation"


def new_output_dir(base: str | os.PathLike[str], name: str) -> Path:
    """A path ``base/name``, or ``base/name-2``, ``-3``... that does not exist yet."""
    root = Path(base)
    candidate = root / name
    n = 2
    while candidate.exists():
        candidate = root / f"{name}-{n}"
        n += 1
    return candidate


def prepare_output_dir(path: str | os.PathLike[str], *, force: bool, marker: str) -> Path:
    """Create ``path``; refuse a folder that already holds ``marker`` unless ``force``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    if (out / marker).exists() and not force:
        raise InputError(f"{out} already holds {marker}; choose another --out or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    return out

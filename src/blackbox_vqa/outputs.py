"""Output files that are never half-written: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from blackbox_vqa.errors import InputError

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "new_output_dir",
    "prepare_output_dir",
    "slugify",
    "staged_output_dir",
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


def check_output_dir(path: str | os.PathLike[str], *, force: bool, marker: str) -> Path:
    """Refuse, before any work, an output folder that cannot be used: a file in its place,
    one holding ``marker`` (unless ``force``), or a parent that cannot be written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    if (out / marker).exists() and not force:
        raise InputError(f"{out} already holds {marker}; choose another --out or pass --force")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create output folder {out}: {parent} is not writable")
    return out


@contextmanager
def staged_output_dir(
    path: str | os.PathLike[str], *, force: bool, marker: str
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to write every output into; on success it
    becomes ``path`` (renamed whole when ``path`` does not exist, else its files are moved
    in one by one, ``marker`` last); on any error or interrupt it is removed and ``path``
    is left as it was. A folder left half-written cannot happen, so a rerun is never
    refused because of one."""
    out = check_output_dir(path, force=force, marker=marker)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise InputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    try:
        yield stage
        os.chmod(stage, 0o777 & ~_umask())
        if not out.exists():
            os.rename(stage, out)
            return
        names = sorted(p.name for p in stage.iterdir() if p.name != marker)
        for name in [*names, marker]:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
    except OSError as exc:
        raise InputError(f"cannot write output folder {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)

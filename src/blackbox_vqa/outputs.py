"""Output files that are never half-written: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from blackbox_vqa.errors import InputError

__all__ = [
    "StagedOutputDir",
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


class StagedOutputDir:
    """An output folder that appears whole or not at all.

    Made at the start of a command, before any computation, so a refused or unwritable
    ``target`` fails at once (:class:`InputError`): ``target`` must be a folder or absent,
    and must not hold ``marker`` unless ``force``. Files go into :attr:`path`, a hidden
    staging folder ``.NAME.XXXX.tmp`` beside ``target``. Leaving the ``with`` block normally
    calls :meth:`commit`: the staging folder is renamed to ``target`` when ``target`` does
    not exist (atomic), else its entries are moved in one by one with ``marker`` last, so an
    interrupted commit leaves no marker and the next run is not refused. Leaving by an
    exception (Ctrl-C included) calls :meth:`discard`: the staging folder is removed and
    ``target`` is left as it was. Only a process killed outright (SIGKILL) leaves the hidden
    staging folder behind.
    """

    def __init__(self, target: str | os.PathLike[str], *, force: bool, marker: str) -> None:
        self.target = Path(target)
        self.marker = marker
        if self.target.exists() and not self.target.is_dir():
            raise InputError(f"output path {self.target} exists and is not a folder")
        if (self.target / marker).exists() and not force:
            raise InputError(f"{self.target} already holds {marker}; choose another --out "
                             "or pass --force")
        parent = self.target.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp",
                                              dir=parent))
            os.chmod(self.path, 0o777 & ~_umask())
        except OSError as exc:
            raise InputError(f"cannot create output folder {self.target}: "
                             f"{exc.strerror or exc}") from exc

    def commit(self) -> Path:
        """Move the staged files into ``target``; return ``target``."""
        if not self.path.exists():
            raise InputError(f"staged output for {self.target} was already committed or "
                             "discarded")
        try:
            os.rename(self.path, self.target)  # atomic when target is absent or empty
            return self.target
        except OSError:
            pass
        self.target.mkdir(parents=True, exist_ok=True)
        entries = sorted(self.path.iterdir(), key=lambda e: e.name == self.marker)
        for entry in entries:
            destination = self.target / entry.name
            if entry.is_dir() and destination.is_dir():
                shutil.rmtree(destination)
            os.replace(entry, destination)
        self.path.rmdir()
        return self.target

    def discard(self) -> None:
        """Remove the staging folder and everything in it; ``target`` is left as it was."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedOutputDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


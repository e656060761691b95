"""Size-bounded, type-checked reads of files a user or a model folder supplies.

Every such file (model files, run settings and item files, ``hf:`` configs, processor and
tokenizer files) is read through :func:`read_bounded`: only a regular file is opened (a
FIFO would block forever, ``/dev/zero`` never ends), and never more than ``limit`` bytes
are read, so a hostile file costs at most ``limit`` bytes of memory.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from blackbox_vqa.errors import InputError

__all__ = [
    "CONFIG_LIMIT",
    "MODEL_FILE_LIMIT",
    "check_regular",
    "read_bounded",
    "read_json_bounded",
    "read_text_bounded",
]

MODEL_FILE_LIMIT = 1 << 20  # a --model @FILE model file: 1 MiB
CONFIG_LIMIT = 4 << 20  # a JSON config, settings or processor file: 4 MiB
_MAX_NESTING = 64  # deepest JSON/TOML nesting accepted


def check_regular(path: Path, what: str) -> os.stat_result:
    """``path``'s stat when it is a regular file; else :class:`InputError` naming ``what``.

    The type is checked without opening the file (opening a FIFO blocks)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    return info


def read_bounded(path: str | os.PathLike[str], *, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises :class:`InputError` (one line naming ``what`` and the path) for a missing file,
    a directory, device, FIFO or socket, or a file over ``limit`` bytes (checked on the
    size and again while reading, in case the file grows)."""
    file = Path(path)
    info = check_regular(file, what)
    if info.st_size > limit:
        raise InputError(f"{what} {file} is {info.st_size} bytes; the most accepted is "
                         f"{limit} bytes")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # never blocks on a FIFO
    try:
        fd = os.open(file, flags)
    except OSError as exc:
        raise InputError(f"cannot read {what} {file}: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between stat and open
            raise InputError(f"{what} {file} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {file}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(f"{what} {file} is over {limit} bytes; the most accepted is "
                         f"{limit} bytes")
    return data


def read_text_bounded(path: str | os.PathLike[str], *, limit: int, what: str) -> str:
    """:func:`read_bounded` decoded as UTF-8 (:class:`InputError` if it is not)."""
    data = read_bounded(path, limit=limit, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text: {exc}") from exc


def read_json_bounded(path: str | os.PathLike[str], *, limit: int = CONFIG_LIMIT,
                      what: str) -> Any:
    """A JSON file read with :func:`read_text_bounded`; nesting deeper than 64 levels is
    refused (:class:`InputError`) rather than recursed into."""
    text = read_text_bounded(path, limit=limit, what=what)
    check_nesting(text, f"{what} {path}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from exc


def check_nesting(text: str, what: str, *, limit: int = _MAX_NESTING) -> None:
    """Refuse JSON/TOML ``text`` whose brackets nest deeper than ``limit`` (a cheap scan
    that over-counts brackets inside strings, which only makes it stricter)."""
    depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            if depth > limit:
                raise InputError(f"{what} nests deeper than {limit} levels")
        elif char in "]}":
            depth -= 1

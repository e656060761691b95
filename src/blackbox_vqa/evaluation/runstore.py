"""The run store: one file per finished item under ``RUNDIR/items/``, written atomically.

Layout::

    RUNDIR/settings.json        the settings the run was started with (schema blackbox_vqa.run/1)
    RUNDIR/items/KEY.npz        one finished item: ``item_key`` (KEY again), ``meta`` (a
                                JSON string) and its maps
    RUNDIR/.lock                held (flock) while a process works on the run

Each item file is written to a temporary name, flushed to disk and renamed, so a process
killed at any moment (even with SIGKILL) leaves finished items whole and at most a stray
temporary file (removed on the next open); the items in flight are simply done again.
Opening a folder that holds a run started with other settings is refused.

An item file names its item inside (``item_key``; files of earlier versions: ``meta["key"]``),
and that name must match the file's. A file whose content belongs to another item (copied
or renamed over it) is not trusted: :meth:`RunStore.done_keys` leaves it out, so the item is
computed again and the file replaced, and says so in :attr:`RunStore.rejected`;
:meth:`RunStore.read` refuses it. (Recomputing is friendlier than stopping the run: the
item's true result is one computation away.)
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError
from blackbox_vqa.outputs import atomic_write, atomic_write_json

__all__ = ["ITEMS_DIR", "SCHEMA", "SETTINGS_FILE", "ItemRecord", "RunStore"]

SCHEMA = "blackbox_vqa.run/1"
SETTINGS_FILE = "settings.json"
ITEMS_DIR = "items"
LOCK_FILE = ".lock"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_META = "meta"
_KEY = "item_key"


@dataclass(frozen=True)
class ItemRecord:
    """One finished item: ``meta`` (JSON-ready) and named ``float64`` arrays (its maps)."""

    key: str
    meta: Mapping[str, Any]
    arrays: Mapping[str, NDArray[np.float64]] = field(default_factory=dict)


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise InputError(f"item key {key!r} is not usable as a file name")
    return key


def _differences(old: Mapping[str, Any], new: Mapping[str, Any],
                 prefix: str = "") -> list[str]:
    """``name: old there, new now`` for each setting that differs; nested tables are
    compared key by key (``model_identity.options.prompt: ...``)."""
    found: list[str] = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            found.extend(_differences(before, after, f"{prefix}{name}."))
        else:
            found.append(f"{prefix}{name}: {before!r} there, {after!r} now")
    return found


def _meta_key(meta: object) -> str | None:
    key = meta.get("key") if isinstance(meta, dict) else None
    return key if isinstance(key, str) else None


ITEM_FILE_LIMIT = 256 << 20  # an item file, and its arrays unpacked: 256 MiB each


def _check_item_file(path: Path) -> None:
    """Refuse an item file that is not a regular file, is over :data:`ITEM_FILE_LIMIT`
    bytes, or would unpack to more (a zip bomb), before anything is decompressed."""
    from blackbox_vqa.bounded_files import check_regular

    info = check_regular(path, "item file")
    if info.st_size > ITEM_FILE_LIMIT:
        raise InputError(f"item file {path} is {info.st_size} bytes; the most accepted is "
                         f"{ITEM_FILE_LIMIT}; delete it and rerun to redo the item")
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(entry.file_size for entry in archive.infolist())
    if unpacked > ITEM_FILE_LIMIT:
        raise InputError(f"item file {path} would unpack to {unpacked} bytes; the most "
                         f"accepted is {ITEM_FILE_LIMIT}; delete it and rerun to redo the item")


def _stored_key(path: Path) -> str | None:
    """The item key written inside an item file (None when it names none)."""
    _check_item_file(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        entry = f"{_KEY}.npy" if f"{_KEY}.npy" in names else f"{_META}.npy"
        if entry not in names:
            return None
        with archive.open(entry) as member:
            value = str(np.lib.format.read_array(member, allow_pickle=False)[()])
    return value if entry == f"{_KEY}.npy" else _meta_key(json.loads(value))


def _belongs(stored: str | None) -> str:
    if stored is None:
        return "does not say which item it holds"
    return f"holds item {stored!r} (copied over?)"


class RunStore:
    """The store of one run folder; use :meth:`open` (a context manager holding the lock)."""

    def __init__(self, root: Path, settings: Mapping[str, Any], lock: IO[bytes]) -> None:
        self.root = root
        self.settings = dict(settings)
        self.items_dir = root / ITEMS_DIR
        self._lock = lock
        self.rejected: list[str] = []
        """One message per item file :meth:`done_keys` did not trust (it holds another
        item, or names none); the items are computed again."""

    @classmethod
    def open(cls, rundir: str | os.PathLike[str], settings: Mapping[str, Any]) -> RunStore:
        """Open (creating it if needed) the run in ``rundir`` for ``settings``.

        Raises :class:`InputError` when the folder holds a run with other settings, is not
        a run folder, or is in use by another process.
        """
        root = Path(rundir)
        wanted = json.loads(json.dumps({"schema": SCHEMA, **settings}))
        if root.exists() and not root.is_dir():
            raise InputError(f"--out {root} exists and is not a folder")
        try:
            (root / ITEMS_DIR).mkdir(parents=True, exist_ok=True)
            lock = (root / LOCK_FILE).open("ab")
        except OSError as exc:
            raise InputError(f"cannot create run folder {root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.close()
            raise InputError(f"run folder {root} is in use by another process") from exc
        try:
            cls._check_settings(root, wanted)
        except BaseException:
            lock.close()
            raise
        store = cls(root, wanted, lock)
        store._remove_temporaries()
        return store

    @staticmethod
    def _check_settings(root: Path, wanted: Mapping[str, Any]) -> None:
        path = root / SETTINGS_FILE
        if not path.exists():
            if any(p.suffix == ".npz" for p in (root / ITEMS_DIR).iterdir()):
                raise InputError(f"{root} holds item files but no {SETTINGS_FILE}; "
                                 "it is not a run folder this version can continue")
            atomic_write_json(path, wanted)
            return
        from blackbox_vqa.bounded_files import read_json_bounded

        stored = read_json_bounded(path, what="run settings")
        if not isinstance(stored, dict):
            raise InputError(f"{path} is not a run's settings")
        differences = _differences(stored, wanted)
        if differences:
            raise InputError(
                f"{root} holds a run with other settings ({'; '.join(differences)}); "
                "rerun with the same settings to continue it, or choose another --out"
            )

    def _remove_temporaries(self) -> None:
        for path in self.items_dir.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the folder's lock."""
        self._lock.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def path(self, key: str) -> Path:
        """The file of item ``key``."""
        return self.items_dir / f"{_check_key(key)}.npz"

    def done_keys(self) -> set[str]:
        """Keys of the items already stored.

        A file holding another item than its name says, or naming none, is left out (the
        item is done again, which replaces the file) and noted in :attr:`rejected`. A file
        too damaged to tell stays in: :meth:`read` reports it by name.
        """
        done: set[str] = set()
        self.rejected = []
        for path in sorted(self.items_dir.iterdir()):
            if path.suffix != ".npz" or path.name.startswith("."):
                continue
            key = path.name[:-4]
            try:
                stored = _stored_key(path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                done.add(key)
                continue
            if stored == key:
                done.add(key)
            else:
                self.rejected.append(f"item file {path} {_belongs(stored)}; item {key!r} "
                                     "will be computed again")
        return done

    def write(self, record: ItemRecord) -> Path:
        """Store ``record`` atomically (replacing an earlier one with the same key)."""
        payload: dict[str, NDArray[Any]] = {
            _KEY: np.asarray(_check_key(record.key)),
            _META: np.asarray(json.dumps(record.meta, allow_nan=False)),
        }
        for name, array in record.arrays.items():
            if name in (_META, _KEY):
                raise InputError(f"array name {name!r} is reserved")
            payload[name] = np.asarray(array, dtype=np.float64)
        buffer = io.BytesIO()
        np.savez(buffer, **payload)  # type: ignore[arg-type]
        data = buffer.getvalue()
        return atomic_write(self.path(record.key), lambda f: f.write(data))

    def read(self, key: str) -> ItemRecord:
        """The stored record of ``key``; raises :class:`InputError` for a missing or damaged
        file, or one that holds another item."""
        path = self.path(key)
        if not path.exists():
            raise InputError(f"item {key!r} is not stored in {self.root}")
        try:
            _check_item_file(path)
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive[_META][()]))
                stored = str(archive[_KEY][()]) if _KEY in archive.files else _meta_key(meta)
                arrays = {name: np.asarray(archive[name], dtype=np.float64)
                          for name in archive.files if name not in (_META, _KEY)}
        except FileNotFoundError as exc:
            raise InputError(f"item {key!r} is not stored in {self.root}") from exc
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(
                f"item file {path} is damaged ({exc}); delete it and rerun to redo the item"
            ) from exc
        if stored != key:
            raise InputError(f"item file {path} {_belongs(stored)}; delete it and rerun to "
                             "redo the item")
        if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
            raise InputError(f"item file {path} is damaged (its meta is not a JSON object); "
                             "delete it and rerun to redo the item")
        return ItemRecord(key, meta, arrays)

    def records(self, keys: list[str]) -> Iterator[ItemRecord]:
        """The stored records of ``keys``, in that order."""
        for key in keys:
            yield self.read(key)

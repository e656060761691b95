"""Completed requests kept on disk, so that a rerun after a failure sends nothing twice.

An entry is the body of a successful answer, stored under the SHA-256 of the request's
path and body: the body holds everything that determines the answer (model, prompt, image
bytes, parameters) and never a header, so an API key never reaches the key or the folder.
Writes are atomic (a temporary file renamed), so an interrupted run leaves whole entries.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from blackbox_vqa.errors import InputError

__all__ = ["RequestCache"]


class RequestCache:
    """A folder of answers keyed by request (created with the first entry, so a run that
    completes no request leaves nothing). ``reused`` and ``stored`` count this run's hits
    and new entries."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"request cache (--request-cache) {str(self.folder)!r} is not "
                             "a folder")
        self.reused = 0
        self.stored = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(path: str, body: bytes) -> str:
        """The entry name of a request (hex SHA-256 of path and body)."""
        digest = hashlib.sha256(path.encode("utf-8"))
        digest.update(b"\n")
        digest.update(body)
        return digest.hexdigest()

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> bytes | None:
        """The stored answer, or None."""
        try:
            content = self._file(key).read_bytes()
        except OSError:
            return None
        with self._lock:
            self.reused += 1
        return content

    def put(self, key: str, content: bytes) -> None:
        """Store an answer (atomically; a failure to write only costs the reuse)."""
        target = self._file(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, target)
        except OSError:
            return
        with self._lock:
            self.stored += 1

"""Worker processes that end with their parent.

A worker of a process pool whose parent is killed (SIGKILL, an out-of-memory kill, a closed
terminal) would otherwise go on with its item -- minutes, hundreds of megabytes -- with no
one to take the result. :func:`die_with_parent` is a pool ``initializer``::

    ProcessPoolExecutor(..., initializer=die_with_parent, initargs=(os.getpid(),))

On Linux the kernel sends the worker SIGTERM the moment its parent dies
(``prctl(PR_SET_PDEATHSIG)``); everywhere, a daemon thread also checks twice a second that
the parent is still the same process. (Linux ties the signal to the parent *thread* that
started the worker: create the pool from a thread that outlives it, such as the main one.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

__all__ = ["die_with_parent", "set_torch_threads"]

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.5


def die_with_parent(parent_pid: int) -> None:
    """End this process (SIGTERM) when process ``parent_pid``, its parent, ends."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the thread below still watches
    if os.getppid() != parent_pid:  # the parent died before this process got here
        os.kill(os.getpid(), signal.SIGTERM)
    watcher = threading.Thread(target=_watch, args=(parent_pid,), daemon=True,
                               name="bbvqa-parent-watch")
    watcher.start()


def _watch(parent_pid: int) -> None:
    stop = threading.Event()
    while not stop.wait(_POLL_SECONDS):
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def set_torch_threads(threads: int | None) -> int | None:
    """Set torch's CPU threads when torch is loaded; return the previous count (or None)."""
    if threads is None or "torch" not in sys.modules:
        return None
    import torch

    previous = int(torch.get_num_threads())
    torch.set_num_threads(threads)
    return previous

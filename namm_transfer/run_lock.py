"""One process per run folder: an advisory ``fcntl.flock`` on ``<folder>/.lock``.

Two processes appending to the same predictions or log file would interleave their lines and mix two runs.
A program therefore holds :class:`RunLock` on its output folder while it writes there; a second process is
refused at once, before it loads a model (:func:`check_not_locked` probes without creating anything). The
lock is released by the kernel when the holder exits, also after ``kill -9``, so a stale lock file is
harmless and stays in place.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderBusy(ValueError):
    """The run folder is in use by another process."""


def _busy(folder: Path, handle) -> RunFolderBusy:
    handle.seek(0)
    holder = handle.read().strip() or "unknown"
    return RunFolderBusy(
        f"{folder} is in use by another process (pid {holder}); wait for it to finish or choose another folder"
    )


def check_not_locked(folder: str | Path) -> None:
    """Raise RunFolderBusy if another process holds the lock of ``folder``; creates nothing."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return
    with open(path, "r", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(Path(folder), handle) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


class RunLock:
    """Context manager holding the exclusive lock of ``folder`` (created if needed) for this process.

    Raises RunFolderBusy on entry when another process holds it. The holder's pid is written into the lock
    file for the message another process gets.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._handle = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / LOCK_NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _busy(self.folder, handle)
            handle.close()
            raise error from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

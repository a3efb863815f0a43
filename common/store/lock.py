"""One live writer per store: an advisory lock beside the store (`.NAME.lock`, flock).

Private helper of `cogfun.common.store`. Precompute's first process holds the lock from before the
store is created until it exits, so a second precompute into the same store is refused instead
of racing it (two creators would delete each other's half-built store), and a reader can tell a
store that is being written right now from one whose writer was interrupted. The kernel drops
the lock when the holder dies, `kill -9` included, so a stale lock never blocks a rerun. flock
needs a local filesystem (on NFS it may not exclude other machines).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from cogfun.common.store.schema import (
    StoreError,
)


def lock_path(store: Path) -> Path:
    return store.parent / f".{store.name}.lock"


class StoreLock:
    """Held while a precompute writes `store`; `release()` (or process exit) lets it go."""

    def __init__(self, store: str | Path, wait_s: float = 2.0):
        self.store = Path(store)
        path = lock_path(self.store)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s  # a reader's brief shared probe must not refuse us
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(self._fd)
                self._fd = None
                raise StoreError(
                    f"{self.store} is being written by another precompute right now "
                    f"({holder or 'unknown process'}): wait for it to finish, or write to "
                    "another --out"
                ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def live_writer(store: str | Path) -> str | None:
    """Who holds `store`'s writer lock now ("pid N on HOST"), or None when no live process does."""
    path = lock_path(Path(store))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a live process"
    finally:
        os.close(fd)  # also drops the probe's shared lock at once
    return None

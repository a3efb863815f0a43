"""A local cache folder for reads of a finished store on an object store (`cogfun train --cache-dir`).

Private helper of `cogfun.common.store`. `Location.cached(folder, namespace, max_bytes)` gives a
Location whose reads (whole files and byte ranges) are kept as files under
`folder/<namespace>/`, so a second epoch reads local disk instead of the network. The namespace is
made by the reader from the store's URL, fingerprint and `finalized_at`: every precompute run that
changes a store finalizes it anew, so a cache never serves bytes of an older version of a shard
(and every sample is still checked against its checksum). Writes, listings and existence checks go
to the object store itself.

Each entry is written through a temporary name and a rename, so processes and threads sharing the
folder never read half an entry; an entry of the wrong size (a crash before the rename reached the
disk) is a miss. `max_bytes` bounds the whole folder, every store version's and every process's
entries: each process measures the folder when it opens a store and again after every tenth of
`max_bytes` it added, and then removes the least recently used entries (by modification time; a
hit touches its entry, at most once a minute per process) down to 80% of it (N processes may
overshoot by N tenths in between).

An entry is named by a digest of its object's key and the byte range, so `evict(keys)` can remove
every entry of some objects: the store reader does that when a sample read through the cache
fails its checksum (a cache disk that flipped bits), then reads the sample again from the object
store (`StoreReader.read_rows`). Caption embeddings and done indexes are not healed that way: a
damaged entry of those stays reported as damage until the folder is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from typing import Any

PRUNE_TO = 0.8
# A hit touches its entry (its mtime is the LRU order) at most once a minute per process: a
# syscall less on nearly every hit, and the order is still right to within a minute.
TOUCH_EVERY_S = 60.0
TOUCHED_KEPT = 100_000  # entries remembered as touched; forgotten all at once past it


class CachedFS:
    """An object-store backend (`objects.ObjectFS`) whose reads go through a local folder."""

    local = False

    def __init__(self, inner: Any, folder: str, namespace: str, max_bytes: int | None):
        self.inner = inner
        self.root = inner.root
        self.options = inner.options
        self.base = os.path.abspath(folder)
        self.folder = os.path.join(self.base, namespace)
        os.makedirs(self.folder, exist_ok=True)  # an OSError here: the caller reads uncached
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._since_scan = 0  # bytes this process added since it last measured the folder
        self.hits = 0
        self.misses = 0
        self._touched: dict[str, float] = {}  # entry -> when this process last touched it
        if max_bytes is not None:
            self._prune()  # other processes and older store versions may have filled it

    def __getattr__(self, name: str) -> Any:  # every other operation: the object store itself
        return getattr(self.inner, name)

    def _entry(self, key: str, tag: str) -> str:
        return os.path.join(self.folder, f"{key_digest(key)}.{tag}")

    def evict(self, keys: list[str]) -> int:
        """Remove every entry (any byte range) of the objects `keys` from this store version's
        folder; returns how many were removed."""
        digests = {key_digest(k) for k in keys}
        removed = 0
        for e in _scan(self.folder):
            if e.name.partition(".")[0] in digests:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    removed += 1
        return removed

    def _get(self, path: str, expected: int | None) -> bytes | None:
        """An entry's bytes; None (a miss) when there is none or it has not the expected size
        (a crash can leave an empty file behind a rename that was not yet on disk)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if not data or (expected is not None and len(data) != expected):
            return None
        now = time.monotonic()
        if now - self._touched.get(path, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: pruned last
            if len(self._touched) >= TOUCHED_KEPT:
                self._touched.clear()
            self._touched[path] = now
        self.hits += 1
        return data

    def _put(self, path: str, data: bytes) -> None:
        self.misses += 1
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # unique across hosts sharing the folder
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a full or read-only cache disk never fails a read
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        with self._lock:
            self._since_scan += len(data)
            due = self.max_bytes is not None and self._since_scan >= max(1, self.max_bytes // 10)
        if due:
            self._prune()

    def _prune(self) -> None:
        """Measure the whole cache folder (every store version's entries, every process's) and
        remove the least recently used entries down to PRUNE_TO of `max_bytes` when over it."""
        with self._lock:
            self._since_scan = 0
            entries = []
            for space in _scan(self.base):
                for e in _scan(space.path):
                    with contextlib.suppress(OSError):
                        st = e.stat()
                        entries.append((st.st_mtime_ns, st.st_size, e.path))
            total = sum(size for _, size, _ in entries)
            if total <= self.max_bytes:
                return
            entries.sort()
            target = int(self.max_bytes * PRUNE_TO)
            for _, size, path in entries:
                if total <= target:
                    break
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    total -= size

    def read(self, key: str, start: int, length: int | None) -> bytes | None:
        path = self._entry(key, f"{start}-{length}")
        data = self._get(path, length if length is not None else (-start if start < 0 else None))
        if data is None:
            data = self.inner.read(key, start, length)
            if data is not None:
                self._put(path, data)
        return data

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        paths = [self._entry(key, f"{s}-{n}") for s, n in ranges]
        found = [self._get(p, n) for p, (_, n) in zip(paths, ranges, strict=True)]
        missing = [i for i, d in enumerate(found) if d is None]
        if missing:
            fetched = self.inner.read_ranges(key, [ranges[i] for i in missing])
            if fetched is None:
                return None
            for i, data in zip(missing, fetched, strict=True):
                found[i] = data
                self._put(paths[i], data)
        return found  # type: ignore[return-value]


def key_digest(key: str) -> str:
    """The part of an entry's file name that names its object (`<digest>.<start>-<length>`)."""
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _scan(folder: str) -> list[os.DirEntry]:
    """The entries of a folder (none when it went or cannot be read: pruning is best effort)."""
    try:
        return [e for e in os.scandir(folder) if not e.name.endswith(".partial")]
    except OSError:
        return []

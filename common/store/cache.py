"""A local cache folder for reads of a finished store on an object store (`cogfun train --cache-dir`).

Private helper of `cogfun.common.store`. `Location.cached(folder, namespace, max_bytes)` gives a
Location whose reads (whole files and byte ranges) are kept as files under
`folder/<namespace>/`, so a second epoch reads local disk instead of the network. The namespace is
made by the reader from the store's URL, fingerprint and `finalized_at`: every precompute run that
changes a store finalizes it anew, so a cache never serves bytes of an older version of a shard
(and every sample is still checked against its checksum). Writes, listings and existence checks go
to the object store itself.

Each entry is written through a temporary name and a rename, so processes and threads sharing the
folder never read half an entry. When the folder's entries pass `max_bytes`, the least recently
used ones (by modification time; a hit touches its entry) are removed down to 80% of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from typing import Any

PRUNE_TO = 0.8


class CachedFS:
    """An object-store backend (`objects.ObjectFS`) whose reads go through a local folder."""

    local = False

    def __init__(self, inner: Any, folder: str, namespace: str, max_bytes: int | None):
        self.inner = inner
        self.root = inner.root
        self.options = inner.options
        self.folder = os.path.join(os.path.abspath(folder), namespace)
        os.makedirs(self.folder, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bytes = sum(e.stat().st_size for e in os.scandir(self.folder) if e.is_file())
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:  # every other operation: the object store itself
        return getattr(self.inner, name)

    def _entry(self, key: str, tag: str) -> str:
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return os.path.join(self.folder, f"{digest}.{tag}")

    def _get(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruned last
        self.hits += 1
        return data

    def _put(self, path: str, data: bytes) -> None:
        self.misses += 1
        tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a full or read-only cache disk never fails a read
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        with self._lock:
            self._bytes += len(data)
            over = self.max_bytes is not None and self._bytes > self.max_bytes
        if over:
            self._prune()

    def _prune(self) -> None:
        with self._lock:
            entries = []
            for e in os.scandir(self.folder):
                with contextlib.suppress(OSError):
                    st = e.stat()
                    entries.append((st.st_mtime_ns, st.st_size, e.path))
            entries.sort()
            total = sum(size for _, size, _ in entries)
            target = int(self.max_bytes * PRUNE_TO)
            for _, size, path in entries:
                if total <= target:
                    break
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    total -= size
            self._bytes = total

    def read(self, key: str, start: int, length: int | None) -> bytes | None:
        path = self._entry(key, f"{start}-{length}")
        data = self._get(path)
        if data is None:
            data = self.inner.read(key, start, length)
            if data is not None:
                self._put(path, data)
        return data

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        paths = [self._entry(key, f"{s}-{n}") for s, n in ranges]
        found = [self._get(p) for p in paths]
        missing = [i for i, d in enumerate(found) if d is None]
        if missing:
            fetched = self.inner.read_ranges(key, [ranges[i] for i in missing])
            if fetched is None:
                return None
            for i, data in zip(missing, fetched, strict=True):
                found[i] = data
                self._put(paths[i], data)
        return found  # type: ignore[return-value]

"""Direct access to the chunk files of the store's one-chunk-per-sample arrays.

Private helper of `cogfun.common.store`. zarr spends about 1 ms of Python and event-loop work per
chunk it reads or writes, several times the cost of the file operation itself, and the store keeps
one chunk file per sample per array. For the simple arrays the store creates (one chunk per row,
flat `c.<row>.0...` keys, little-endian bytes, optionally Blosc) this module reads and writes those
files itself, byte for byte what zarr reads and writes (tests/test_store_shards.py compares both):

- a missing chunk file reads as the fill value (0), as in zarr;
- a row equal to the fill value is not written and its old file is removed (zarr's
  `write_empty_chunks=False`), so a rewritten sample leaves the same files as a zarr write;
- each file is written whole (`Location.write`: a temporary name and a rename locally, as zarr's
  LocalStore does; one PUT on an object store), so a `kill -9` leaves the old file or the new
  one, never a torn one.

Every chunk and shard byte the store reads or writes goes through `read_chunk_bytes`,
`read_chunk_ranges` and `put` (each taking the file's `Location`): the tests and
`cogfun.testing.faults` replace them to count reads or inject faults.

`chunk_files` returns None for any array whose metadata is not that simple layout; callers then go
through zarr, so the store stays readable whatever another zarr writer made of it.

Reads tell the disk from the data: an I/O error (OSError other than a missing file) is retried
`READ_ATTEMPTS` times with a doubling pause and then raised as `StoreReadError`, never reported as a
damaged sample; bytes that cannot be decoded (or decode to the wrong size) are damage. An object
store's request has been retried by its backend already (`objects.py`), so its
`ObjectStoreIOError` becomes a `StoreReadError` at once.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from cogfun.common.store.location import Location, location
from cogfun.common.store.objects import ObjectStoreIOError
from cogfun.common.store.schema import (
    StoreReadError,
)
from numcodecs import Blosc

log = logging.getLogger(__name__)
T = TypeVar("T")

WRITE_THREADS = 8  # compression and file syscalls release the GIL, so threads overlap them
REMOTE_THREADS = 16  # requests in flight at once to an object store (each waits on the network)
# A failing read is tried this many times in all, pausing READ_BACKOFF_S, then twice that, ... in
# between (0.1 + 0.2 + 0.4 + 0.8 = 1.5 s): long enough for a network filesystem's brief hiccup,
# short enough that a dead disk is reported within seconds.
READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.1
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
_DTYPES = {"uint8", "uint16", "uint64", "int64"}


class ChunkFiles:
    """The chunk files of one array whose chunks are whole rows, read only: with `chunk_rows` 1
    (every per-sample array of a schema-1 store) `row(i)` lives in one file; larger chunks (the
    plan arrays) are read a chunk at a time (`read_chunk`)."""

    def __init__(
        self,
        folder: Location,
        shape: tuple[int, ...],
        dtype: str,
        blosc: Blosc | None,
        chunk_rows: int = 1,
    ):
        self.folder = folder
        self.row_shape = tuple(shape[1:])
        self.rows = shape[0]
        self.chunk_rows = chunk_rows
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.blosc = blosc
        self._suffix = ".0" * len(self.row_shape)
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def path(self, row: int) -> Location:
        """The file of chunk `row` (the row itself when chunk_rows is 1)."""
        return self.folder / f"c.{int(row)}{self._suffix}"

    # ---- reads ----

    def read(self, row: int) -> np.ndarray:
        """One row (row_shape); a missing file is the fill value. Undecodable bytes raise."""
        return self._load(row, (), self.row_shape)

    def read_chunk(self, index: int) -> np.ndarray:
        """Chunk `index`, rows index * chunk_rows onwards, as (chunk_rows, *row_shape): zarr
        stores a chunk whole, also the last one past the array's end."""
        return self._load(index, (self.chunk_rows,), (self.chunk_rows, *self.row_shape))

    def _load(self, index: int, lead: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        nbytes = self._row_bytes * (lead[0] if lead else 1)
        path = self.path(index)
        data = retry_reads(lambda: read_chunk_bytes(path), str(path))
        if data is None:
            return np.zeros(shape, dtype=self.dtype)
        if self.blosc is not None:
            data = self.blosc.decode(data)
        if len(data) != nbytes:
            raise ValueError(
                f"{self.path(index)}: {len(data)} bytes after decoding, expected {nbytes}"
            )
        return np.frombuffer(data, dtype=self.dtype).reshape(shape)

    def read_many(self, rows: Iterable[int]) -> np.ndarray:
        """Rows stacked (B, *row_shape), native byte order."""
        rows = list(rows)
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype.newbyteorder("="))
        for i, r in enumerate(rows):
            out[i] = self.read(r)
        return out

    def read_flags(self) -> np.ndarray:
        """Every row of a (N,) array; a file that is missing or cannot be decoded counts as 0."""
        out = np.zeros(self.rows, dtype=self.dtype.newbyteorder("="))
        for name in self.folder.listdir():
            index = name[2:].split(".", 1)[0] if name.startswith("c.") else ""
            # Only chunk keys: temporary files of interrupted writes are skipped.
            if (
                index.isdigit()
                and int(index) < self.rows
                and name == f"c.{int(index)}{self._suffix}"
            ):
                row = int(index)
                try:
                    out[row] = self.read(row)[()]
                except (ValueError, RuntimeError):  # undecodable: not done (I/O errors raise)
                    out[row] = 0
        return out


def read_chunk_bytes(path: Location, start: int = 0, length: int | None = None) -> bytes | None:
    """A chunk file's bytes (`length` bytes from `start`, a negative start counting from the
    end; the whole file by default); None when the file does not exist (zarr's fill value). With
    `read_chunk_ranges`, the one way every store read of chunk or shard bytes goes."""
    return path.read(start, length)


def read_chunk_ranges(path: Location, ranges: list[tuple[int, int]]) -> list[bytes] | None:
    """Several (start, length) byte ranges of one shard file in one call (an object store fetches
    them together); None when the file does not exist."""
    return path.read_ranges(ranges)


def retry_reads(read: Callable[[], T], path: str) -> T:
    """`read()`, tried again after an OSError (a missing file is an answer, not an error) up to
    READ_ATTEMPTS times in all; then `StoreReadError` naming `path`. An object store's failure
    (`ObjectStoreIOError`, already retried by its backend) is raised as `StoreReadError` at once;
    a failed request of obstore itself (zarr's reads of an object store, which do not go through
    `Location`) is retried like an OSError."""
    pause = READ_BACKOFF_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except FileNotFoundError:
            raise
        except ObjectStoreIOError as err:
            raise StoreReadError(path, err, err.attempts) from err
        except Exception as exc:
            err = _os_error(exc)
            if err is None:
                raise
            if attempt == READ_ATTEMPTS:
                raise StoreReadError(path, err, attempt) from exc
            log.warning(
                "%s: %s; reading again in %.2f s (attempt %d of %d)",
                path,
                err.strerror or err,
                pause,
                attempt + 1,
                READ_ATTEMPTS,
            )
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


def _os_error(exc: Exception) -> OSError | None:
    """`exc` as the OSError to retry: itself, or for a failed request of obstore an EIO naming
    its first line; None for anything else (not an I/O error). A missing object raises
    FileNotFoundError."""
    if isinstance(exc, OSError):
        return exc
    if not type(exc).__module__.startswith("obstore"):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if type(exc).__name__ == "NotFoundError":
        raise FileNotFoundError(errno.ENOENT, first) from exc
    return OSError(errno.EIO, first)


def put(path: Location, data: bytes | Iterable[bytes] | None) -> None:
    """Write `data` (bytes, or pieces written one after another: a shard is streamed, never held
    whole) to `path`, whole (`Location.write`: a temporary file and a rename, or one PUT); None
    removes the file. The one function every store write of chunk or shard bytes goes through."""
    path.write(data)


def keep(cache: dict, key: int, value: object, limit: int) -> None:
    """Put `value` in a cache dict of at most `limit` entries, the oldest dropped first. Reader
    threads share these caches: their pops may race, which only drops another entry."""
    while len(cache) >= limit:
        try:
            cache.pop(next(iter(cache)), None)
        except (StopIteration, RuntimeError):
            break
    cache[key] = value


def stage_all(items: Iterable[tuple[Any, int, np.ndarray | None]]) -> None:
    """`files.stage(row, value)` for every item, many at a time (compression and file writes
    release the GIL); returns once all are on disk, raising the first error."""
    items = list(items)
    if items and not items[0][0].folder.local:  # requests: many in flight at once
        threads = max(1, min(REMOTE_THREADS, len(items)))
    else:
        threads = max(1, min(WRITE_THREADS, len(items) // 16))  # a thread per 16 files at least
    if threads == 1:
        _stage_each(items)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(_stage_each, items[i::threads]) for i in range(threads)]:
            future.result()


def _stage_each(items: list[tuple[Any, int, np.ndarray | None]]) -> None:
    for files, row, value in items:
        files.stage(row, value)


def chunk_files(
    meta: dict, folder: str | Path | Location, multi_row: bool = False
) -> ChunkFiles | None:
    """ChunkFiles for an array's parsed `zarr.json` (its folder `folder`), or None when it is not
    the simple layout (one row per chunk; several with `multi_row`, for `read_chunk` only)."""
    try:
        shape = tuple(int(v) for v in meta["shape"])
        chunks = tuple(int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"])
        key = meta["chunk_key_encoding"]
        codecs = meta["codecs"]
        dtype = meta["data_type"]
    except (KeyError, TypeError, ValueError):
        return None
    simple = (
        meta.get("chunk_grid", {}).get("name") == "regular"
        and key.get("name") == "default"
        and key.get("configuration", {}).get("separator") == "."
        and dtype in _DTYPES
        and meta.get("fill_value") == 0
        and not meta.get("storage_transformers")
        and len(shape) >= 1
        and len(chunks) == len(shape)
        and chunks[1:] == shape[1:]
        and (chunks[0] == 1 or (multi_row and chunks[0] >= 1))
    )
    if not simple:
        return None
    blosc = blosc_of(codecs, dtype)
    if blosc is False:
        return None
    return ChunkFiles(location(folder), shape, dtype, blosc, chunk_rows=chunks[0])


def blosc_of(codecs: list, dtype: str) -> Blosc | None | bool:
    """The Blosc codec of a chunk codec list `[bytes (little endian), blosc?]` (None when
    uncompressed), or False when the list is anything else (then zarr reads the array)."""
    if not codecs or codecs[0].get("name") != "bytes":
        return False
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    if endian != "little" or len(codecs) > 2:
        return False
    if len(codecs) == 1:
        return None
    if codecs[1].get("name") != "blosc":
        return False
    c = codecs[1].get("configuration", {})
    try:
        return Blosc(
            cname=c["cname"],
            clevel=int(c["clevel"]),
            shuffle=_SHUFFLE[c["shuffle"]],
            blocksize=int(c.get("blocksize", 0)),
            typesize=int(c.get("typesize", np.dtype(dtype).itemsize)),
        )
    except (KeyError, TypeError, ValueError):
        return False

"""Sharded per-sample arrays: many samples to a file, each file written once, whole, by its owner.

Private helper of `cogfun.common.store`. A sharded array (schema 2) is a plain Zarr v3 array with
the `sharding_indexed` codec: shard files `c.<s>.0...` of `shard_rows` rows each, inside them one
inner chunk per row (or, for the mask variants, one per row and variant, so a reader can fetch one
variant alone), encoded as the store's other chunks (little-endian bytes, Blosc), followed by the
shard index ((rows x parts) x 2 little-endian uint64 offset/length pairs, 2**64-1 for an empty
chunk) and its crc32c. Plain zarr reads every byte; `ShardFiles` reads the index and then only the
byte ranges a sample needs, through `chunks.read_chunk_bytes` like every store read (writes: `chunks.put`).

Writing a part of a shard in place would need a read-modify-write of the whole file, which loses
data when two processes share a shard and cannot be done on object storage. So samples are first
*staged*: each sample's inner chunks are written as small files under the array's `.staged/`
folder (written before its staged checksum, the done flag, as ever). When every sample of a shard
is staged or given up, the process that owns the shard *seals* it: it streams the staged chunks
(and the still-valid chunks of the shard's previous version, on a rerun) into one new shard file
per array, checksum array last, each written whole (a rename locally, one PUT on an object store),
then deletes the staged files. A `kill -9` at any point leaves each sample either staged, sealed,
or not done; a rerun seals again.

On an object store (a folder `Location` that is not local) every file access is a request, so
the requests of one call go out together (`fetch.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c
import numpy as np
from cogfun.common.store import chunks, fetch
from cogfun.common.store.chunks import blosc_of, retry_reads
from cogfun.common.store.location import Location, location
from numcodecs import Blosc

EMPTY = np.uint64(2**64 - 1)  # an empty inner chunk's offset and length in the shard index
STAGED_DIR = ".staged"
_INDEX_CACHE = 4096  # shard indexes kept per array (each (rows x parts) x 16 bytes)


class ShardFiles:
    """Direct access to one sharded array the store made: rows of `row_shape`, `shard_rows` rows a
    shard file, `parts` inner chunks a row (split along axis 1 when parts > 1)."""

    def __init__(
        self,
        folder: Location,
        shape: tuple[int, ...],
        dtype: str,
        blosc: Blosc | None,
        shard_rows: int,
        parts: int,
    ):
        self.folder = folder
        self.rows = int(shape[0])
        self.row_shape = tuple(int(v) for v in shape[1:])
        self.shard_rows = int(shard_rows)
        self.parts = int(parts)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.blosc = blosc
        self.part_shape = (1, *self.row_shape[1:]) if parts > 1 else self.row_shape
        self._part_bytes = int(np.prod(self.part_shape, dtype=np.int64)) * self.dtype.itemsize
        self._suffix = ".0" * len(self.row_shape)
        self._chunks = self.shard_rows * self.parts  # inner chunks per shard
        self._index_bytes = 16 * self._chunks + 4  # the index and its crc32c
        self._indexes: dict[int, np.ndarray | None] = {}
        # Small shards' chunk bytes, whole, on object stores (`fetch.small_body`).
        self._bodies: dict[int, bytes] = {}
        self.shards = -(-self.rows // self.shard_rows)
        self._staged_view: frozenset[int] = frozenset()

    def use_staged(self, rows: Iterable[int]) -> None:
        """Read `rows` from their staged files: an unfinished store as `inspect` sees it."""
        self._staged_view = frozenset(int(r) for r in rows)

    # ---- names ----

    def path(self, shard: int) -> Location:
        return self.folder / f"c.{int(shard)}{self._suffix}"

    def staged_path(self, row: int, part: int) -> Location:
        return self.folder / STAGED_DIR / f"{int(row)}.{int(part)}"

    def shard_of(self, row: int) -> int:
        return int(row) // self.shard_rows

    # ---- reads ----

    def index(self, shard: int, row: int | None = None) -> np.ndarray | None:
        """The shard's (chunks, 2) offset/length table; None when the shard file does not exist
        (every row reads as the fill value). A table whose crc32c fails raises ValueError. An I/O
        error names the shard file and the `row` being read for."""
        if shard in self._indexes:
            return self._indexes[shard]
        path = self.path(shard)
        where = str(path) if row is None else f"{path}[{row}]"
        tail = retry_reads(lambda: chunks.read_chunk_bytes(path, -self._index_bytes), where)
        table = None if tail is None else self._table(tail)
        if tail is not None and table is None:
            raise ValueError(f"{path}: the shard index is truncated or damaged (crc32c)")
        chunks.keep(self._indexes, shard, table, _INDEX_CACHE)
        return table

    def _table(self, tail: bytes) -> np.ndarray | None:
        """The (chunks, 2) table of a shard file's last `_index_bytes` bytes, or None when they
        are too few or fail their crc32c."""
        body, crc = tail[:-4], tail[-4:]
        if len(tail) != self._index_bytes or google_crc32c.value(body).to_bytes(4, "little") != crc:
            return None
        return np.frombuffer(body, dtype="<u8").reshape(self._chunks, 2)

    @staticmethod
    def span(table: np.ndarray, index: int) -> tuple[int, int] | None:
        """(offset, length) of inner chunk `index` in a shard's table; None when it is empty."""
        offset, length = table[index]
        if offset == EMPTY and length == EMPTY:
            return None
        return int(offset), int(length)

    def forget(self, shard: int | None = None) -> None:
        """Drop cached shard indexes (after a shard was sealed again)."""
        if shard is None:
            self._indexes.clear()
            self._bodies.clear()
        else:
            self._indexes.pop(int(shard), None)
            self._bodies.pop(int(shard), None)

    def raw(self, row: int, part: int) -> bytes | None:
        """The encoded bytes of one inner chunk as the shard holds them; None when empty."""
        shard, local = divmod(int(row), self.shard_rows)
        table = self.index(shard, row)
        if table is None:
            return None
        offset, length = table[local * self.parts + part]
        if offset == EMPTY and length == EMPTY:
            return None
        path = self.path(shard)
        where = f"{path}[{row}]"
        data = retry_reads(lambda: chunks.read_chunk_bytes(path, int(offset), int(length)), where)
        if data is None or len(data) != int(length):
            raise ValueError(f"{path}: chunk {local}.{part} lies past the end of the shard")
        return data

    def decode(self, data: bytes | None, where: str) -> np.ndarray:
        if data is None:
            return np.zeros(self.part_shape, dtype=self.dtype)
        if self.blosc is not None:
            data = self.blosc.decode(data)
        if len(data) != self._part_bytes:
            raise ValueError(
                f"{where}: {len(data)} bytes after decoding, expected {self._part_bytes}"
            )
        return np.frombuffer(data, dtype=self.dtype).reshape(self.part_shape)

    def read_part(self, row: int, part: int) -> np.ndarray:
        """One inner chunk of a row: part_shape (a mask variant (1, ...), or the whole row)."""
        if row in self._staged_view:
            return self.decode(self.staged(row, part), self.staged_path(row, part))
        return self.decode(self.raw(row, part), f"{self.path(self.shard_of(row))}[{row}.{part}]")

    def read(self, row: int) -> np.ndarray:
        """One row (row_shape); empty inner chunks are the fill value. Undecodable bytes raise."""
        if self.parts == 1:
            return self.read_part(row, 0)
        return np.concatenate([self.read_part(row, p) for p in range(self.parts)])

    def read_many(self, rows: Iterable[int], parts: Iterable[int] | None = None) -> np.ndarray:
        """Rows stacked (B, *row_shape), native byte order; with `parts` (one per row) only that
        inner chunk of each row: (B, *part_shape)."""
        rows = list(rows)
        native = self.dtype.newbyteorder("=")
        if not self.folder.local:
            return fetch.read_many(self, rows, None if parts is None else list(parts))
        if parts is None:
            out = np.empty((len(rows), *self.row_shape), dtype=native)
            for i, r in enumerate(rows):
                out[i] = self.read(r)
            return out
        out = np.empty((len(rows), *self.part_shape), dtype=native)
        for i, (r, p) in enumerate(zip(rows, parts, strict=True)):
            out[i] = self.read_part(r, p)
        return out

    def shard_values(self, shard: int) -> np.ndarray:
        """The first value of each row of one shard (a checksum array's done flags),
        (shard_rows,), from one read of the file; a shard or chunk that is missing or cannot be
        decoded counts as 0 (I/O errors raise)."""
        out = np.zeros(self.shard_rows, dtype=self.dtype.newbyteorder("="))
        path = self.path(shard)
        data = retry_reads(lambda: chunks.read_chunk_bytes(path), str(path))
        table = None if data is None else self._table(data[-self._index_bytes :])
        if table is None:
            return out
        for local in np.flatnonzero(table[:, 0] != EMPTY).tolist():
            offset, length = (int(v) for v in table[local])
            try:
                out[local] = self.decode(data[offset : offset + length], str(path)).reshape(-1)[0]
            except (ValueError, RuntimeError):
                out[local] = 0
        return out

    def read_flags(self) -> np.ndarray:
        """The first value of every row from the sealed shards (see `shard_values`), (N,)."""
        if not self.rows:
            return np.zeros(0, dtype=self.dtype.newbyteorder("="))
        reads = [lambda s=s: self.shard_values(s) for s in range(self.shards)]
        values = [read() for read in reads] if self.folder.local else fetch.in_parallel(reads)
        return np.concatenate(values)[: self.rows]

    # ---- staging ----

    def encode(self, row: np.ndarray) -> list[bytes | None]:
        """Each inner chunk's bytes for one row (None for an all-fill chunk: no file, as zarr)."""
        row = np.asarray(row, dtype=self.dtype, order="C")
        if row.shape != self.row_shape:
            raise ValueError(f"{self.folder}: row shape {row.shape}, expected {self.row_shape}")
        pieces = [row[p : p + 1] for p in range(self.parts)] if self.parts > 1 else [row]
        out: list[bytes | None] = []
        for piece in pieces:
            if not piece.any():
                out.append(None)
                continue
            raw = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
            out.append(bytes(self.blosc.encode(raw)) if self.blosc is not None else raw.tobytes())
        return out

    def stage(self, row: int, value: np.ndarray | None) -> None:
        """Write one row's staged chunk files (None removes them)."""
        (self.folder / STAGED_DIR).mkdir()
        pieces = [None] * self.parts if value is None else self.encode(value)
        for part, data in enumerate(pieces):
            chunks.put(self.staged_path(row, part), data)

    def staged(self, row: int, part: int) -> bytes | None:
        path = self.staged_path(row, part)
        return retry_reads(lambda: chunks.read_chunk_bytes(path), f"{path}[{row}]")

    def staged_rows(self) -> np.ndarray:
        """Rows with any staged chunk file, sorted (temporary files of interrupted writes are
        skipped)."""
        names = (self.folder / STAGED_DIR).listdir()
        rows = set()
        for name in names:
            row, _, part = name.partition(".")
            if row.isdigit() and part.isdigit():
                rows.add(int(row))
        return np.asarray(sorted(rows), dtype=np.int64)

    def read_staged(self, row: int) -> np.ndarray:
        """One staged row (row_shape); missing staged chunks are the fill value."""
        where = self.staged_path(row, 0)
        pieces = [self.decode(self.staged(row, p), where) for p in range(self.parts)]
        return pieces[0] if self.parts == 1 else np.concatenate(pieces)

    def unstage(self, rows: Iterable[int]) -> None:
        """Remove the staged files of `rows` (those there are: on an object store, one listing
        and bulk deletes)."""
        staged = self.folder / STAGED_DIR
        names = [f"{int(r)}.{p}" for r in rows for p in range(self.parts)]
        if not self.folder.local:  # only those there: some stores stop a bulk delete at a miss
            present = set(staged.listdir())
            names = [n for n in names if n in present]
        staged.delete_many(names)

    # ---- sealing ----

    def seal(self, shard: int, staged: set[int], kept: set[int]) -> None:
        """Write shard `shard` anew: rows in `staged` from their staged files, rows in `kept` from
        the shard's present file, every other row empty. Streamed through `put` (written whole: a
        temporary file and a rename, or one PUT); a shard with nothing in it is removed."""
        lo = shard * self.shard_rows
        if self.folder.local:
            sources: list[bytes | None] = []  # (row, part) in index order
            for local in range(self.shard_rows):
                row = lo + local
                for part in range(self.parts):
                    if row in staged:
                        sources.append(self.staged(row, part))
                    elif row in kept:
                        sources.append(self.raw(row, part))
                    else:
                        sources.append(None)
        else:
            sources = fetch.seal_sources(self, shard, staged, kept)
        if all(s is None for s in sources):
            chunks.put(self.path(shard), None)
        else:
            chunks.put(self.path(shard), _shard_pieces(sources))
        self.forget(shard)


def _shard_pieces(sources: list[bytes | None]) -> Iterator[bytes]:
    """The shard file: the inner chunks one after another, then the index and its crc32c."""
    table = np.full((len(sources), 2), EMPTY, dtype="<u8")
    offset = 0
    for i, data in enumerate(sources):
        if data is None:
            continue
        table[i] = (offset, len(data))
        offset += len(data)
        yield data
    body = table.tobytes()
    yield body + google_crc32c.value(body).to_bytes(4, "little")


def shard_files(meta: dict, folder: str | Path | Location) -> ShardFiles | None:
    """ShardFiles for a sharded array's parsed `zarr.json` (its folder `folder`) in the layout the
    store writes, or None (then zarr reads it)."""
    try:
        shape = tuple(int(v) for v in meta["shape"])
        grid = tuple(int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"])
        key = meta["chunk_key_encoding"]
        (codec,) = meta["codecs"]
        dtype = meta["data_type"]
    except (KeyError, TypeError, ValueError):
        return None
    if codec.get("name") != "sharding_indexed" or meta.get("fill_value") != 0:
        return None
    config = codec.get("configuration", {})
    try:
        inner = tuple(int(v) for v in config["chunk_shape"])
    except (KeyError, TypeError, ValueError):
        return None
    index_codecs = [c.get("name") for c in config.get("index_codecs", [])]
    simple = (
        key.get("name") == "default"
        and key.get("configuration", {}).get("separator") == "."
        and config.get("index_location", "end") == "end"
        and index_codecs == ["bytes", "crc32c"]
        and len(grid) == len(shape) == len(inner)
        and grid[1:] == shape[1:]
        and inner[0] == 1
        and grid[0] % inner[0] == 0
        and (
            inner[1:] == shape[1:] or (len(shape) > 1 and inner[1] == 1 and inner[2:] == shape[2:])
        )
    )
    if not simple:
        return None
    parsed = blosc_of(config.get("codecs", []), dtype)
    if parsed is False:
        return None
    parts = 1 if inner[1:] == shape[1:] else shape[1]
    return ShardFiles(location(folder), shape, dtype, parsed, grid[0], parts)

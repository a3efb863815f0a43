"""Requests to an object store sent together: reading many samples' chunks, and a seal's sources.

Private helper of `cogfun.common.store` (`shards.ShardFiles` calls it when its folder is not
local). On an object store every file access is a request that spends its time waiting, so:

- `read_many` groups the (row, part) chunks asked for by shard; per shard it reads the shard's
  index (once: `ShardFiles` caches it) and then every chunk it needs in one
  `chunks.read_chunk_ranges` call (the client merges near ranges); shards go in parallel threads.
- `seal_sources` fetches a shard's staged chunks in parallel and the chunks it keeps from the
  shard's present file in one ranges call.

Both keep the errors of the one-chunk-at-a-time reads: a missing shard is the fill value, bytes
past the end or that do not decode raise ValueError (damage), an I/O error `StoreReadError` naming
the shard and a row it was read for.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from cogfun.common.store import chunks
from cogfun.common.store.chunks import retry_reads

if TYPE_CHECKING:
    from cogfun.common.store.shards import ShardFiles

T = TypeVar("T")
THREADS = 8  # requests in flight at once for one call (shards read, staged chunks fetched)
# The shards of the arrays of a few bytes a row (the done flags / checksums, the all-masked flags:
# a few KB for 512 samples) are fetched whole once and kept, so a batch costs one request fewer
# per such array.
SMALL_ARRAYS = ("checksum", "all_masked")
SMALL_SHARD = 256 << 10
SMALL_SHARDS_KEPT = 256  # per array: at most 64 MiB


def in_parallel(calls: list[Callable[[], T]]) -> list[T]:
    """Each call's result, in order, from a few threads; the first error raises once every call
    has ended (a pool per call: it never outlives a fork into a loader worker)."""
    if len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=min(THREADS, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def read_many(files: ShardFiles, rows: list[int], parts: list[int] | None) -> np.ndarray:
    """`ShardFiles.read_many` on an object store: rows stacked (B, *row_shape), or with `parts`
    (one per row) only that inner chunk of each (B, *part_shape); native byte order."""
    whole = parts is None
    shape = files.row_shape if whole else files.part_shape
    out = np.zeros((len(rows), *shape), dtype=files.dtype.newbyteorder("="))
    wanted: dict[int, list[tuple[int, int, int]]] = {}  # shard -> [(i, row, part)]
    for i, r in enumerate(rows):
        if r in files._staged_view:  # an unfinished store's staged rows: file by file
            out[i] = files.read(r) if whole else files.read_part(r, parts[i])
            continue
        for p in range(files.parts) if whole else (parts[i],):
            wanted.setdefault(files.shard_of(r), []).append((i, int(r), int(p)))
    reads = [lambda s=s, w=w: _shard_chunks(files, s, w) for s, w in wanted.items()]
    for found in in_parallel(reads):
        for i, p, value in found:
            if whole and files.parts > 1:
                out[i, p : p + 1] = value
            else:
                out[i] = value
    return out


def _shard_chunks(
    files: ShardFiles, shard: int, items: list[tuple[int, int, int]]
) -> list[tuple[int, int, np.ndarray]]:
    """(i, part, decoded chunk) for each (i, row, part) of one shard, from one ranges request."""
    table = files.index(shard, items[0][1])
    if table is None:  # no shard file: every row is the fill value
        return [(i, p, files.decode(None, "")) for i, _, p in items]
    lo = shard * files.shard_rows
    spans = [files.span(table, (r - lo) * files.parts + p) for _, r, p in items]
    ranges = sorted({s for s in spans if s is not None})
    path = files.path(shard)
    data: dict[tuple[int, int], bytes] = {}
    body = small_body(files, shard, table, items[0][1]) if ranges else None
    if body is not None:
        data = {(o, n): body[o : o + n] for o, n in ranges}
    elif ranges:
        first = next(r for (_, r, _), s in zip(items, spans, strict=True) if s is not None)
        got = retry_reads(lambda: chunks.read_chunk_ranges(path, ranges), f"{path}[{first}]")
        data = dict(zip(ranges, got or [], strict=False))  # None: the shard went meanwhile
    found = []
    for (i, r, p), span in zip(items, spans, strict=True):
        raw = None if span is None else data.get(span)
        if span is not None and (raw is None or len(raw) != span[1]):
            raise ValueError(f"{path}: chunk {r - lo}.{p} lies past the end of the shard")
        found.append((i, p, files.decode(raw, f"{path}[{r}.{p}]")))
    return found


def small_body(files: ShardFiles, shard: int, table: np.ndarray, row: int) -> bytes | None:
    """The chunk bytes (everything before the index) of a shard of one of the SMALL_ARRAYS,
    fetched whole once and then kept with its index; None for other arrays, or a shard larger
    than SMALL_SHARD."""
    if shard in files._bodies:
        return files._bodies[shard]
    if files.folder.name not in SMALL_ARRAYS:
        return None
    used = table[table[:, 0] != np.uint64(2**64 - 1)]
    end = int((used[:, 0] + used[:, 1]).max()) if len(used) else 0
    if not 0 < end <= SMALL_SHARD:
        return None
    path = files.path(shard)
    body = retry_reads(lambda: chunks.read_chunk_bytes(path, 0, end), f"{path}[{row}]")
    if body is None or len(body) != end:
        return None  # gone or shorter: the ranged reads say which
    chunks.keep(files._bodies, shard, body, SMALL_SHARDS_KEPT)
    return body


def seal_sources(
    files: ShardFiles, shard: int, staged: set[int], kept: set[int]
) -> list[bytes | None]:
    """The inner chunks of shard `shard` anew, (row, part) in index order: rows in `staged` from
    their staged files, rows in `kept` from the shard's present file, None for the others."""
    lo = shard * files.shard_rows
    keys = [(lo + local, part) for local in range(files.shard_rows) for part in range(files.parts)]
    sources: list[bytes | None] = [None] * len(keys)
    fetch = [j for j, (row, _) in enumerate(keys) if row in staged]
    reads = [lambda r=keys[j][0], p=keys[j][1]: files.staged(r, p) for j in fetch]
    for j, data in zip(fetch, in_parallel(reads), strict=True):
        sources[j] = data
    table = files.index(shard) if any(row in kept for row, _ in keys) else None
    if table is not None:
        held = [j for j, (row, _) in enumerate(keys) if row in kept and files.span(table, j)]
        ranges = [files.span(table, j) for j in held]
        path = files.path(shard)
        got = retry_reads(lambda: chunks.read_chunk_ranges(path, ranges), str(path))
        if got is None or any(len(g) != n for g, (_, n) in zip(got, ranges, strict=True)):
            raise ValueError(f"{path}: chunks of the shard lie past its end")
        for j, data in zip(held, got, strict=True):
            sources[j] = data
    return sources

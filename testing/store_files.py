"""The store's files as the tests see them: where a sample's bytes lie inside a shard, damage to
exactly one sample or one shard, and a schema-1 copy of a store.

Everything here reads the on-disk format documented in the README ("The store"): a sharded
array's `zarr.json` and the shard index at the end of each shard file ((chunks x 2) little-endian
uint64 offset/length pairs, 2**64-1 for an empty chunk, then their crc32c). It does not use the
store's own reader, so a test that damages a file with it checks the reader against the format.
A store on an object store is named by its `Location` (its files are then `Location`s too, read
and written whole); a local one by its path (its files are `Path`s).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

EMPTY = 2**64 - 1


def _file(store: Any, relative: str) -> Any:
    """A file of the store: a Path for a local store, a `Location` on an object store."""
    if hasattr(store, "local") and not store.local:
        return store / relative
    return Path(store) / relative


def _read(file: Any) -> bytes:
    return file.read_bytes() if isinstance(file, Path) else file.read()


def _write(file: Any, data: bytes) -> None:
    if isinstance(file, Path):
        file.write_bytes(data)
    else:
        file.write(data)


def _meta(store: Path, node: str) -> dict:
    return json.loads(_read(_file(store, f"{node}/zarr.json")))


def _sharding(meta: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shard shape, inner chunk shape) of a sharded array's metadata."""
    shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed", f"not a sharded array: {codec['name']}"
    return shard, tuple(codec["configuration"]["chunk_shape"])


def _parts(meta: dict, inner: tuple[int, ...]) -> int:
    """Inner chunks a row is split into: K for the per-variant arrays, else 1."""
    return meta["shape"][1] if len(inner) > 1 and inner[1] == 1 and meta["shape"][1] > 1 else 1


def array_node(bucket: str, array: str) -> str:
    """The node path of a per-sample array (`bucket` "captions" for the caption arrays)."""
    return f"captions/{array}" if bucket == "captions" else f"buckets/{bucket}/{array}"


def shard_file(store: Path, bucket: str, array: str, row: int) -> Path:
    """The shard file holding `row` of a per-sample array."""
    meta = _meta(store, array_node(bucket, array))
    shard, _ = _sharding(meta)
    coords = [row // shard[0]] + [0] * (len(shard) - 1)
    return _file(store, f"{array_node(bucket, array)}/c." + ".".join(map(str, coords)))


def _index(store: Path, bucket: str, array: str, row: int) -> tuple[Path, np.ndarray, int]:
    meta = _meta(store, array_node(bucket, array))
    shard, inner = _sharding(meta)
    chunks = int(np.prod([s // i for s, i in zip(shard, inner, strict=True)]))
    path = shard_file(store, bucket, array, row)
    raw = _read(path)
    table = np.frombuffer(raw[-(16 * chunks + 4) : -4], dtype="<u8").reshape(chunks, 2).copy()
    return path, table, chunks


def chunk_range(
    store: Path, bucket: str, array: str, row: int, part: int = 0
) -> tuple[Path, int, int]:
    """(shard file, offset, length) of one inner chunk: `row`'s (mask variant `part`'s)."""
    meta = _meta(store, array_node(bucket, array))
    shard, inner = _sharding(meta)
    parts = _parts(meta, inner)
    path, table, _ = _index(store, bucket, array, row)
    offset, length = table[(row % shard[0]) * parts + part]
    assert offset != EMPTY, f"{path}: row {row} part {part} is empty"
    return path, int(offset), int(length)


def flip_byte(store: Path, bucket: str, array: str, row: int, part: int = 0) -> Path:
    """Flip one bit in the middle of one inner chunk's bytes (the shard index stays valid)."""
    path, offset, length = chunk_range(store, bucket, array, row, part)
    raw = bytearray(_read(path))
    raw[offset + length // 2] ^= 0x40
    _write(path, bytes(raw))
    return path


def drop_chunk(store: Path, bucket: str, array: str, row: int, part: int = 0) -> Path:
    """Mark one inner chunk empty in its shard's index (crc32c rewritten): what deleting a
    schema-1 chunk file was. The reader sees the fill value (zeros)."""
    meta = _meta(store, array_node(bucket, array))
    shard, inner = _sharding(meta)
    parts = _parts(meta, inner)
    path, table, chunks = _index(store, bucket, array, row)
    table[(row % shard[0]) * parts + part] = (EMPTY, EMPTY)
    raw = _read(path)
    body = table.astype("<u8").tobytes()
    _write(path, raw[: -(16 * chunks + 4)] + body + google_crc32c.value(body).to_bytes(4, "little"))
    return path


def schema1_copy(src: Path, dst: Path) -> Path:
    """A copy of a finished store in the schema-1 layout (one chunk file per sample, no shards),
    as cogfun before sharding wrote it: every array re-chunked through plain zarr, the root's
    `schema_version` set to 1 and its shard sizes dropped."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    for meta_path in sorted(dst.rglob("zarr.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("node_type") != "array" or meta["codecs"][0]["name"] != "sharding_indexed":
            continue
        folder = meta_path.parent
        data = zarr.open_array(str(src / folder.relative_to(dst)), mode="r")[...]
        shutil.rmtree(folder)
        if folder.name == "checksum" and data.ndim == 2:  # recomputed below, schema 1's way
            data = np.zeros(data.shape[0], dtype=np.uint64)
        inner = meta["codecs"][0]["configuration"]
        compressors = [c for c in inner["codecs"] if c["name"] == "blosc"]
        shape = tuple(data.shape)
        out = zarr.create_array(
            str(folder),
            shape=shape,
            chunks=(1, *shape[1:]),
            dtype=meta["data_type"],
            fill_value=0,
            compressors=[zarr.codecs.BloscCodec(**c["configuration"]) for c in compressors] or None,
            chunk_key_encoding={"name": "default", "separator": "."},
        )
        out[...] = data
    for group in sorted(p for p in (dst / "buckets").iterdir() if p.is_dir()):
        _schema1_checksums(src / "buckets" / group.name, group)
    root = dst / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["schema_version"] = 1
    for key in ("shard_samples", "caption_shard"):
        meta["attributes"].pop(key, None)
    root.write_text(json.dumps(meta))
    return dst


def shard_rows(store: Path, bucket: str, array: str, row: int) -> tuple[list[int], list[int]]:
    """(every row of the shard holding `row`, within the array; the rows with any chunk stored
    in that shard, as its index says)."""
    meta = _meta(store, array_node(bucket, array))
    shard, inner = _sharding(meta)
    parts = _parts(meta, inner)
    _, table, _ = _index(store, bucket, array, row)
    lo = row - row % shard[0]
    rows = list(range(lo, min(lo + shard[0], meta["shape"][0])))
    stored = table[:, 0].reshape(shard[0], parts) != EMPTY
    return rows, [r for r in rows if stored[r - lo].any()]


def _schema1_checksums(src: Path, dst: Path) -> None:
    """Schema 1 kept one checksum a sample (`schema.sample_checksum`) where schema 2 keeps the
    sample's and one per variant: rewrite `checksum` the old way for every done sample."""
    from cogfun.common.store.sums import (
        sample_checksum,
    )

    group = zarr.open_group(str(src), mode="r")
    done = np.asarray(group["checksum"][:])[:, 0] != 0
    names = [n for n in ("latents", "masks", "masked_latents", "all_masked") if n in group]
    data = {n: np.asarray(group[n][:]) for n in names}
    captions, hashes = np.asarray(group["caption"][:]), np.asarray(group["provenance_hash"][:])
    sums = np.zeros(len(done), dtype=np.uint64)
    for slot in np.flatnonzero(done).tolist():
        one = {n: a[slot] for n, a in data.items()}
        sums[slot] = sample_checksum(src.name, slot, one, int(captions[slot]), int(hashes[slot]))
    zarr.open_array(str(dst / "checksum"), mode="r+")[:] = sums

"""Low-level zarr access for the store: metadata checks, array creation/opening, bf16 bit views,
row reads (`take_rows`: chunk files directly, or zarr under the same I/O retries).

Private helper of `cogfun.common.store`. Every zarr call that can fail on a damaged store is wrapped
here so that the error names the file (its local path or its URL) and the reason. Every function
takes the store's files as `Location`s: zarr is given `Location.zarr_store()`, the store's own
reads go through `Location`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from cogfun.common.store.chunks import ChunkFiles, chunk_files, retry_reads
from cogfun.common.store.location import Location, location
from cogfun.common.store.objects import ObjectStoreIOError
from cogfun.common.store.schema import (
    READABLE_SCHEMAS,
    SCHEMA_VERSION,
    STORE_FORMAT,
    StoreError,
    StoreReadError,
    brief,
    fingerprint,
)
from cogfun.common.store.shards import ShardFiles, shard_files
from cogfun.common.store.specs import (
    ArraySpec,
)
from zarr.codecs import BloscCodec

# Flat chunk keys (`c.17.0.0.0.0`): one file per chunk, no directory per chunk index.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
# On an object store, the marker a creator writes first and deletes last (create.py): a store
# prefix holding it is being created, or its creator was killed; it is no store yet.
CREATING = ".creating"


def node_json(path: Location) -> dict:
    """The parsed `zarr.json` of a group or array folder, or a StoreError naming the file."""
    meta = path / "zarr.json"
    try:
        text = meta.read_text()
        if text is None:
            raise StoreError(f"{meta} is missing: not a cogfun store, or the store is damaged")
        data = json.loads(text)
    except ObjectStoreIOError as exc:  # the object store failed (after its retries), not the file
        raise StoreReadError(str(meta), exc, exc.attempts) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{meta} is unreadable or was edited: {brief(exc)}") from exc
    if not isinstance(data, dict) or data.get("zarr_format") != 3 or "node_type" not in data:
        raise StoreError(f"{meta} is not Zarr v3 metadata (edited or damaged)")
    return data


def node_attributes(path: Location, node_type: str) -> dict:
    data = node_json(path)
    if data["node_type"] != node_type:
        raise StoreError(
            f"{path / 'zarr.json'}: expected a {node_type}, found a {data['node_type']}"
        )
    attrs = data.get("attributes", {})
    if not isinstance(attrs, dict):
        raise StoreError(f"{path / 'zarr.json'}: attributes are not an object (edited or damaged)")
    return attrs


def open_root(path: Location, mode: str) -> zarr.Group:
    try:
        store = path.zarr_store(read_only=mode == "r")
        return zarr.open_group(store, mode=mode, use_consolidated=False)
    except Exception as exc:  # zarr raises several types for one cause: a bad root
        raise StoreError(f"{path}: cannot open the store's root group: {brief(exc)}") from exc


def open_group(root: zarr.Group, name: str, group_dir: Location) -> zarr.Group:
    """A child group of the root, its metadata checked first so errors name the file."""
    node_attributes(group_dir, "group")
    try:
        group = root[name]
    except Exception as exc:
        raise StoreError(f"{group_dir / 'zarr.json'}: cannot open group: {brief(exc)}") from exc
    if not isinstance(group, zarr.Group):
        raise StoreError(f"{group_dir / 'zarr.json'}: expected a group")
    return group


def create_array(group: zarr.Group, spec: ArraySpec, compression: dict) -> zarr.Array:
    if spec.dtype == "str":
        return group.create_array(spec.name, shape=spec.shape, chunks=spec.chunks, dtype=str)
    compressors = [BloscCodec(**compression)] if spec.compressed else None
    return group.create_array(
        spec.name,
        shape=spec.shape,
        chunks=spec.chunks,
        dtype=spec.dtype,
        fill_value=0,
        compressors=compressors,
        chunk_key_encoding=CHUNK_KEY_ENCODING,
        shards=spec.shards,
    )


def open_array(group: zarr.Group, group_dir: Location, spec: ArraySpec) -> zarr.Array:
    """Open one array and check its shape and dtype against the schema."""
    where = group_dir / spec.name / "zarr.json"
    node_json(group_dir / spec.name)
    try:
        arr = group[spec.name]
    except Exception as exc:
        raise StoreError(f"{where}: cannot open array: {brief(exc)}") from exc
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{where}: expected an array")
    dtype_ok = arr.dtype.kind in "TUO" if spec.dtype == "str" else arr.dtype == np.dtype(spec.dtype)
    if tuple(arr.shape) != spec.shape or not dtype_ok:
        raise StoreError(
            f"{where}: shape {tuple(arr.shape)} dtype {arr.dtype} does not match the schema "
            f"({spec.shape}, {spec.dtype}); the metadata was edited or the store is damaged"
        )
    return arr


def open_chunk_files(
    group_dir: Location, spec: ArraySpec, multi_row: bool = False
) -> ChunkFiles | ShardFiles | None:
    """Direct access to a per-sample array's files: one chunk file per row (schema 1, or with
    `multi_row` any array chunked by whole rows, for `read_chunk`), or shard files (schema 2);
    None for any other layout (then zarr reads it)."""
    meta = node_json(group_dir / spec.name)
    return shard_files(meta, group_dir / spec.name) or chunk_files(
        meta, group_dir / spec.name, multi_row
    )


def read_flags(arr: zarr.Array, files: ChunkFiles | ShardFiles | None = None) -> np.ndarray:
    """Read a (N,) checksum array; a chunk that cannot be read counts as 0 ('not written').
    With `files`, the chunk files are read directly (zarr costs ~1 ms a chunk: 100 s at 100k)."""
    if files is not None:
        return files.read_flags().astype(np.uint64)
    try:
        values = np.asarray(arr[:], dtype=np.uint64)
        return values[:, 0] if values.ndim == 2 else values  # schema 2: the sample's own sum
    except Exception:  # one bad chunk must not hide every good one: fall back to one by one
        out = np.zeros(arr.shape[0], dtype=np.uint64)
        for i in range(arr.shape[0]):
            try:
                out[i] = np.asarray(arr[i]).reshape(-1)[0]
            except Exception:
                out[i] = 0
        return out


def to_bits(x: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A bf16 tensor (or any float tensor, cast to bf16, or uint16 bits) as a uint16 numpy array."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
        if t.dtype != torch.uint16:
            if not t.is_floating_point():
                raise StoreError(f"{what}: expected a floating-point tensor, got {t.dtype}")
            t = t.to(torch.bfloat16).contiguous().view(torch.uint16)
        bits = t.contiguous().numpy()
    elif isinstance(x, np.ndarray) and x.dtype == np.uint16:
        bits = x
    else:
        raise StoreError(
            f"{what}: expected a torch tensor (bf16) or uint16 bits, got {type(x).__name__}"
        )
    if tuple(bits.shape) != tuple(shape):
        raise StoreError(f"{what}: expected shape {tuple(shape)}, got {tuple(bits.shape)}")
    return np.ascontiguousarray(bits)


def from_bits(bits: np.ndarray) -> torch.Tensor:
    """uint16 bits -> bf16 tensor (lossless)."""
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16)).view(torch.bfloat16)


def to_flags(x: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """All-masked flags (B, K) from a tensor, array or nested list, as uint8."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.shape != tuple(shape):
        raise StoreError(f"{what}: expected shape {tuple(shape)}, got {arr.shape}")
    return arr.astype(bool).astype(np.uint8)


def disk_bytes(path: str | Path | Location) -> int:
    """Apparent size of every file (object) under path."""
    path = location(path)
    size = path.size()
    if size is not None:
        return size
    return sum(size for _, size in path.walk())


def being_created(path: Location) -> bool:
    """Whether an object-store prefix holds the creation marker: its creator is at work, or was
    killed (a local store is built beside its folder and renamed into place: never)."""
    return not path.local and (path / CREATING).is_file()


def check_root(path: str | Path | Location) -> dict:
    """Root attributes of an existing store, after checking the format and schema version."""
    path = location(path)
    if being_created(path):
        raise StoreError(
            f"{path} is not a finished store: its creation is under way or was interrupted "
            "(rerun the precompute that creates it)"
        )
    attrs = node_attributes(path, "group")
    where = path / "zarr.json"
    if attrs.get("format") != STORE_FORMAT:
        raise StoreError(f"{where}: not a cogfun store (no `format: {STORE_FORMAT}` attribute)")
    version = attrs.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"{where}: attribute `schema_version` is missing or edited")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a newer cogfun (store schema {version}; this cogfun reads "
            f"schemas {', '.join(map(str, READABLE_SCHEMAS))}): upgrade cogfun to read it"
        )
    if version not in READABLE_SCHEMAS:
        raise StoreError(
            f"{path} has the old store schema {version} (this cogfun reads "
            f"{', '.join(map(str, READABLE_SCHEMAS))}): run precompute again into a new store"
        )
    for key in ("status", "fingerprint", "settings", "layout", "buckets", "captions"):
        if key not in attrs:
            raise StoreError(f"{where}: attribute `{key}` is missing (edited or damaged)")
    # The settings say how the bytes were made (the VAE scaling factor among them): an edit
    # would go unseen by every content checksum, so they must still hash to the fingerprint.
    if (
        not isinstance(attrs["settings"], dict)
        or fingerprint(attrs["settings"]) != attrs["fingerprint"]
    ):
        raise StoreError(
            f"{where}: attribute `settings` does not match the store's `fingerprint`: the "
            "settings or the fingerprint were edited after the store was written"
        )
    return attrs


def take_rows(
    array: Any,
    files: ChunkFiles | ShardFiles | None,
    slots: np.ndarray,
    parts: np.ndarray | None = None,
) -> np.ndarray:
    """Rows `slots` of a one-chunk-per-sample array, stacked: read straight from the chunk files
    when the array has the store's simple layout (about 3x faster than zarr per chunk), else with
    plain zarr slices, one per sample (orthogonal selection fancy-indexes inside every chunk and
    was about 2x slower per sample)."""
    if parts is not None:  # one mask variant per row: (B, 1, ...)
        if isinstance(files, ShardFiles) and files.parts > 1:
            return files.read_many(slots.tolist(), parts.tolist())
        return (
            np.stack(
                [
                    zarr_read(lambda s=int(s), p=int(p): np.asarray(array[s, p : p + 1]), array, s)
                    for s, p in zip(slots, parts, strict=True)
                ]
            )
            if len(slots)
            else np.zeros((0, 1, *array.shape[2:]), dtype=array.dtype)
        )
    if len(slots) == 0:
        return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
    if files is not None:
        return files.read_many(slots.tolist())
    return np.concatenate(
        [zarr_read(lambda s=int(s): np.asarray(array[s : s + 1]), array, s) for s in slots]
    )


def zarr_read(read: Any, array: Any, row: int | None = None) -> Any:
    """A zarr read under `retry_reads`, named by the array's path (and row)."""
    where = str(getattr(array, "store_path", array))
    return retry_reads(read, where if row is None else f"{where}[{row}]")


def failed_slot(exc: StoreReadError, slots: np.ndarray) -> int:
    """The slot whose read failed: zarr reads and shard reads are named <file>[<slot>],
    schema-1 chunk files c.<slot>.0...; the first slot when neither says."""
    name = exc.path.rsplit("/", 1)[-1]
    for candidate in (
        name.rsplit("[", 1)[-1].rstrip("]") if name.endswith("]") else "",
        name[2:].split(".", 1)[0] if name.startswith("c.") and "[" not in name else "",
    ):
        if candidate.isdigit() and int(candidate) in set(slots.tolist()):
            return int(candidate)
    return int(slots[0])

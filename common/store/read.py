"""Reading a store (`open_store`, `StoreReader`).

Private helper of `cogfun.common.store`. Opening reads the root attributes, each bucket's group
attributes and its one-chunk done index, nothing per sample, so it takes as long for 100k samples
as for 1k. Every read verifies the sample's checksum unless told not to: zarr returns the fill value
for a missing chunk, so only content checks catch a deleted or truncated chunk file. An I/O error
is not damage: it is retried, then raised as `StoreReadError` naming the file and the sample
(`store_chunks.retry_reads`), which `--skip-damaged` does not skip.

A `StoreReader` may be shared by threads (the training loader's reader threads share one): its
lazily filled caches are filled under a lock, and reads themselves keep no state; readers look a
cache entry up once, as the cache self-heal below may drop entries while they read.

A store on an object store is read the same way (`Location`); with `cache_dir`, a finished one's
files are read through a local cache folder (`cache.py`) in a namespace of the store's URL,
fingerprint and finalization, so a store finalized again (grown, resumed) never serves bytes
cached from its older version. A sample that fails its checksum through the cache is read once
more from the object store itself, its bucket's cache entries removed first: a damaged cache
entry costs one warning, not the sample; only a sample the object store itself serves damaged is
`DamagedSample` (and is not healed again). Caption embeddings and done indexes read through the
cache are not healed: a damaged entry of those is reported as damage until the cache folder is
deleted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from cogfun.common.store import rows
from cogfun.common.store import scan as store_scan
from cogfun.common.store.chunks import ChunkFiles
from cogfun.common.store.io import (
    check_root,
    from_bits,
    node_attributes,
    open_array,
    open_chunk_files,
    open_group,
    open_root,
    read_flags,
    zarr_read,
)
from cogfun.common.store.location import Location, location
from cogfun.common.store.lock import live_writer
from cogfun.common.store.lookups import StoreLookups
from cogfun.common.store.schema import (
    BucketInfo,
    DamagedSample,
    StoreError,
    StoreLayout,
    StoreReadError,
    brief,
    latent_shape_of,
)
from cogfun.common.store.shards import ShardFiles
from cogfun.common.store.specs import (
    plan_specs,
    sample_specs,
    shared_specs,
)
from cogfun.common.store.sums import (
    checksum,
)

log = logging.getLogger(__name__)


def open_store(
    path: str | Path | Location,
    *,
    allow_incomplete: bool = False,
    cache_dir: str | Path | None = None,
    cache_max_bytes: int | None = None,
) -> StoreReader:
    """Open a finished store for reading (fast: reads metadata and the per-bucket done indexes);
    with `cache_dir`, a finished store on an object store is read through that local folder
    (kept under `cache_max_bytes`, least recently used first out)."""
    return StoreReader(
        path,
        allow_incomplete=allow_incomplete,
        cache_dir=cache_dir,
        cache_max_bytes=cache_max_bytes,
    )


def cache_namespace(url: str, root: dict) -> str:
    """The cache folder's namespace of one version of a store: its URL, fingerprint and what
    finalize recorded (its time, plan and done indexes): a store finalized again gets another."""
    parts = [url, root.get("fingerprint"), root.get("finalized_at"), root.get("plan_digest")]
    parts.append(root.get("index_checksums"))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class StoreReader(StoreLookups):
    """Read access to one store. Picklable: a copy reopens the store (for DataLoader workers)."""

    def __init__(
        self,
        path: str | Path | Location,
        *,
        allow_incomplete: bool = False,
        cache_dir: str | Path | None = None,
        cache_max_bytes: int | None = None,
    ):
        self.source = location(path)  # the store itself (never through the cache)
        self.path = self.source
        self._allow_incomplete = allow_incomplete
        self._cache = (None if cache_dir is None else str(cache_dir), cache_max_bytes)
        root = check_root(self.path)  # the root attributes: never from the cache
        self.status: str = root["status"]
        if self.status != "complete" and not allow_incomplete:
            writer = live_writer(self.path)
            state = (
                f"a precompute is writing it right now ({writer}): wait for it to finish"
                if writer
                else "a precompute is still running or was interrupted; rerun the same "
                "precompute command to finish it"
            )
            raise StoreError(f"{self.path} is incomplete (status {self.status!r}): {state}")
        if cache_dir is not None and self.status == "complete" and not self.source.local:
            namespace = cache_namespace(str(self.source), root)
            self.path = self.source.cached(cache_dir, namespace, cache_max_bytes)
        self.root_attrs = root
        self.attrs: dict = root.get("attrs", {})
        self.settings: dict = root["settings"]
        self.fingerprint: str = root["fingerprint"]
        self.layout = StoreLayout.from_json(root["layout"], str(self.path / "zarr.json"))
        # Schema 2 records its shard sizes (the arrays' shapes depend on the schema); 1 has none.
        self._shard_rows: int | None = (
            root.get("shard_samples") if root["schema_version"] > 1 else None
        )
        self._root = open_root(self.path, "r")
        self._arrays: dict[str, dict[str, zarr.Array]] = {}
        # Per-sample arrays' files: shards (schema 2), one chunk file a row (schema 1), or None.
        self._files: dict[str, dict[str, ChunkFiles | ShardFiles | None]] = {}
        self._rows: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # plan chunks
        self._shared: dict[str, np.ndarray] = {}
        # Samples read damaged from the object store itself, past the cache: not healed again.
        self._damaged_at_source: set[tuple[str, int]] = set()
        self._done: dict[str, np.ndarray] = {}
        # Fills of the caches above; a cache entry is published only once complete, so readers
        # that find it never take the lock.
        self._fill = threading.RLock()
        self.buckets: dict[str, BucketInfo] = {
            name: self._open_bucket(name) for name in root["buckets"]
        }
        if self.status == "complete":
            self._check_counts()

    def __getstate__(self) -> dict:
        return {
            "path": self.source,  # a Location pickles with its storage options
            "allow_incomplete": self._allow_incomplete,
            "cache_dir": self._cache[0],
            "cache_max_bytes": self._cache[1],
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["path"],
            allow_incomplete=state["allow_incomplete"],
            cache_dir=state.get("cache_dir"),
            cache_max_bytes=state.get("cache_max_bytes"),
        )

    def _check_counts(self) -> None:
        """finalize recorded each bucket's stored count: an edited bucket list or done index
        would otherwise drop or add samples without a word."""
        counts = self.root_attrs.get("counts")
        found = {name: len(info.slots) for name, info in self.buckets.items()}
        if counts != found:
            raise StoreError(
                f"{self.path / 'zarr.json'}: the buckets and their stored counts ({found}) do not "
                f"match the counts recorded at finalize ({counts}): edited or damaged"
            )

    def _open_bucket(self, name: str) -> BucketInfo:
        group_dir = self.path / "buckets" / name
        a = node_attributes(group_dir, "group")
        try:
            info = BucketInfo(
                name=name,
                frames=int(a["frames"]),
                height=int(a["height"]),
                width=int(a["width"]),
                latent_shape=tuple(int(v) for v in a["latent_shape"]),
                slots=np.zeros(0, dtype=np.int64),
                planned=int(a["rows"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"{group_dir / 'zarr.json'}: bucket attributes missing or edited ({brief(exc)})"
            ) from exc
        f_lat, h, w = latent_shape_of(info.frames, info.height, info.width)
        if info.latent_shape != (f_lat, self.layout.latent_channels, h, w):
            raise StoreError(
                f"{group_dir / 'zarr.json'}: bucket attributes edited: {info.frames} frames of "
                f"{info.height}x{info.width} pixels do not give latent shape {info.latent_shape}"
            )
        if self.status == "complete":
            group = open_group(self._root, f"buckets/{name}", group_dir)
            done_spec = next(s for s in plan_specs(info.planned) if s.name == "done")
            done_array = open_array(group, group_dir, done_spec)
            try:
                done = np.asarray(done_array[:], dtype=np.uint8)
            except Exception as exc:  # zarr/blosc raise many types for one cause: a bad chunk
                raise StoreError(
                    f"{group_dir / 'done'}: the done index is unreadable: {brief(exc)}"
                ) from exc
            if checksum([done.tobytes()]) != self.root_attrs.get("index_checksums", {}).get(name):
                raise StoreError(
                    f"{group_dir / 'done'}: the done index does not match its checksum (damaged)"
                )
        else:  # no index yet: the done flags are the checksums themselves (scans the bucket)
            arrays = self._bucket_arrays(name, info)
            flags = self._flags(arrays, self._files[name])
            done = (flags != 0).astype(np.uint8)
            if "live" in arrays and info.planned:  # retired rows are not served
                done &= np.asarray(arrays["live"][:], dtype=np.uint8)
        return BucketInfo(**{**info.__dict__, "slots": np.flatnonzero(done).astype(np.int64)})

    # ---- lazily opened arrays and plan rows ----

    def _done_mask(self, bucket: str) -> np.ndarray:
        if bucket not in self._done:
            info = self._info(bucket)
            mask = np.zeros(info.planned, dtype=bool)
            mask[info.slots] = True
            self._done[bucket] = mask  # one assignment of a finished value: no lock needed
        return self._done[bucket]

    def _info(self, bucket: str) -> BucketInfo:
        if bucket not in self.buckets:
            raise StoreError(
                f"{self.path}: no bucket {bucket!r} (buckets: {', '.join(self.buckets)})"
            )
        return self.buckets[bucket]

    def _bucket_arrays(self, bucket: str, info: BucketInfo | None = None) -> dict[str, zarr.Array]:
        if bucket not in self._arrays:
            with self._fill:
                if bucket not in self._arrays:
                    self._open_arrays(bucket, info or self._info(bucket))
        return self._arrays[bucket]

    def _open_arrays(self, bucket: str, info: BucketInfo) -> None:
        group_dir = self.path / "buckets" / bucket
        group = open_group(self._root, f"buckets/{bucket}", group_dir)
        keyed = self._shard_rows is not None  # schema 2: row keys and live flags
        specs = sample_specs(info.planned, info, self.layout, self._shard_rows)
        specs += plan_specs(info.planned, keyed)
        specs += shared_specs(info, self.layout)
        self._files[bucket] = {
            s.name: open_chunk_files(group_dir, s)
            for s in sample_specs(info.planned, info, self.layout, self._shard_rows)
        }
        self._staged(self._files[bucket])
        for s in plan_specs(info.planned):
            if s.name in ("caption", "provenance_hash"):
                self._files[bucket][s.name] = open_chunk_files(group_dir, s, multi_row=True)
        # Last: a thread that finds the arrays finds the files too.
        self._arrays[bucket] = {s.name: open_array(group, group_dir, s) for s in specs}

    def _flags(self, arrays: dict, files: dict) -> np.ndarray:
        """The (N,) checksum values of a bucket's or the captions' arrays: sealed, and in an
        unfinished store the staged ones too (0 = not done)."""
        flags = read_flags(arrays["checksum"], files["checksum"])
        staged = self._staged(files)
        if len(staged):
            values = files["checksum"].read_many(staged.tolist())
            flags[staged] = values[:, 0] if values.ndim == 2 else values
        return flags

    def done_flags(self, bucket: str) -> np.ndarray:
        """(N,) uint64 checksums of every planned slot of `bucket` (0: not done), for scans."""
        return self._flags(self._bucket_arrays(bucket), self._files[bucket])

    def caption_flags(self) -> np.ndarray:
        """(M,) uint64 checksums of every caption (0: not written), for scans."""
        return self._flags(self._caption_arrays(), self._files["\0captions"])

    def _staged(self, files: dict) -> np.ndarray:
        """In an unfinished store, the rows a precompute has staged but not yet sealed into
        their shards: read from the staged files (`inspect` of a store being written). Sealed
        stores and schema-1 stores have none."""
        flags = files.get("checksum")
        if self.status == "complete" or not isinstance(flags, ShardFiles):
            return np.zeros(0, dtype=np.int64)
        rows = flags.staged_rows()
        for f in files.values():
            if isinstance(f, ShardFiles):
                f.use_staged(rows)
        return rows

    def _shared_latents(self, bucket: str, slot: int) -> np.ndarray:
        found = self._shared.get(bucket)  # one lookup: `_forget_cached` may drop it meanwhile
        if found is None:
            arrays = self._bucket_arrays(bucket)
            try:
                shared, sums = arrays["all_masked_latents"], arrays["all_masked_checksum"]
                bits = zarr_read(lambda: np.asarray(shared[...]), shared)
                stored = int(zarr_read(lambda: sums[0], sums))
            except StoreReadError as exc:
                raise exc.for_sample(f"{bucket}/{slot}") from exc.__cause__
            except Exception as exc:
                raise self._damaged(
                    bucket, slot, f"the bucket's all-masked latents are unreadable: {brief(exc)}"
                ) from exc
            if stored == 0 or checksum([bucket.encode(), bits.tobytes()]) != stored:
                raise self._damaged(
                    bucket, slot, "the bucket's shared all-masked latents are missing or damaged"
                )
            self._shared[bucket] = found = bits
        return found

    # ---- public reads ----

    @property
    def scaling_factor(self) -> float:
        """The VAE scaling factor the precompute recorded (attrs, settings, or their `vae` entry)."""
        for source in (self.attrs, self.settings, self.attrs.get("vae"), self.settings.get("vae")):
            if isinstance(source, dict) and isinstance(source.get("scaling_factor"), int | float):
                return float(source["scaling_factor"])
        raise StoreError(
            f"{self.path}: no `scaling_factor` recorded in the store's attrs or settings"
        )

    def _damaged(self, bucket: str, slot: int, reason: str) -> DamagedSample:
        return DamagedSample(bucket, slot, reason, self.source_file(bucket, slot))

    def read_rows(
        self,
        bucket: str,
        slots: np.ndarray,
        verify: bool = True,
        variants: Sequence[Iterable[int]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Raw stacked arrays of done slots (uint16 bits, all-masked substituted, caption (B,));
        with `variants`, only those mask variants of each slot (`rows.read_rows`)."""
        try:
            return rows.read_rows(self, bucket, slots, verify, variants)
        except DamagedSample as exc:
            key = (exc.bucket, exc.slot)
            if key in self._damaged_at_source or not self._forget_cached(bucket, exc):
                raise
            try:
                data = rows.read_rows(self, bucket, slots, verify, variants)
            except DamagedSample as again:  # damaged in the object store itself
                self._damaged_at_source.add((again.bucket, again.slot))
                raise
            log.warning(
                "%s: sample %s/%d failed its checksum as read through the cache folder %s and "
                "passed it read again from the object store: the cached copy was damaged and is "
                "gone (%s)",
                self.source,
                exc.bucket,
                exc.slot,
                self._cache[0],
                exc.reason,
            )
            return data

    def _forget_cached(self, bucket: str, damage: DamagedSample) -> bool:
        """Remove every cache-folder entry of `bucket`'s files and reopen its arrays (new file
        readers: the shard indexes and bodies they keep in memory go too), so its next reads come
        from the object store. False when this reader reads no cache. Other threads may be
        reading meanwhile: the caches are replaced or dropped entry by entry, never iterated
        while they fill, and their readers look an entry up once."""
        if self.path is self.source:
            return False
        group = self.path / "buckets" / bucket
        try:
            keys = [f"{group.key}/{rel}" for rel, _ in group.walk()]
        except OSError as exc:  # the listing failed: the damage report stands
            raise damage from exc
        with self._fill:
            self.path.fs.evict(keys)
            for key in [k for k in list(self._rows) if k[0] == bucket]:
                self._rows.pop(key, None)
            self._shared.pop(bucket, None)
            self._open_arrays(bucket, self._info(bucket))
        return True

    def read_batch(
        self,
        bucket: str,
        slots: Any,
        verify: bool = True,
        variants: Sequence[Iterable[int]] | None = None,
    ) -> dict:
        """Stacked sample tensors: latents (B, F_lat, 2C|C, h, w) bf16; masks (B, K, F_lat, 1, h, w),
        masked_latents (B, K, F_lat, 2C|C, h, w) bf16 and all_masked (B, K) bool (None in normal
        stores); caption (B,) int64 indexes `caption_embedding`. With `variants` (per slot, the
        mask variants a step uses) only those are read; `variants_read` (B, K) bool then says
        which (the others are zeros)."""
        data = self.read_rows(bucket, np.asarray(slots), verify, variants)
        has_masks = "masks" in data
        return {
            "latents": from_bits(data["latents"]),
            "masks": from_bits(data["masks"]) if has_masks else None,
            "masked_latents": from_bits(data["masked_latents"]) if has_masks else None,
            "all_masked": torch.from_numpy(data["all_masked"].astype(bool)) if has_masks else None,
            "caption": torch.from_numpy(data["caption"]),
            **(
                {"variants_read": torch.from_numpy(data["variants_read"])}
                if variants is not None and has_masks
                else {}
            ),
        }

    def read_sample(self, bucket: str, slot: int, verify: bool = True) -> dict:
        """One sample: the `read_batch` entries without the batch dim; caption is an int."""
        batch = self.read_batch(bucket, [int(slot)], verify)
        out = {k: (v[0] if v is not None else None) for k, v in batch.items()}
        out["caption"] = int(batch["caption"][0])
        return out

    def failures(self) -> list[dict]:
        return store_scan.failures(self)

    def digest(self) -> str:
        return store_scan.digest(self)

    def verify(self) -> list[tuple[str, int, str]]:
        return store_scan.verify(self)

    def summary(self) -> dict:
        return store_scan.summary(self)

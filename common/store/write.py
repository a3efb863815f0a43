"""Writing planned slots of an existing store (`StoreWriter`).

Private helper of `cogfun.common.store`. Crash safety comes from the order of writes. A sample's
arrays are staged before its checksum (the done flag, `shards.ShardFiles.stage`); a shard is sealed
(its staged samples streamed into one file per array, checksum array last) by the one process that
owns it; `finalize` writes the per-bucket done index and sets `status: complete` last. Every file is
written whole (a temporary name and a rename locally, one PUT on an object store), so a `kill -9`
leaves either the old or the new file, never a torn one, and each sample reads as staged, sealed
or not done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from cogfun.common.store.chunks import stage_all
from cogfun.common.store.io import (
    open_array,
    open_chunk_files,
    open_group,
    open_root,
    read_flags,
    to_bits,
    to_flags,
)
from cogfun.common.store.location import Location, location
from cogfun.common.store.schema import (
    FAILURES_DIR,
    BucketPlan,
    StoreError,
    StoreLayout,
    StorePlan,
    provenance_strings,
)
from cogfun.common.store.seal import Sealing
from cogfun.common.store.shards import ShardFiles
from cogfun.common.store.specs import (
    ArraySpec,
    caption_specs,
    plan_specs,
    sample_specs,
    shared_specs,
)
from cogfun.common.store.sums import (
    caption_checksum,
    checksum,
    sample_checksums,
    text_checksum,
)


def clear_failures(path: str | Path | Location) -> None:
    """Drop every failure record: a run records afresh what it cannot store (a row gone from the
    dataset leaves no stale record; a sample that fails again is recorded again)."""
    folder = location(path) / FAILURES_DIR
    folder.delete_many([name for name in folder.listdir() if name.endswith(".json")])


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class StoreWriter(Sealing):
    """Writes planned slots of an existing store. Several processes may stage disjoint slots; each
    shard is sealed by the one process that owns it (`owns`)."""

    def __init__(self, path: str | Path | Location, plan: StorePlan, layout: StoreLayout):
        self.path = location(path)
        self.plan = plan
        self.layout = layout
        self.root = open_root(self.path, "r+")
        self._plans = {b.name: b for b in plan.buckets}
        self._arrays: dict[str, dict[str, zarr.Array]] = {}
        self._files: dict[str, dict[str, ShardFiles]] = {}  # per-sample arrays' shard files
        self._prov_hash: dict[str, np.ndarray] = {}
        self._shared_ok: set[str] = set()
        # Slots seen without a done flag and not written since: no flag to clear before a write.
        self._known_empty: dict[str, np.ndarray] = {}
        self._caption_done: np.ndarray | None = None
        self.update: dict | None = None  # set by open_for_write when it grew the store
        # Called before each seal and before finalize: the writer lock's `check` (raises when
        # this process no longer holds the store: a lease lost on an object store).
        self.guard: Callable[[], None] | None = None
        self.shard_rows = int(self.root.attrs.get("shard_samples", 0))
        self.caption_shard_rows = int(self.root.attrs.get("caption_shard", 0))
        # Global shard numbers, buckets in plan order then the captions: shard g is owned by
        # process g % world.
        self._first_shard: dict[str, int] = {}
        first = 0
        for b in plan.buckets:
            self._first_shard[b.name] = first
            first += -(-len(b.rows) // self.shard_rows) if self.shard_rows else 0
        self._first_shard["\0captions"] = first

    # ---- lookups ----

    def _bucket(self, bucket: str) -> BucketPlan:
        if bucket not in self._plans:
            raise StoreError(
                f"{self.path}: no bucket {bucket!r} in the plan ({', '.join(self._plans)})"
            )
        return self._plans[bucket]

    def _slot(self, b: BucketPlan, slot: int) -> int:
        if not 0 <= int(slot) < len(b.rows):
            raise StoreError(
                f"{self.path}: slot {slot} is outside bucket {b.name} (0..{len(b.rows) - 1})"
            )
        return int(slot)

    def _group_arrays(self, bucket: str) -> dict[str, zarr.Array]:
        if bucket not in self._arrays:
            b = self._bucket(bucket)
            group_dir = self.path / "buckets" / bucket
            group = open_group(self.root, f"buckets/{bucket}", group_dir)
            specs = sample_specs(len(b.rows), b, self.layout, self.shard_rows) + plan_specs(
                len(b.rows)
            )
            specs += shared_specs(b, self.layout)
            self._arrays[bucket] = {s.name: open_array(group, group_dir, s) for s in specs}
            self._files[bucket] = {
                s.name: self._shard_files(group_dir, s)
                for s in sample_specs(len(b.rows), b, self.layout, self.shard_rows)
            }
            prov = provenance_strings(b)
            self._prov_hash[bucket] = np.asarray([text_checksum(p) for p in prov], dtype=np.uint64)
        return self._arrays[bucket]

    def _shard_files(self, folder: Location, spec: ArraySpec) -> ShardFiles:
        files = open_chunk_files(folder, spec)
        if not isinstance(files, ShardFiles):
            raise StoreError(
                f"{folder / spec.name / 'zarr.json'}: not the sharded layout this cogfun writes "
                "(edited, or made by another writer): write to a new store"
            )
        return files

    def _captions(self) -> dict[str, zarr.Array]:
        if "\0captions" not in self._arrays:
            folder = self.path / "captions"
            group = open_group(self.root, "captions", folder)
            specs = caption_specs(len(self.plan.captions), self.layout)
            self._files["\0captions"] = {
                s.name: self._shard_files(folder, s)
                for s in specs
                if s.name in ("embeddings", "checksum")
            }
            self._arrays["\0captions"] = {s.name: open_array(group, folder, s) for s in specs}
        return self._arrays["\0captions"]

    # ---- ownership ----

    def shard_of(self, bucket: str, slot: int) -> int:
        """The global number of the shard that holds `bucket`/`slot`."""
        return self._first_shard[bucket] + int(slot) // self.shard_rows

    def caption_shard_of(self, i: int) -> int:
        return self._first_shard["\0captions"] + int(i) // self.caption_shard_rows

    @staticmethod
    def owns(shard: int, rank: int, world: int) -> bool:
        """Whether process `rank` of `world` writes (seals) global shard `shard`."""
        return shard % world == rank

    # ---- state ----

    def done_slots(self, bucket: str) -> np.ndarray:
        """(N,) bool: slots whose done flag (checksum) is sealed or staged, read fresh from disk."""
        self._group_arrays(bucket)
        flags = self._files[bucket]["checksum"]
        done = read_flags(self._arrays[bucket]["checksum"], flags) != 0
        done[flags.staged_rows()] = True
        self._known_empty[bucket] = ~done
        return done

    def caption_done(self, i: int) -> bool:
        if self._caption_done is None:
            self._captions()
            flags = self._files["\0captions"]["checksum"]
            done = read_flags(self._arrays["\0captions"]["checksum"], flags) != 0
            done[flags.staged_rows()] = True
            self._caption_done = done
        return bool(self._caption_done[int(i)])

    def has_all_masked(self, bucket: str) -> bool:
        if bucket not in self._shared_ok and self.layout.masks_per_sample:
            if int(self._group_arrays(bucket)["all_masked_checksum"][0]) != 0:
                self._shared_ok.add(bucket)
        return bucket in self._shared_ok

    # ---- writes ----

    def write_caption(self, i: int, embed: Any) -> None:
        """Stage caption i's T5 embedding (L, D); its checksum is staged last."""
        i = int(i)
        if not 0 <= i < len(self.plan.captions):
            raise StoreError(
                f"{self.path}: caption index {i} is outside 0..{len(self.plan.captions) - 1}"
            )
        shape = (self.layout.text_len, self.layout.text_dim)
        bits = to_bits(embed, shape, f"caption {i} embedding")
        self._captions()
        files = self._files["\0captions"]
        files["checksum"].stage(i, None)
        files["embeddings"].stage(i, bits)
        files["checksum"].stage(i, np.asarray(caption_checksum(i, bits), dtype=np.uint64))
        if self._caption_done is not None:
            self._caption_done[i] = True

    def write_all_masked(self, bucket: str, moments: Any) -> None:
        """Store the bucket's one all-masked masked-video latent (F_lat, 2C|C, h, w)."""
        b = self._bucket(bucket)
        if not self.layout.masks_per_sample:
            raise StoreError(f"{self.path}: a normal-mode store (masks_per_sample=0) has no masks")
        shape = (b.latent_frames, self.layout.stored_channels, b.latent_h, b.latent_w)
        bits = to_bits(moments, shape, f"all-masked latents of {bucket}")
        arrays = self._group_arrays(bucket)
        arrays["all_masked_checksum"][0] = 0
        arrays["all_masked_latents"][...] = bits
        arrays["all_masked_checksum"][0] = checksum([bucket.encode(), bits.tobytes()])
        self._shared_ok.add(bucket)

    def write_sample(
        self,
        bucket: str,
        slot: int,
        latents: Any,
        masks: Any = None,
        masked_latents: Any = None,
        all_masked: Any = None,
    ) -> None:
        """Stage one sample: latents (F_lat, 2C|C, h, w); in inpaint stores also masks
        (K, F_lat, 1, h, w), masked_latents (K, F_lat, 2C|C, h, w) and all_masked (K,)."""
        b = self._bucket(bucket)
        f, cs, h, w = b.latent_frames, self.layout.stored_channels, b.latent_h, b.latent_w
        k = self.layout.masks_per_sample
        where = f"sample {bucket}/{slot}"
        self._check_mode(where, masks, masked_latents, all_masked)
        lat = to_bits(latents, (f, cs, h, w), f"latents of {where}")[None]
        if not k:
            self.write_samples(bucket, [slot], lat)
            return
        self.write_samples(
            bucket,
            [slot],
            lat,
            to_bits(masks, (k, f, 1, h, w), f"masks of {where}")[None],
            to_bits(masked_latents, (k, f, cs, h, w), f"masked_latents of {where}")[None],
            to_flags(all_masked, (k,), f"all_masked of {where}")[None],
        )

    def _check_mode(self, where: str, *mask_args: Any) -> None:
        given = [a is not None for a in mask_args]
        if self.layout.masks_per_sample and not all(given):
            raise StoreError(
                f"{where}: an inpaint store needs masks, masked_latents and all_masked"
            )
        if not self.layout.masks_per_sample and any(given):
            raise StoreError(f"{where}: a normal-mode store (masks_per_sample=0) holds no masks")

    def write_samples(
        self,
        bucket: str,
        slots: Any,
        latents: Any,
        masks: Any = None,
        masked_latents: Any = None,
        all_masked: Any = None,
    ) -> None:
        """Stage B samples of one bucket (each argument of `write_sample` with a leading B dim).
        Three rounds, each many files at a time: clear stale done flags, every array's chunks,
        then the checksums (a round ends when all its files are on disk, so no checksum exists
        before its sample's arrays). The shard is written when its owner seals it."""
        b = self._bucket(bucket)
        slots = [self._slot(b, s) for s in np.asarray(slots, dtype=np.int64).reshape(-1)]
        if len(set(slots)) != len(slots):
            raise StoreError(f"{self.path}: slots repeat in one write to {bucket}: {slots}")
        n, k = len(slots), self.layout.masks_per_sample
        f, cs, h, w = b.latent_frames, self.layout.stored_channels, b.latent_h, b.latent_w
        where = f"samples {bucket}/{slots[0]}.." if n > 1 else f"sample {bucket}/{slots[0]}"
        self._check_mode(where, masks, masked_latents, all_masked)
        data = {"latents": to_bits(latents, (n, f, cs, h, w), f"latents of {where}")}
        if k:
            flags = to_flags(all_masked, (n, k), f"all_masked of {where}")
            if flags.any() and not self.has_all_masked(bucket):
                raise StoreError(
                    f"{where} has all-masked variants: call write_all_masked({bucket!r}, ...) first"
                )
            stored = to_bits(masked_latents, (n, k, f, cs, h, w), f"masked_latents of {where}")
            # All-masked variants share the bucket's one latent; storing zeros costs nothing.
            stored = np.where(flags.astype(bool)[..., None, None, None, None], np.uint16(0), stored)
            data["masks"] = to_bits(masks, (n, k, f, 1, h, w), f"masks of {where}")
            data["masked_latents"] = stored
            data["all_masked"] = flags
        self._group_arrays(bucket)
        sums = np.stack(
            [
                sample_checksums(
                    bucket,
                    s,
                    {name: a[i] for name, a in data.items()},
                    b.rows[s].caption,
                    int(self._prov_hash[bucket][s]),
                )
                for i, s in enumerate(slots)
            ]
        )  # (B, 1 + K)
        index = np.asarray(slots, dtype=np.int64)
        empty = self._known_empty.get(bucket, np.zeros(len(b.rows), dtype=bool))
        stale = index[~empty[index]]
        empty[index] = False  # before any write: a failed write must not leave them 'known empty'
        files = self._files[bucket]
        flags_files = files["checksum"]
        stage_all((flags_files, int(s), None) for s in stale)
        stage_all(
            (files[name], int(s), rows[i])
            for name, rows in data.items()
            for i, s in enumerate(index.tolist())
        )
        stage_all((flags_files, int(s), sums[i]) for i, s in enumerate(index.tolist()))

    def record_failure(self, key: str, file: str, reason: str, row: int | None) -> None:
        """Record a failed input once per key (one JSON file per key: safe across processes)."""
        entry = {"key": key, "file": str(file), "reason": str(reason), "row": row}
        self._failure_path(key).write_text(json.dumps(entry, ensure_ascii=False, sort_keys=True))

    def clear_failure(self, key: str) -> None:
        """Forget a failure that a rerun has since stored (no error if it was never recorded)."""
        self._failure_path(key).delete()

    def _failure_path(self, key: str) -> Location:
        folder = self.path / FAILURES_DIR
        folder.mkdir()
        return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def finalize(self) -> None:
        """Write each bucket's done index, check captions, then set `status: complete` (last)."""
        if self.guard is not None:
            self.guard()
        self.seal_owned(0, 1)  # every process is done: a shard left staged is sealed here
        counts, index_sums, needed = {}, {}, set()
        for b in self.plan.buckets:
            arrays = self._group_arrays(b.name)
            flags = read_flags(arrays["checksum"], self._files[b.name]["checksum"])
            live = np.asarray([r.live for r in b.rows], dtype=bool)
            done = ((flags != 0) & live).astype(np.uint8)  # retired rows are not served
            arrays["done"][:] = done
            counts[b.name] = int(done.sum())
            index_sums[b.name] = checksum([done.tobytes()])
            needed.update(b.rows[s].caption for s in np.flatnonzero(done))
        if sum(counts.values()):
            needed.add(0)  # caption dropout needs the empty caption whenever anything is stored
        self._caption_done = None  # read the sealed flags afresh
        missing = sorted(i for i in needed if not self.caption_done(i))
        if missing:
            shown = ", ".join(f"{i} ({self.plan.captions[i][:40]!r})" for i in missing[:5])
            raise StoreError(
                f"{self.path}: cannot finalize, caption embeddings never written: {shown}"
            )
        if self.guard is not None:
            self.guard()  # again, right before the write that makes the store complete
        self.root.attrs.update(
            {
                "counts": counts,
                "index_checksums": index_sums,
                "finalized_at": now_iso(),
                "status": "complete",
            }
        )

"""The Zarr v3 latent store: the one package that touches zarr (its modules split it by job).

Precompute writes it, training and `cogfun inspect` read it:

    w = open_for_write(path, settings=..., attrs=..., plan=plan, layout=layout, create=rank == 0)
    w.write_caption(i, embed)                       # (L, D) bf16, once per distinct caption
    w.write_all_masked(bucket, moments)             # (F_lat, 2C|C, h, w), before all-masked samples
    w.write_sample(bucket, slot, latents, masks, masked_latents, all_masked)   # staged
    w.seal(bucket, shard) / w.seal_owned(rank, world)   # the shard's owner writes it whole
    w.finalize()                                    # one process, after every slot is done or failed
    r = open_store(path)                            # fast: no per-sample reads
    r.read_batch(bucket, slots)                     # checksums verified

`path` is a local folder or an object-store URL (`s3://bucket/prefix/latents.zarr`, gs://, az://;
`location(url, storage_options)` for options of its own): every file goes through a `Location`
(location.py), so a store keeps the same rules on both. `open_store(url, cache_dir=...)` reads a
finished remote store through a local cache folder.

On-disk layout, schema 2 (bf16 is stored as its uint16 bits; every array compressed with Blosc zstd):

    STORE/zarr.json                    root attributes:
        format "cogfun-store", schema_version, status ("writing" until finalize, then "complete"),
        fingerprint (sha256 of `settings`), settings (everything that shapes the bytes), attrs
        (resolved config, code version, thread count, model identities, scaling_factor: whatever
        the caller passes), layout (StoreLayout), buckets (names in plan order), captions (count),
        plan_digest, compression, shard_samples, caption_shard, created_at; finalize adds counts,
        index_checksums, finalized_at.
    STORE/buckets/<name>/              group attributes: frames, height, width (pixels),
                                       latent_frames, latent_h, latent_w, latent_shape [F_lat, C, h, w], rows
        per-sample arrays, sharded: `shard_samples` samples a file (c.<shard>.0...), inside it one
        chunk per sample (and per mask variant), then the shard index and its crc32c:
        latents          (N, F_lat, 2C|C, h, w) uint16
        masks            (N, K, F_lat, 1, h, w) uint16     a chunk per variant     (inpaint, K > 0)
        masked_latents   (N, K, F_lat, 2C|C, h, w) uint16  a chunk per variant     (inpaint)
                         all-masked variants are stored as zeros: the reader substitutes
        all_masked       (N, K) uint8                                              (inpaint)
        checksum         (N,) uint64                       the done flag (0 = not written)
        <array>/.staged/<row>.<part>   a sample's chunks between its encode and its shard's seal
        all_masked_latents (F_lat, 2C|C, h, w) uint16    one per bucket           (inpaint)
        all_masked_checksum (1,) uint64                  its checksum, written after it
        caption          (N,) int64                      caption index; written at creation
        provenance       (N,) string                     canonical JSON; written at creation
        provenance_hash  (N,) uint64                     blake2b of provenance; written at creation
        done             (N,) uint8                      one chunk: the done index, written by finalize
    STORE/captions/  embeddings (M, L, D) uint16 and checksum (M,) uint64 (done flag), sharded
                     `caption_shard` captions a file; texts (M,) string. Index 0 is always "".
    STORE/failures/<sha256(key)[:32]>.json   {key, file, reason, row}: one file per failed input
    STORE/.creating                    object stores only: present while the store is created
                                       (create.py); a prefix holding it is no store yet
    .STORE.lock (beside the store)     held by the one live precompute (`StoreLock`);
                                       `live_writer(path)` tells "being written now" from "interrupted"

Writing (`shards.py`): a sample's chunks are staged as small files, its checksum last; when every
sample of a shard is staged (or failed), the one process that owns the shard (global shard g:
process g % world) seals it: one new file per array, streamed from the staged chunks (and, on a
rerun, the shard's still-valid chunks), checksum array last, each written whole (a temporary name
and a rename locally, one PUT on an object store); then the staged files go. Nothing is ever
written into a shard in place, so two processes never share a file and an object store (no
partial writes, no renames) holds a store the same way.

A sample's checksum (blake2b, 64 bits) covers its bucket name and slot, the exact bytes of its
arrays, its caption index and its provenance hash, so a dropped chunk (zarr returns zeros), a
truncated or an altered one is caught by content, and a damaged shard index (crc32c) makes every
sample of that shard read as damaged, and no other. Arrays are pre-sized from the plan and never
resized. Schema-1 stores (one chunk file per sample, cogfun before sharding) are read as they are.
"""

from cogfun.common.store.create import open_for_write
from cogfun.common.store.grow import read_plan
from cogfun.common.store.io import check_root
from cogfun.common.store.location import Location, location
from cogfun.common.store.lock import StoreLock, live_writer
from cogfun.common.store.read import StoreReader, open_store
from cogfun.common.store.schema import (
    SCHEMA_VERSION,
    BucketInfo,
    BucketPlan,
    DamagedSample,
    FingerprintMismatch,
    RowPlan,
    StoreError,
    StoreLayout,
    StorePlan,
    StoreReadError,
    fingerprint,
)
from cogfun.common.store.specs import (
    shard_size,
)
from cogfun.common.store.write import StoreWriter, clear_failures

__all__ = [
    "SCHEMA_VERSION",
    "BucketInfo",
    "BucketPlan",
    "DamagedSample",
    "FingerprintMismatch",
    "Location",
    "RowPlan",
    "StoreError",
    "StoreLayout",
    "StoreLock",
    "StorePlan",
    "StoreReadError",
    "StoreReader",
    "StoreWriter",
    "check_root",
    "clear_failures",
    "read_plan",
    "fingerprint",
    "shard_size",
    "live_writer",
    "location",
    "open_for_write",
    "open_store",
]

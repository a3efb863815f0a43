"""The Zarr v3 latent store: the one module (with its private `store_*` helpers) that touches zarr.

Precompute writes it, training and `cogfun inspect` read it:

    w = open_for_write(path, settings=..., attrs=..., plan=plan, layout=layout, create=rank == 0)
    w.write_caption(i, embed)                       # (L, D) bf16, once per distinct caption
    w.write_all_masked(bucket, moments)             # (F_lat, 2C|C, h, w), before all-masked samples
    w.write_sample(bucket, slot, latents, masks, masked_latents, all_masked)
    w.finalize()                                    # one process, after every slot is done or failed
    r = open_store(path)                            # fast: no per-sample reads
    r.read_batch(bucket, slots)                     # checksums verified

On-disk layout (bf16 is stored as its uint16 bits; every array compressed with Blosc zstd):

    STORE/zarr.json                    root attributes:
        format "cogfun-store", schema_version, status ("writing" until finalize, then "complete"),
        fingerprint (sha256 of `settings`), settings (everything that shapes the bytes), attrs
        (resolved config, code version, thread count, model identities, scaling_factor: whatever
        the caller passes), layout (StoreLayout), buckets (names in plan order), captions (count),
        plan_digest, compression, created_at; finalize adds counts, index_checksums, finalized_at.
    STORE/buckets/<name>/              group attributes: frames, height, width (pixels),
                                       latent_frames, latent_h, latent_w, latent_shape [F_lat, C, h, w], rows
        latents          (N, F_lat, 2C|C, h, w) uint16   one chunk per sample
        masks            (N, K, F_lat, 1, h, w) uint16   one chunk per sample     (inpaint, K > 0)
        masked_latents   (N, K, F_lat, 2C|C, h, w) uint16 one chunk per sample    (inpaint)
                         all-masked variants are stored as zeros: the reader substitutes
        all_masked_latents (F_lat, 2C|C, h, w) uint16    one per bucket           (inpaint)
        all_masked_checksum (1,) uint64                  its checksum, written after it
        all_masked       (N, K) uint8                    one chunk per sample     (inpaint)
        caption          (N,) int64                      caption index; written at creation
        provenance       (N,) string                     canonical JSON; written at creation
        provenance_hash  (N,) uint64                     blake2b of provenance; written at creation
        checksum         (N,) uint64                     one chunk per sample, written LAST: the done
                                                         flag (0 = not written)
        done             (N,) uint8                      one chunk: the done index, written by finalize
    STORE/captions/  embeddings (M, L, D) uint16 one chunk per caption; texts (M,) string;
                     checksum (M,) uint64 (done flag). Index 0 is always the empty caption.
    STORE/failures/<sha256(key)[:32]>.json   {key, file, reason, row}: one file per failed input
    .STORE.lock (beside the store)     flock held by the one live precompute (`StoreLock`);
                                       `live_writer(path)` tells "being written now" from "interrupted"

A sample's checksum (blake2b, 64 bits) covers its bucket name and slot, the exact bytes of its
arrays, its caption index and its provenance hash, so a deleted chunk (zarr returns zeros), a
truncated or an altered one is caught by content. Arrays are pre-sized from the plan and never
resized; chunks are never shared between samples, so processes writing disjoint slots lose nothing.
"""

from cogfun.common.store.create import open_for_write
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
from cogfun.common.store.write import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "BucketInfo",
    "BucketPlan",
    "DamagedSample",
    "FingerprintMismatch",
    "RowPlan",
    "StoreError",
    "StoreLayout",
    "StoreLock",
    "StorePlan",
    "StoreReadError",
    "StoreReader",
    "StoreWriter",
    "fingerprint",
    "live_writer",
    "open_for_write",
    "open_store",
]

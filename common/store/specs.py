"""The store's array specs: the one declaration of every array's shape, dtype and chunking.

Private helper of `cogfun.common.store`; no zarr here (`io.create_array` makes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cogfun.common.store.schema import (
    BucketInfo,
    BucketPlan,
    StoreError,
    StoreLayout,
)

# Plan-level arrays are written once at creation by one process, so they may hold many rows a chunk.
PLAN_CHUNK_ROWS = 65536
PROVENANCE_CHUNK_ROWS = 4096  # string arrays (provenance, caption texts)
# Samples per shard file. Each inpaint shard is 5 files (latents, masks, masked_latents,
# all_masked, checksum): with the caption shards and the provenance chunks, 512 samples a shard
# keep a store under 1/64 files per sample (bench/store_layout.py). Rounded up to whole
# `vae_mini_batch` chunks, the unit one process encodes (`shard_size`).
SHARD_SAMPLES = 512
CAPTION_SHARD = 1024  # caption embeddings per shard file (a multiple of precompute's T5 batch)


def shard_size(samples: int, vae_mini_batch: int) -> int:
    """Rows per shard: `samples` rounded up to whole VAE chunks, so that one process, the shard's
    owner, encodes every sample of a shard."""
    if samples < 1 or vae_mini_batch < 1:
        raise StoreError(f"shard size {samples} and vae_mini_batch {vae_mini_batch} must be >= 1")
    return -(-samples // vae_mini_batch) * vae_mini_batch


@dataclass(frozen=True)
class ArraySpec:
    """One array: `chunks` is the chunk (the inner chunk when `shards` is given: the shape of a
    shard file, schema 2's per-sample arrays)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    compressed: bool = True
    shards: tuple[int, ...] | None = None


def sample_specs(
    n: int, b: BucketPlan | BucketInfo, layout: StoreLayout, shard_rows: int | None = None
) -> list[ArraySpec]:
    """Per-sample arrays of one bucket; `checksum` is the done flag. With `shard_rows` (how a store
    is written) `shard_rows` samples share a file, inside it one chunk per sample and, for the
    mask variants, per variant; without, the schema-1 layout of one chunk (file) per sample."""
    f, h, w = _lat(b)
    cs, k = layout.stored_channels, layout.masks_per_sample
    kk = 1 if shard_rows else k  # mask variants per chunk

    def spec(name: str, row: tuple, dtype: str, chunk: tuple, compressed: bool = True):
        shards = (shard_rows, *row) if shard_rows else None
        return ArraySpec(name, (n, *row), dtype, (1, *chunk), compressed, shards)

    specs = [spec("latents", (f, cs, h, w), "uint16", (f, cs, h, w))]
    if k:
        specs += [
            spec("masks", (k, f, 1, h, w), "uint16", (kk, f, 1, h, w)),
            spec("masked_latents", (k, f, cs, h, w), "uint16", (kk, f, cs, h, w)),
            spec("all_masked", (k,), "uint8", (k,)),
        ]
    # Schema 2: the sample's checksum (the done flag) then one per mask variant, so one variant
    # can be read and verified alone; schema 1: the sample's checksum only.
    sums = (1 + k,) if shard_rows else ()
    specs.append(spec("checksum", sums, "uint64", sums, compressed=False))
    return specs


def plan_chunk_rows(n: int) -> int:
    """Rows per chunk of a bucket's `caption` and `provenance_hash` arrays (n rows planned)."""
    return max(1, min(n, PLAN_CHUNK_ROWS))


def plan_specs(n: int, keyed: bool = True) -> list[ArraySpec]:
    """Plan-level arrays of one bucket, written when the plan creates or grows the store; `done`
    is written by finalize. `keyed` (schema 2): each row's content key and live flag."""
    rows = plan_chunk_rows(n)
    strings = (max(1, min(n, PROVENANCE_CHUNK_ROWS)),)
    specs = [
        ArraySpec("caption", (n,), "int64", (rows,)),
        ArraySpec("provenance_hash", (n,), "uint64", (rows,)),
        ArraySpec("provenance", (n,), "str", strings),
        ArraySpec("done", (n,), "uint8", (max(1, n),)),
    ]
    if keyed:
        specs += [
            ArraySpec("key", (n,), "str", strings),
            ArraySpec("live", (n,), "uint8", (max(1, n),)),
        ]
    return specs


def shared_specs(b: BucketPlan | BucketInfo, layout: StoreLayout) -> list[ArraySpec]:
    """The one masked-video latent every all-masked variant of the bucket shares (inpaint only)."""
    if not layout.masks_per_sample:
        return []
    f, h, w = _lat(b)
    shape = (f, layout.stored_channels, h, w)
    return [
        ArraySpec("all_masked_latents", shape, "uint16", shape),
        ArraySpec("all_masked_checksum", (1,), "uint64", (1,), compressed=False),
    ]


def caption_specs(m: int, layout: StoreLayout, shard_rows: int | None = None) -> list[ArraySpec]:
    """The caption arrays; with `shard_rows`, embeddings and checksums sharded like samples."""
    ld = (layout.text_len, layout.text_dim)
    shards = (lambda *row: (shard_rows, *row)) if shard_rows else (lambda *row: None)
    return [
        ArraySpec("embeddings", (m, *ld), "uint16", (1, *ld), shards=shards(*ld)),
        ArraySpec("texts", (m,), "str", (max(1, min(m, PROVENANCE_CHUNK_ROWS)),)),
        ArraySpec("checksum", (m,), "uint64", (1,), compressed=False, shards=shards()),
    ]


def _lat(b: BucketPlan | BucketInfo) -> tuple[int, int, int]:
    if isinstance(b, BucketInfo):
        return b.latent_shape[0], b.latent_shape[2], b.latent_shape[3]
    return b.latent_frames, b.latent_h, b.latent_w


def raw_sample_bytes(b: BucketPlan | BucketInfo, layout: StoreLayout) -> int:
    """Uncompressed payload of one sample: its arrays (checksum included) and its caption index."""
    per = sum(
        math.prod(s.shape[1:]) * np.dtype(s.dtype).itemsize
        for s in sample_specs(1, b, layout, shard_rows=1)
    )
    return per + 8

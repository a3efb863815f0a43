"""The store's schema: plan and layout types, errors, fingerprints, checksums and array specs.

Private helper of `cogfun.common.store` (import the public names from there). Nothing here touches
zarr; `store_write.py` and `store_read.py` do, and both take every name, shape and constant from here
so that the on-disk layout is declared once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

SCHEMA_VERSION = 2  # 2: per-sample arrays sharded (common/store/shards.py); 1 is still read
READABLE_SCHEMAS = (1, 2)
STORE_FORMAT = "cogfun-store"  # root attribute `format`: tells a cogfun store from any Zarr group
FAILURES_DIR = "failures"  # one JSON file per failed input, beside the Zarr nodes

# Plan-level arrays are written once at creation by one process, so they may hold many rows a chunk.
PLAN_CHUNK_ROWS = 65536
PROVENANCE_CHUNK_ROWS = 1024  # string arrays (provenance, caption texts)
# Samples per shard file. Each inpaint shard is 5 files (latents, masks, masked_latents,
# all_masked, checksum), so 384 samples keep a store at 5/384 (< 1/64) files per sample; rounded up
# to whole `vae_mini_batch` chunks, the unit one process encodes (`shard_size`).
SHARD_SAMPLES = 384
CAPTION_SHARD = 1024  # caption embeddings per shard file (a multiple of precompute's T5 batch)
DEFAULT_COMPRESSION = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(Exception):
    """A store that cannot be opened, created or written as asked; the message names the path."""


class FingerprintMismatch(StoreError):
    """The store was written with other settings; `.diff` maps each differing key to (old, new)."""

    def __init__(self, path: Path | str, diff: dict[str, tuple[Any, Any]]):
        self.path = str(path)
        self.diff = diff
        lines = [
            f"  {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in sorted(diff.items())
        ]
        super().__init__(
            f"store {path} was written with different settings; refusing to mix them:\n"
            + "\n".join(lines)
            + "\nwrite to another store (--out) or delete this one to start over."
        )


class DamagedSample(StoreError):
    """A stored sample whose bytes do not match the checksum recorded when it was written."""

    def __init__(self, bucket: str, slot: int, reason: str, file: str | None = None):
        self.bucket, self.slot, self.reason, self.file = bucket, slot, reason, file
        source = f" (source {file})" if file else ""
        super().__init__(
            f"damaged sample {bucket}/{slot}{source}: {reason}; "
            "`cogfun inspect STORE --verify` lists every damaged sample"
        )


class StoreReadError(StoreError):
    """Reading a store file kept failing with an I/O error (OSError) after the retries.

    The disk or filesystem failed, not the sample's bytes: this is not a `DamagedSample`, so
    `--skip-damaged` does not skip it (skipping would silently drop samples a healthy disk holds).
    `sample` ("bucket/slot" or "captions/i") is filled in by the reader when it knows it.
    """

    def __init__(self, path: str, error: OSError, attempts: int, sample: str | None = None):
        self.path, self.error, self.attempts, self.sample = path, error, attempts, sample
        what = f" (sample {sample})" if sample else ""
        reason = error.strerror or str(error) or type(error).__name__
        code = f" [errno {error.errno}]" if error.errno is not None else ""
        super().__init__(
            f"I/O error reading {path}{what}: {reason}{code}, {attempts} attempt(s); the storage "
            "failed, the sample was not found damaged, so --skip-damaged does not skip it: check "
            "the disk or filesystem and rerun"
        )

    def __reduce__(self) -> tuple:  # rebuilt whole when it crosses a process boundary
        return (StoreReadError, (self.path, self.error, self.attempts, self.sample))

    def for_sample(self, sample: str) -> StoreReadError:
        """The same error naming the sample it was reading."""
        return StoreReadError(self.path, self.error, self.attempts, sample)


def _show(value: Any) -> str:
    return "(absent)" if value is None else json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class RowPlan:
    """One planned stored row: its caption index into `StorePlan.captions` and its provenance."""

    caption: int
    provenance: dict


@dataclass(frozen=True)
class BucketPlan:
    """One bucket: pixel size, latent shape and its planned rows (row i is slot i)."""

    name: str
    frames: int
    height: int
    width: int
    latent_frames: int
    latent_h: int
    latent_w: int
    rows: list[RowPlan] = field(default_factory=list)


@dataclass(frozen=True)
class StorePlan:
    """Every bucket in plan order and the distinct captions (captions[0] is always "")."""

    buckets: list[BucketPlan]
    captions: list[str]


@dataclass(frozen=True)
class StoreLayout:
    """What each sample holds: moments (2C channels) or one posterior sample (C), K mask variants."""

    latent_channels: int
    latent_format: Literal["moments", "sample"]
    masks_per_sample: int
    text_len: int
    text_dim: int

    @property
    def stored_channels(self) -> int:
        return 2 * self.latent_channels if self.latent_format == "moments" else self.latent_channels

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> StoreLayout:
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise StoreError(
                f"{where}: attribute `layout` is incomplete or edited ({exc})"
            ) from exc


@dataclass(frozen=True)
class BucketInfo:
    """A bucket as the reader sees it; `slots` are the done slots, `planned` the planned rows."""

    name: str
    frames: int
    height: int
    width: int
    latent_shape: tuple[int, int, int, int]  # (F_lat, C, h, w) with C the VAE latent channels
    slots: np.ndarray
    planned: int = 0


# ---- JSON normalisation and fingerprints ----


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON serialisable")


def canonical_json(value: Any, what: str) -> str:
    """Sorted-key compact JSON: the one byte form hashed for fingerprints, plans and provenance."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} cannot be stored as JSON: {exc}") from exc


def normalise_json(value: Any, what: str) -> Any:
    """The value as it reads back from JSON (tuples become lists, Paths strings)."""
    return json.loads(canonical_json(value, what))


def fingerprint(settings: dict) -> str:
    """sha256 (hex) of the canonical JSON of `settings`: everything that shapes the contents."""
    return hashlib.sha256(canonical_json(settings, "settings").encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and (value or not prefix):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def settings_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Differing keys (nested dicts dotted) -> (old, new); None stands for an absent key."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = set(flat_old) | set(flat_new)
    return {
        k: (flat_old.get(k), flat_new.get(k)) for k in keys if flat_old.get(k) != flat_new.get(k)
    }


# ---- plan validation and plan digest ----


def latent_shape_of(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(F_lat, h, w) of a pixel clip: F_lat = (F - 1) // 4 + 1, h = H // 8, w = W // 8."""
    from cogfun.common.geometry import latent_shape_of as rule  # the rule's one home

    return rule(frames, height, width)


def validate_plan(plan: StorePlan, where: str) -> None:
    if not plan.captions or plan.captions[0] != "":
        raise StoreError(f'{where}: plan captions[0] must be the empty caption ""')
    if len(set(plan.captions)) != len(plan.captions):
        raise StoreError(f"{where}: plan captions must be distinct (each caption is stored once)")
    names = [b.name for b in plan.buckets]
    if len(set(names)) != len(names):
        raise StoreError(f"{where}: bucket names repeat in the plan: {names}")
    for b in plan.buckets:
        if not _SAFE_NAME.match(b.name):
            raise StoreError(f"{where}: bucket name {b.name!r} is not a safe folder name")
        expected = latent_shape_of(b.frames, b.height, b.width)
        if (b.latent_frames, b.latent_h, b.latent_w) != expected:
            raise StoreError(
                f"{where}: bucket {b.name} has {b.frames}x{b.height}x{b.width} pixels, so latent "
                f"shape {expected}, but the plan says {(b.latent_frames, b.latent_h, b.latent_w)}"
            )
        for i, row in enumerate(b.rows):
            if not 0 <= row.caption < len(plan.captions):
                raise StoreError(
                    f"{where}: bucket {b.name} row {i} caption index {row.caption} is outside "
                    f"0..{len(plan.captions) - 1}"
                )


def provenance_strings(bucket: BucketPlan) -> list[str]:
    return [
        canonical_json(r.provenance, f"provenance of {bucket.name} row {i}")
        for i, r in enumerate(bucket.rows)
    ]


def plan_digest(plan: StorePlan) -> str:
    """sha256 of everything the plan fixes: a store is resumed only with the plan it was made from."""
    h = hashlib.sha256()
    h.update(canonical_json(plan.captions, "captions").encode())
    for b in plan.buckets:
        head = [b.name, b.frames, b.height, b.width, b.latent_frames, b.latent_h, b.latent_w]
        h.update(canonical_json(head, b.name).encode())
        h.update(np.asarray([r.caption for r in b.rows], dtype="<i8").tobytes())
        for text in provenance_strings(b):
            h.update(len(text).to_bytes(8, "little") + text.encode())
    return h.hexdigest()


# ---- array specs: the one declaration of every array's shape, dtype and chunking ----


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
    specs.append(spec("checksum", (), "uint64", (), compressed=False))
    return specs


def plan_chunk_rows(n: int) -> int:
    """Rows per chunk of a bucket's `caption` and `provenance_hash` arrays (n rows planned)."""
    return max(1, min(n, PLAN_CHUNK_ROWS))


def plan_specs(n: int) -> list[ArraySpec]:
    """Plan-level arrays of one bucket, written at creation; `done` is written by finalize."""
    rows = plan_chunk_rows(n)
    return [
        ArraySpec("caption", (n,), "int64", (rows,)),
        ArraySpec("provenance_hash", (n,), "uint64", (rows,)),
        ArraySpec("provenance", (n,), "str", (max(1, min(n, PROVENANCE_CHUNK_ROWS)),)),
        ArraySpec("done", (n,), "uint8", (max(1, n),)),
    ]


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
        math.prod(s.shape[1:]) * np.dtype(s.dtype).itemsize for s in sample_specs(1, b, layout)
    )
    return per + 8


# ---- checksums ----


def checksum(parts: list[bytes]) -> int:
    """blake2b-64 over length-prefixed parts, never 0 (0 is the fill value: 'not written')."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest(), "little") or 1


def sample_checksum(
    bucket: str, slot: int, arrays: dict[str, np.ndarray], caption: int, provenance_hash: int
) -> int:
    """Checksum of one sample: its stored arrays' exact bytes, caption index, provenance hash."""
    parts = [bucket.encode(), int(slot).to_bytes(8, "little")]
    for name in ("latents", "masks", "masked_latents", "all_masked"):
        if name in arrays:
            a = arrays[name]
            parts.append(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    parts += [
        int(caption).to_bytes(8, "little", signed=True),
        int(provenance_hash).to_bytes(8, "little"),
    ]
    return checksum(parts)


def text_checksum(text: str) -> int:
    return checksum([text.encode()])


def caption_checksum(index: int, embedding: np.ndarray) -> int:
    """Checksum of caption `index`'s embedding bits (L, D)."""
    bits = np.ascontiguousarray(embedding, dtype="<u2").tobytes()
    return checksum([int(index).to_bytes(8, "little"), bits])

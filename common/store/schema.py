"""The store's schema: plan and layout types, errors, fingerprints, checksums and array specs.

Private helper of `cogfun.common.store` (import the public names from there). Nothing here touches
zarr; `store_write.py` and `store_read.py` do, and both take every name, shape and constant from here
so that the on-disk layout is declared once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cogfun.common.store.sums import checksum

SCHEMA_VERSION = 2  # 2: per-sample arrays sharded (common/store/shards.py); 1 is still read
READABLE_SCHEMAS = (1, 2)
STORE_FORMAT = "cogfun-store"  # root attribute `format`: tells a cogfun store from any Zarr group
FAILURES_DIR = "failures"  # one JSON file per failed input, beside the Zarr nodes

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


def brief(exc: BaseException) -> str:
    """An exception's first line: object-store clients append pages of debug detail."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _show(value: Any) -> str:
    return "(absent)" if value is None else json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class RowPlan:
    """One planned stored row: its caption index into `StorePlan.captions`, its provenance, its
    content `key` (what an incremental update matches rows by; "" derives one from the
    provenance) and whether it is `live` (served; a retired row keeps its bytes, unserved)."""

    caption: int
    provenance: dict
    key: str = ""
    live: bool = True


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


def row_keys(bucket: BucketPlan, provenance: list[str] | None = None) -> list[str]:
    """Each row's key: its own, or "p:" + the hash of its canonical provenance."""
    texts = provenance if provenance is not None else provenance_strings(bucket)
    return [
        r.key or f"p:{checksum([t.encode()]):016x}" for r, t in zip(bucket.rows, texts, strict=True)
    ]


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
        keys = row_keys(b)
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            twice = next(k for k in keys if k in seen or seen.add(k))
            raise StoreError(f"{where}: bucket {b.name} holds two rows with the key {twice!r}")
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
    """sha256 of everything the plan fixes (rows, their keys, draws, captions and which are live):
    every process of a run checks it opened the store the first process made or grew."""
    h = hashlib.sha256()
    h.update(canonical_json(plan.captions, "captions").encode())
    for b in plan.buckets:
        head = [b.name, b.frames, b.height, b.width, b.latent_frames, b.latent_h, b.latent_w]
        h.update(canonical_json(head, b.name).encode())
        h.update(np.asarray([r.caption for r in b.rows], dtype="<i8").tobytes())
        h.update(np.asarray([r.live for r in b.rows], dtype=np.uint8).tobytes())
        texts = provenance_strings(b)
        for text, key in zip(texts, row_keys(b, texts), strict=True):
            h.update(len(text).to_bytes(8, "little") + text.encode())
            h.update(len(key).to_bytes(8, "little") + key.encode())
    return h.hexdigest()

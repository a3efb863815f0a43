"""Whole-store scans: `digest`, `verify`, `summary` and the failure records.

Private helper of `cogfun.common.store`; `StoreReader` methods call these. They read every stored
sample, so they are for `cogfun inspect` and tests, never for opening a store.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np
from cogfun.common.store.io import disk_bytes
from cogfun.common.store.schema import (
    FAILURES_DIR,
    DamagedSample,
    StoreError,
)
from cogfun.common.store.specs import (
    raw_sample_bytes,
)
from cogfun.common.store.sums import (
    text_checksum,
)

if TYPE_CHECKING:
    from cogfun.common.store.read import StoreReader

SCAN_BATCH = 64  # samples per zarr read: zarr fetches the chunks of one read concurrently
_ARRAYS = ("latents", "masks", "masked_latents", "all_masked")


def failures(reader: StoreReader) -> list[dict]:
    """Recorded input failures: {key, file, reason, row}, sorted by row then file."""
    folder = reader.source / FAILURES_DIR
    out = []
    for name in sorted(n for n in folder.listdir() if n.endswith(".json")):
        entry = folder / name
        try:
            text = entry.read_text()
            if text is None:  # removed since the listing (a rerun clearing it): not a record
                continue
            record = json.loads(text)
            out.append({k: record.get(k) for k in ("key", "file", "reason", "row")})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            out.append(
                {
                    "key": entry.name,
                    "file": str(entry),
                    "reason": f"unreadable failure record: {exc}",
                    "row": None,
                }
            )
    return sorted(
        out,
        key=lambda r: (
            r["row"] is None,
            r["row"] if isinstance(r["row"], int) else 0,
            str(r["file"]),
        ),
    )


def _provenance(reader: StoreReader, name: str) -> np.ndarray:
    """A bucket's provenance strings (N,), or a StoreError naming the array (zarr and the codecs
    raise many types for one cause: a damaged chunk)."""
    try:
        return reader._bucket_arrays(name)["provenance"][:]
    except StoreError:
        raise
    except Exception as exc:
        where = reader.path / "buckets" / name / "provenance"
        raise StoreError(f"{where}: the provenance is unreadable: {exc}") from exc


def _field(h: hashlib._Hash, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def digest(reader: StoreReader) -> str:
    """sha256 over every served sample, ordered by bucket name and row key (schema 1: slot): its
    bucket, key, provenance, the decoded bytes of its arrays (all-masked latents substituted) and
    of its caption embedding. Independent of path, times, compression, chunk layout and of which
    slot a sample has: a store grown by incremental updates and a fresh store of the same dataset
    hold the same samples when their digests agree."""
    h = hashlib.sha256(b"cogfun-digest-v2")
    caption_hashes: dict[int, bytes] = {}
    for name in sorted(reader.buckets):
        info = reader.buckets[name]
        if not len(info.slots):
            continue
        provenance = _provenance(reader, name)
        keys = reader.row_keys(name)
        slots = info.slots[np.argsort(keys[info.slots], kind="stable")]
        for start in range(0, len(slots), SCAN_BATCH):
            batch = slots[start : start + SCAN_BATCH]
            data = reader.read_rows(name, batch, verify=True)
            for i, slot in enumerate(batch):
                _field(h, name.encode())
                _field(h, str(keys[slot]).encode())
                _field(h, str(provenance[slot]).encode())
                for array in _ARRAYS:
                    if array in data:
                        a = data[array][i]
                        _field(
                            h, np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
                        )
                c = int(data["caption"][i])
                if c not in caption_hashes:
                    caption_hashes[c] = hashlib.sha256(reader.caption_bits(c).tobytes()).digest()
                _field(h, caption_hashes[c])
    return h.hexdigest()


def _check_rows(reader: StoreReader, name: str, slots: np.ndarray, found: dict) -> None:
    """Read slots in batches; on damage, retry one by one so every damaged slot is named."""
    for start in range(0, len(slots), SCAN_BATCH):
        batch = slots[start : start + SCAN_BATCH]
        try:
            reader.read_rows(name, batch, verify=True)
        except DamagedSample:
            for s in batch:
                try:
                    reader.read_rows(name, np.asarray([s]), verify=True)
                except DamagedSample as exc:
                    source = f" (source {exc.file})" if exc.file else ""
                    found.setdefault((name, int(s)), exc.reason + source)


def verify(reader: StoreReader) -> list[tuple[str, int, str]]:
    """Full scan: every stored sample against its checksum, the done index against the done flags,
    provenance against its hash and every caption embedding in use. Returns (bucket, slot, reason);
    slot -1 means the bucket as a whole; bucket "captions" names caption indices."""
    found: dict[tuple[str, int], str] = {}
    needed: set[int] = set()
    for name, info in reader.buckets.items():
        try:
            captions, prov_hash = reader._plan_rows(name)
        except StoreError as exc:
            found[(name, -1)] = str(exc)
            continue
        try:
            provenance = _provenance(reader, name)
        except StoreError as exc:  # the samples themselves can still be checked
            found[(name, -1)] = str(exc)
            provenance = None
        flags = reader.done_flags(name)
        listed = np.zeros(info.planned, dtype=bool)
        listed[info.slots] = True
        for s in np.flatnonzero(listed & (flags == 0)):
            source = reader.source_file(name, int(s))
            found[(name, int(s))] = (
                "listed as done but its done flag (checksum chunk) is missing"
                + (f" (source {source})" if source else "")
            )
        present = np.flatnonzero(listed & (flags != 0))
        _check_rows(reader, name, present, found)
        for s in present if provenance is not None else []:
            if text_checksum(str(provenance[s])) != int(prov_hash[s]):
                found.setdefault(
                    (name, int(s)), "its provenance does not match the hash recorded at creation"
                )
        needed.update(int(c) for c in captions[present])
    if any(len(info.slots) for info in reader.buckets.values()):
        needed.add(0)
    for c in sorted(needed):
        try:
            reader.caption_bits(c)
        except StoreError as exc:
            found.setdefault(("captions", c), getattr(exc, "reason", str(exc)))
    return [(bucket, slot, reason) for (bucket, slot), reason in found.items()]


def summary(reader: StoreReader) -> dict:
    """Everything `cogfun inspect --json` prints (reads every sample for the digest)."""
    layout = reader.layout
    buckets, raw = [], 0
    for name, info in reader.buckets.items():
        count = len(info.slots)
        raw += count * raw_sample_bytes(info, layout)
        try:
            live = reader.live_rows(name)
        except StoreError:  # a damaged bucket: `verify` names it; count every row as planned
            live = np.ones(info.planned, dtype=bool)
        buckets.append(
            {
                "name": name,
                "count": count,
                "planned": int(live.sum()),
                "retired": info.planned - int(live.sum()),
                "frames": info.frames,
                "height": info.height,
                "width": info.width,
                "latent_shape": list(info.latent_shape),
                "bytes": disk_bytes(reader.source / "buckets" / name),
            }
        )
    captions_written = int((reader.caption_flags() != 0).sum())
    raw += captions_written * layout.text_len * layout.text_dim * 2
    total = disk_bytes(reader.source)
    try:
        store_digest, digest_error = digest(reader), None
    except StoreError as exc:
        store_digest, digest_error = None, str(exc)
    root = reader.root_attrs
    return {
        "path": str(reader.path),
        "status": reader.status,
        "schema_version": root["schema_version"],
        "samples": sum(b["count"] for b in buckets),
        "planned": sum(b["planned"] for b in buckets),
        "retired": sum(b["retired"] for b in buckets),
        "last_update": root.get("last_update"),
        "buckets": buckets,
        "captions": {"planned": int(root["captions"]), "written": captions_written},
        "failed": failures(reader),
        "fingerprint": reader.fingerprint,
        "settings": reader.settings,
        "attrs": reader.attrs,
        "layout": layout.to_json(),
        "compression": root.get("compression"),
        "bytes": total,
        "raw_bytes": raw,
        "compression_ratio": raw / total if total else 0.0,
        "digest": store_digest,
        "digest_error": digest_error,
        "created_at": root.get("created_at"),
        "finalized_at": root.get("finalized_at"),
    }

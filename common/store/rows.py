"""Reading sample rows and checking them against their checksums (`StoreReader.read_rows`).

Private helper of `cogfun.common.store`. A schema-2 store keeps, per sample, a checksum over the
sample and one per mask variant (`schema.sample_checksums`), so a reader can fetch the latents and
just the mask variants a training step uses (`variants`) and still verify every byte it read: the
variants it read against their own checksums, the rest of the sample against the sample's, which
covers the stored variant checksums. Schema-1 stores hold one checksum a sample and are always
read whole. On an object store the arrays of a batch are fetched in parallel (and each array's
shards, `fetch.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from cogfun.common.store.fetch import in_parallel
from cogfun.common.store.io import failed_slot, take_rows
from cogfun.common.store.schema import (
    StoreError,
    StoreReadError,
)
from cogfun.common.store.shards import ShardFiles
from cogfun.common.store.sums import (
    sample_checksum,
    sample_checksums,
    variant_checksum,
)

if TYPE_CHECKING:
    from cogfun.common.store.read import StoreReader

SAMPLE_ARRAYS = ("latents", "masks", "masked_latents", "all_masked")
VARIANT_ARRAYS = ("masks", "masked_latents")


def mismatch_reason(stored: int) -> str:
    if stored == 0:
        return "its done flag is missing (checksum chunk deleted or zeroed)"
    return "its contents do not match the checksum written with them (missing, truncated or altered chunk)"


def _picked(variants: Sequence[Iterable[int]], n: int, k: int) -> np.ndarray:
    """(B, K) bool: which variants of each row to read."""
    if len(variants) != n:
        raise StoreError(f"variants: {len(variants)} entries for {n} samples")
    picked = np.zeros((n, k), dtype=bool)
    for i, chosen in enumerate(variants):
        for j in chosen:
            if not 0 <= int(j) < k:
                raise StoreError(f"variant {j} is outside 0..{k - 1}")
            picked[i, int(j)] = True
    return picked


def _take_parts(files: ShardFiles, slots: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """Rows of a per-variant array with only the picked variants read (the others zeros): one
    `read_many` of every (row, variant) picked (on an object store, a request per shard)."""
    out = np.zeros((len(slots), *files.row_shape), dtype=files.dtype.newbyteorder("="))
    where, variant = np.nonzero(picked)
    if len(where):
        out[where, variant] = files.read_many(slots[where].tolist(), variant.tolist())[:, 0]
    return out


def read_rows(
    reader: StoreReader,
    bucket: str,
    slots: np.ndarray,
    verify: bool = True,
    variants: Sequence[Iterable[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Raw stacked arrays of done slots (uint16 bits, all-masked substituted, caption (B,)); with
    `variants` (one iterable of variant indices per slot), only those mask variants are read
    (`variants_read` (B, K) says which; the others are zeros)."""
    info = reader._info(bucket)
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    done = reader._done_mask(bucket)
    for s in slots:
        if not 0 <= s < info.planned or not done[s]:
            raise StoreError(
                f"{reader.path}: sample {bucket}/{s} is not in the store (never written, or failed)"
            )
    arrays = reader._bucket_arrays(bucket)
    files = reader._files[bucket]
    names = [n for n in SAMPLE_ARRAYS if n in arrays]
    k = reader.layout.masks_per_sample
    partial = (
        variants is not None
        and k > 0
        and all(
            isinstance(files.get(n), ShardFiles) and files[n].parts == k for n in VARIANT_ARRAYS
        )
    )
    picked = _picked(variants, len(slots), k) if partial else np.ones((len(slots), k), bool)
    reads = [
        lambda n=n: (
            _take_parts(files[n], slots, picked)
            if partial and n in VARIANT_ARRAYS
            else take_rows(arrays[n], files[n], slots)
        )
        for n in names
    ]
    if verify:
        reads.append(lambda: take_rows(arrays["checksum"], files["checksum"], slots))
    try:
        # On an object store the arrays' requests go out together, not one array after another.
        got = [read() for read in reads] if reader.path.local else in_parallel(reads)
        data = dict(zip(names, got, strict=False))
        sums = got[-1] if verify else None
    except StoreReadError as exc:
        raise exc.for_sample(f"{bucket}/{failed_slot(exc, slots)}") from exc.__cause__
    except Exception as exc:
        if len(slots) > 1:  # find which sample is unreadable
            for i, s in enumerate(slots):
                one = [variants[i]] if variants is not None else None
                read_rows(reader, bucket, np.asarray([s]), verify, one)
        raise reader._damaged(bucket, int(slots[0]), f"a chunk file is unreadable: {exc}") from exc
    captions, prov_hash = reader._plan_values(bucket, slots)  # (B,) each
    if sums is not None:
        for i, s in enumerate(slots):
            bad = _check(bucket, int(s), data, i, sums[i], picked[i], captions[i], prov_hash[i])
            if bad is not None:
                raise reader._damaged(bucket, int(s), bad)
    if "all_masked" in data and (data["all_masked"].astype(bool) & picked).any():
        shared = reader._shared_latents(bucket, int(slots[0]))
        data["masked_latents"][data["all_masked"].astype(bool) & picked] = shared
    data["caption"] = captions
    if k:
        data["variants_read"] = picked
    return data


def _check(
    bucket: str,
    slot: int,
    data: dict[str, np.ndarray],
    i: int,
    stored: np.ndarray,
    picked: np.ndarray,
    caption: int,
    prov_hash: int,
) -> str | None:
    """Why row i does not match its stored checksum(s), or None when it does."""
    one = {n: a[i] for n, a in data.items()}
    if np.ndim(stored) == 0:  # schema 1: one checksum over the whole sample
        expected = sample_checksum(bucket, slot, one, int(caption), int(prov_hash))
        return None if int(stored) == expected else mismatch_reason(int(stored))
    for j in np.flatnonzero(picked).tolist():
        got = variant_checksum(bucket, slot, j, one["masks"][j], one["masked_latents"][j])
        if got != int(stored[1 + j]):
            return mismatch_reason(int(stored[0]) and int(stored[1 + j]))
    expected = sample_checksums(bucket, slot, one, int(caption), int(prov_hash), stored[1:])
    return None if int(stored[0]) == int(expected[0]) else mismatch_reason(int(stored[0]))

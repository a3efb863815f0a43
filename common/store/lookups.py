"""The store reader's lookups besides sample rows: caption embeddings, plan rows (caption index,
provenance and its hash, row keys, live flags) of a bucket.

Private helper of `cogfun.common.store`: `StoreReader` (read.py) takes these methods from
`StoreLookups`, which relies on its `_bucket_arrays`, `_files`, `_info`, `_fill`, `_rows`,
`_arrays`, `_staged`, `root_attrs`, `layout` and `path`.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import zarr
from cogfun.common.store.io import from_bits, open_array, open_chunk_files, open_group, take_rows
from cogfun.common.store.schema import DamagedSample, StoreError, StoreReadError, brief
from cogfun.common.store.specs import caption_specs, plan_chunk_rows
from cogfun.common.store.sums import caption_checksum

_SOURCE_KEYS = ("file", "file_path", "path", "source")


class StoreLookups:
    """Caption and plan-row lookups of a `StoreReader`."""

    def _caption_arrays(self) -> dict[str, zarr.Array]:
        if "\0captions" not in self._arrays:
            with self._fill:
                if "\0captions" not in self._arrays:
                    m = int(self.root_attrs["captions"])
                    folder = self.path / "captions"
                    group = open_group(self._root, "captions", folder)
                    specs = caption_specs(m, self.layout)
                    self._files["\0captions"] = {
                        s.name: open_chunk_files(folder, s)
                        for s in specs
                        if s.name in ("embeddings", "checksum")
                    }
                    self._staged(self._files["\0captions"])
                    self._arrays["\0captions"] = {
                        s.name: open_array(group, folder, s) for s in specs
                    }
        return self._arrays["\0captions"]

    def _plan_rows(self, bucket: str) -> tuple[np.ndarray, np.ndarray]:
        """(caption index (N,), provenance hash (N,)) of a whole bucket (for scans)."""
        arrays = self._bucket_arrays(bucket)
        try:
            return np.asarray(arrays["caption"][:]), np.asarray(arrays["provenance_hash"][:])
        except Exception as exc:
            raise StoreError(
                f"{self.path / 'buckets' / bucket}: plan rows unreadable: {brief(exc)}"
            ) from exc

    def _plan_values(self, bucket: str, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(caption index, provenance hash) of `slots`, from the plan chunks that hold them: a
        chunk is read once (16 bytes a row, PLAN_CHUNK_ROWS rows), so the first batch of a
        100k-sample bucket reads no more than that of a 1k one."""
        rows = self._info(bucket).planned
        arrays = self._bucket_arrays(bucket)
        files = [self._files[bucket][name] for name in ("caption", "provenance_hash")]
        # The chunking the store was written with (PLAN_CHUNK_ROWS may have changed since).
        size = files[0].chunk_rows if files[0] is not None else plan_chunk_rows(rows)
        captions = np.empty(len(slots), dtype=np.int64)
        hashes = np.empty(len(slots), dtype=np.uint64)
        for chunk in np.unique(slots // size).tolist():
            key = (bucket, chunk)
            values = self._rows.get(key)  # one lookup: `_forget_cached` may drop it meanwhile
            if values is None:
                lo, hi = chunk * size, min((chunk + 1) * size, rows)
                try:
                    values = tuple(
                        f.read_chunk(chunk)[: hi - lo]  # straight from the chunk file
                        if f is not None and f.chunk_rows == size
                        else np.asarray(arrays[name][lo:hi])
                        for f, name in zip(files, ("caption", "provenance_hash"), strict=True)
                    )
                except Exception as exc:
                    raise StoreError(
                        f"{self.path / 'buckets' / bucket}: plan rows unreadable: {brief(exc)}"
                    ) from exc
                self._rows[key] = values  # one assignment of a finished value: no lock needed
            inside = slots // size == chunk
            captions[inside] = values[0][slots[inside] - chunk * size]
            hashes[inside] = values[1][slots[inside] - chunk * size]
        return captions, hashes

    def provenance(self, bucket: str, slot: int) -> dict:
        value = self._bucket_arrays(bucket)["provenance"][int(slot)]
        return json.loads(value.item() if isinstance(value, np.ndarray) else str(value))

    def live_rows(self, bucket: str) -> np.ndarray:
        """(N,) bool: the rows the dataset the store was last planned from has (the others are
        retired by an incremental update, not served; schema 1: every row)."""
        arrays = self._bucket_arrays(bucket)
        n = self._info(bucket).planned
        if "live" not in arrays or not n:
            return np.ones(n, dtype=bool)
        return np.asarray(arrays["live"][:], dtype=bool)

    def row_keys(self, bucket: str) -> np.ndarray:
        """(N,) every row's content key, as strings (schema 1 has none: "p:" and its provenance
        hash, the key a plan row without one gets)."""
        arrays = self._bucket_arrays(bucket)
        if "key" not in arrays:
            hashes = self._plan_rows(bucket)[1]
            return np.asarray([f"p:{int(v):016x}" for v in hashes], dtype=object)
        try:
            return np.asarray([str(k) for k in arrays["key"][:]], dtype=object)
        except Exception as exc:
            where = self.path / "buckets" / bucket / "key"
            raise StoreError(f"{where}: the row keys are unreadable: {brief(exc)}") from exc

    def source_file(self, bucket: str, slot: int) -> str | None:
        try:
            prov = self.provenance(bucket, slot)
        except Exception:  # the provenance itself may be what is damaged
            return None
        return next((str(prov[k]) for k in _SOURCE_KEYS if k in prov), None)

    def caption_bits(self, i: int) -> np.ndarray:
        """Caption i's embedding as uint16 bits (L, D), checksum verified."""
        i = int(i)
        arrays = self._caption_arrays()
        if not 0 <= i < arrays["embeddings"].shape[0]:
            raise StoreError(
                f"{self.path}: caption index {i} is outside 0..{arrays['embeddings'].shape[0] - 1}"
            )
        files = self._files["\0captions"]
        index = np.asarray([i])
        try:
            bits = take_rows(arrays["embeddings"], files["embeddings"], index)[0]
            stored = int(take_rows(arrays["checksum"], files["checksum"], index)[0])
        except StoreReadError as exc:
            raise exc.for_sample(f"captions/{i}") from exc.__cause__
        except Exception as exc:
            raise DamagedSample(
                "captions", i, f"a caption chunk file is unreadable: {brief(exc)}"
            ) from exc
        if stored == 0:
            raise DamagedSample(
                "captions",
                i,
                "this caption's embedding was never written (or its checksum was deleted)",
            )
        if caption_checksum(i, bits) != stored:
            raise DamagedSample("captions", i, "the caption embedding does not match its checksum")
        return bits

    def caption_embedding(self, i: int) -> torch.Tensor:
        """Caption i's T5 embedding (L, D) bf16, checksum verified (0 is the empty caption)."""
        return from_bits(self.caption_bits(i))

    def caption_texts(self) -> list[str]:
        return [str(t) for t in self._caption_arrays()["texts"][:]]

"""An I/O error while reading the store is the disk's failure, not the sample's: it is retried with
a doubling pause, then reported as `StoreReadError` naming the file and the sample, and
`--skip-damaged` does not skip it. Bytes that do not decode stay a `DamagedSample` (skippable)."""

from __future__ import annotations

import copy
import errno
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from cogfun.common.store import DamagedSample, StoreError, StoreReadError, open_store
from cogfun.common.store import chunks as store_chunks
from cogfun.testing.store_files import chunk_range, drop_chunk
from cogfun.train.data import StoreBatchDataset
from train_support import make_store

BUCKET = "f5_h8_w8"
READ = store_chunks.read_chunk_bytes


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path)


@pytest.fixture
def pauses(monkeypatch):
    """The pauses between attempts, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(store_chunks.time, "sleep", slept.append)
    return slept


def failing_reads(monkeypatch, chunk: tuple, failures: int | None):
    """Make reads of one chunk (`chunk_range`'s (shard file, offset, length)) raise EIO
    `failures` times (None: always); returns the count of read attempts per file."""
    target, offset, _ = chunk
    calls: Counter[str] = Counter()

    def read(path: str, start: int = 0, length: int | None = None) -> bytes | None:
        if str(path) == str(target) and start == offset:
            calls[path] += 1
            if failures is None or calls[path] <= failures:
                raise OSError(errno.EIO, "Input/output error", path)
        return READ(path, start, length)

    monkeypatch.setattr(store_chunks, "read_chunk_bytes", read)
    return calls


def latents_chunk(store, slot: int) -> tuple:
    return chunk_range(store, BUCKET, "latents", slot)


def test_a_passing_io_error_is_retried_and_the_read_succeeds(store, monkeypatch, pauses, caplog):
    clean = open_store(store).read_batch(BUCKET, [2, 3])
    calls = failing_reads(monkeypatch, latents_chunk(store, 3), failures=2)
    with caplog.at_level(logging.WARNING, logger="cogfun.common.store.chunks"):
        batch = open_store(store).read_batch(BUCKET, [2, 3])
    assert torch.equal(batch["latents"], clean["latents"])
    assert torch.equal(batch["caption"], clean["caption"])
    assert list(calls.values()) == [3]  # two failures, then the read that worked
    assert pauses == [0.1, 0.2]
    retries = [r.getMessage() for r in caplog.records if "reading again" in r.getMessage()]
    assert len(retries) == 2 and "Input/output error" in retries[0]
    assert "attempt 2 of 5" in retries[0] and "attempt 3 of 5" in retries[1]


def test_a_lasting_io_error_is_reported_as_an_io_error_naming_file_and_sample(
    store, monkeypatch, pauses
):
    calls = failing_reads(monkeypatch, latents_chunk(store, 3), failures=None)
    with pytest.raises(StoreReadError) as info:
        open_store(store).read_batch(BUCKET, [2, 3])
    err = info.value
    assert not isinstance(err, DamagedSample) and isinstance(err, StoreError)
    assert list(calls.values()) == [store_chunks.READ_ATTEMPTS] == [5]
    assert pauses == [0.1, 0.2, 0.4, 0.8]
    assert err.sample == f"{BUCKET}/3" and err.attempts == 5 and err.error.errno == errno.EIO
    assert err.path == f"{latents_chunk(store, 3)[0]}[3]"  # the shard file and the row
    message = str(err)
    assert message.startswith(f"I/O error reading {err.path} (sample {BUCKET}/3): ")
    assert "Input/output error [errno 5], 5 attempt(s)" in message
    assert "--skip-damaged does not skip it" in message and "damaged sample" not in message
    # Rebuilt whole by its __reduce__ (what a worker process's pipe uses too).
    again = copy.deepcopy(err)
    assert type(again) is StoreReadError and str(again) == message and again.sample == err.sample


def test_skip_damaged_skips_damage_but_not_an_io_error(store, monkeypatch, pauses, caplog):
    dataset = StoreBatchDataset(store, skip_damaged=True)
    # Damage: slot 3's latents chunk holds bytes that do not decode to its row.
    path, offset, length = latents_chunk(store, 3)
    raw = path.read_bytes()
    path.write_bytes(raw[:offset] + b"x" * length + raw[offset + length :])
    with pytest.raises(DamagedSample, match=rf"damaged sample {BUCKET}/3"):
        open_store(store).read_batch(BUCKET, [2, 3])
    with caplog.at_level(logging.WARNING, logger="cogfun.train.data"):
        batch = dataset[(BUCKET, [2, 3, 4])]
    assert batch["slots"] == [2, 4] and batch["latents"].shape[0] == 2
    assert any(f"skipping damaged sample {BUCKET}/3" in r.getMessage() for r in caplog.records)
    # An I/O error on slot 4 is not skipped, --skip-damaged or not.
    failing_reads(monkeypatch, latents_chunk(store, 4), failures=None)
    with pytest.raises(StoreReadError, match=rf"\(sample {BUCKET}/4\)"):
        StoreBatchDataset(store, skip_damaged=True)[(BUCKET, [2, 4])]
    assert len(pauses) == 4


def test_an_io_error_reading_a_caption_names_the_caption(store, monkeypatch, pauses):
    reader = open_store(store)
    clean = reader.caption_bits(1)
    calls = failing_reads(
        monkeypatch, chunk_range(store, "captions", "embeddings", 1), failures=None
    )
    with pytest.raises(StoreReadError, match=r"\(sample captions/1\)"):
        open_store(store).caption_bits(1)
    assert sum(calls.values()) == 5
    # After one failure the caption reads as before.
    calls = failing_reads(monkeypatch, chunk_range(store, "captions", "embeddings", 2), failures=1)
    assert np.array_equal(open_store(store).caption_bits(1), clean)
    open_store(store).caption_bits(2)
    assert sum(calls.values()) == 2


def test_a_missing_chunk_is_not_an_io_error(store, pauses):
    """A chunk gone from its shard reads as zarr's fill value, so its checksum catches it: damage,
    no retry."""
    drop_chunk(store, BUCKET, "latents", 1)
    with pytest.raises(DamagedSample, match=rf"{BUCKET}/1"):
        open_store(store).read_batch(BUCKET, [1])
    assert pauses == []

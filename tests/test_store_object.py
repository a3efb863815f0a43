"""A store on an object store (moto's S3 server on 127.0.0.1): the same bytes and promises as a
local store, creation without renames, reads sent together, I/O errors after the retries, and the
local cache folder of a finished store."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cogfun.common.store import (
    Location,
    StoreError,
    StoreReadError,
    clear_failures,
    location,
    open_for_write,
    open_store,
)
from cogfun.common.store import chunks as store_chunks
from cogfun.testing.store_files import flip_byte
from store_support import (
    ATTRS,
    IMAGE,
    LAYOUT,
    SETTINGS,
    VIDEO,
    bits,
    make_plan,
    sample,
    write_store,
)

FAST = {"retries": 2, "retry_backoff_s": 0.05}  # a stopped server fails within a second
SAMPLE_ARRAYS = ("latents", "masks", "masked_latents", "all_masked", "checksum")


def remote(server, bucket: str, name: str = "s.zarr") -> Location:
    return location(f"s3://{bucket}/runs/{name}", server.options(**FAST))


def objects(server, bucket: str) -> set[str]:
    """Every key in the bucket."""
    return {key for key, _ in location(f"s3://{bucket}", server.options()).walk()}


def files(folder) -> set[str]:
    """Every file under a local folder, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def written(s3_server, tmp_path_factory) -> SimpleNamespace:
    """One store on S3 (5 + 2 samples, 2 a shard) and the same writes into a local folder."""
    if not s3_server.running:
        s3_server.start()
    bucket, plan = s3_server.make_bucket(), make_plan(5)
    store, local = remote(s3_server, bucket), tmp_path_factory.mktemp("object") / "s.zarr"
    writer = write_store(store, plan, shard_samples=2)
    write_store(local, plan, shard_samples=2)
    return SimpleNamespace(bucket=bucket, store=store, local=local, writer=writer, plan=plan)


def test_a_store_on_s3_holds_what_a_local_store_holds(s3_server, written):
    r, ref = open_store(written.store), open_store(written.local)
    assert str(r.path) == f"s3://{written.bucket}/runs/s.zarr"
    assert r.digest() == ref.digest() and r.verify() == []
    for bucket, slots in ((VIDEO, [2, 0, 4]), (IMAGE, [1, 0])):
        got, want = r.read_batch(bucket, slots), ref.read_batch(bucket, slots)
        for name in ("latents", "masks", "masked_latents"):
            assert np.array_equal(bits(got[name]), bits(want[name]))
        assert got["caption"].tolist() == want["caption"].tolist()
    latents = r.read_sample(VIDEO, 2)["latents"]
    assert np.array_equal(bits(latents), bits(sample(written.plan, VIDEO, 2)["latents"]))
    # The same files as the local store, under the store's prefix and nowhere else: no staged
    # chunk left, no creation marker, no zarr.json above the prefix.
    keys = objects(s3_server, written.bucket)
    assert keys == {f"runs/s.zarr/{f}" for f in files(written.local)}
    assert not any(".staged" in k or ".creating" in k for k in keys)
    # Failure records are objects too.
    written.writer.record_failure("clip9", "clips/v9.mp4", "cannot decode", 9)
    assert open_store(written.store).failures() == [
        {"key": "clip9", "file": "clips/v9.mp4", "reason": "cannot decode", "row": 9}
    ]
    clear_failures(written.store)
    assert open_store(written.store).failures() == []
    assert objects(s3_server, written.bucket) == keys


def test_a_creator_killed_mid_way_is_redone(s3_server, s3_bucket, written, monkeypatch):
    store = remote(s3_server, s3_bucket)

    class Killed(Exception):
        pass

    real = Location.write

    def dies_at_the_captions(self, data):  # a creator killed while it uploads the new store
        if "/captions/" in str(self):
            raise Killed
        real(self, data)

    monkeypatch.setattr(Location, "write", dies_at_the_captions)
    with pytest.raises(Killed):
        write_store(store, written.plan, shard_samples=2)
    monkeypatch.undo()
    left = objects(s3_server, s3_bucket)
    assert "runs/s.zarr/.creating" in left and "runs/s.zarr/zarr.json" not in left
    assert f"runs/s.zarr/buckets/{VIDEO}/latents/zarr.json" in left
    with pytest.raises(StoreError, match=r"creation is under way or was interrupted"):
        open_store(store)
    with pytest.raises(StoreError, match=r"^no store at s3://.*/runs/s\.zarr: the first process"):
        open_for_write(
            store, settings=SETTINGS, attrs=ATTRS, plan=written.plan, layout=LAYOUT, create=False
        )
    write_store(store, written.plan, shard_samples=2)  # the next creator starts again
    assert open_store(store).digest() == open_store(written.local).digest()
    assert objects(s3_server, s3_bucket) == {f"runs/s.zarr/{f}" for f in files(written.local)}


def test_a_foreign_prefix_is_refused(s3_server, s3_bucket):
    store = remote(s3_server, s3_bucket)
    (store / "notes.txt").write(b"someone else's")
    with pytest.raises(StoreError) as info:
        write_store(store, make_plan(1))
    assert str(info.value) == (
        f"s3://{s3_bucket}/runs/s.zarr exists and is not a cogfun store: choose another store path"
    )
    assert objects(s3_server, s3_bucket) == {"runs/s.zarr/notes.txt"}


def test_a_batch_is_one_ranges_request_per_shard(written, monkeypatch):
    want = open_store(written.local).read_batch(VIDEO, [4, 0, 1, 2])
    ranges: list[tuple[str, str, int]] = []
    singles: list[str] = []
    real_ranges, real_read = Location.read_ranges, store_chunks.read_chunk_bytes

    def count_ranges(self, spans):
        ranges.append((self.parent.name, self.name, len(spans)))
        return real_ranges(self, spans)

    def count_read(path, start=0, length=None):
        singles.append(f"{path.parent.name}/{path.name}@{start}")
        return real_read(path, start, length)

    monkeypatch.setattr(Location, "read_ranges", count_ranges)
    monkeypatch.setattr(store_chunks, "read_chunk_bytes", count_read)
    got = open_store(written.store).read_batch(VIDEO, [4, 0, 1, 2])  # shards 2, 0, 0, 1
    for name in ("latents", "masks", "masked_latents"):
        assert np.array_equal(bits(got[name]), bits(want[name]))
    # One request per array and shard, for every chunk the batch needs from it (none for a
    # shard whose chunks are all empty: variant 0 of row 0's masked_latents, all-masked, stored
    # as zeros). The arrays of tiny rows (checksum, all_masked) are read whole instead, once a
    # shard, and kept: the next batch from those shards asks for nothing of them.
    per_shard = {"latents": (2, 1, 1), "masks": (4, 2, 2), "masked_latents": (3, 2, 2)}
    assert sorted((a, f.split(".")[1], n) for a, f, n in ranges) == sorted(
        (a, str(s), n) for a, counts in per_shard.items() for s, n in enumerate(counts) if n
    )
    # Besides them, each shard's index (its tail) is read alone, and the small arrays' shards
    # whole (from byte 0): checksum's 3, all_masked's one with a stored chunk (row 0's).
    sample_reads = [s for s in singles if s.split("/")[0] in SAMPLE_ARRAYS]
    tails = [s for s in sample_reads if "@-" in s]
    wholes = sorted(s for s in sample_reads if s.endswith("@0"))
    assert len(tails) == len(SAMPLE_ARRAYS) * 3 and len(sample_reads) == len(tails) + 4
    assert wholes == [
        "all_masked/c.0.0@0",
        "checksum/c.0.0@0",
        "checksum/c.1.0@0",
        "checksum/c.2.0@0",
    ]
    ranges.clear(), singles.clear()
    reader = open_store(written.store)
    reader.read_batch(VIDEO, [4, 0, 1, 2])
    singles.clear()
    reader.read_batch(VIDEO, [3])
    assert not [s for s in singles if s.split("/")[0] in ("checksum", "all_masked")]


def test_verify_names_a_sample_whose_shard_object_was_altered(written):
    flipped = flip_byte(written.store, VIDEO, "masks", 3, part=1)
    try:
        shard = f"s3://{written.bucket}/runs/s.zarr/buckets/{VIDEO}/masks/c.1.0.0.0.0.0"
        assert str(flipped) == shard
        found = open_store(written.store).verify()
    finally:
        flip_byte(written.store, VIDEO, "masks", 3, part=1)  # the same bit back
    assert [(b, s) for b, s, _ in found] == [(VIDEO, 3)]
    assert "(source clips/v3.mp4)" in found[0][2]
    assert open_store(written.store).verify() == []


def test_an_unreachable_store_is_an_io_error_naming_the_object(s3_server, written):
    r = open_store(written.store)
    want = r.read_batch(VIDEO, [1])
    s3_server.stop()
    try:
        with pytest.raises(StoreReadError) as info:
            r.read_batch(VIDEO, [1])
    finally:
        s3_server.start()
    err = info.value
    shard = f"s3://{written.bucket}/runs/s.zarr/buckets/{VIDEO}/latents/c.0.0.0.0.0"
    assert (err.path, err.sample, err.attempts) == (f"{shard}[1]", f"{VIDEO}/1", 2)
    assert str(err).startswith(f"I/O error reading {shard}[1] (sample {VIDEO}/1): GET {shard} ")
    assert "failed 2 times" in str(err) and "--skip-damaged does not skip it" in str(err)
    got = r.read_batch(VIDEO, [1])  # the server is back: the same reader reads again
    assert np.array_equal(bits(got["latents"]), bits(want["latents"]))


def test_the_cache_folder_serves_reads_and_a_new_version_gets_its_own(
    s3_server, s3_bucket, tmp_path
):
    store, cache = remote(s3_server, s3_bucket), tmp_path / "cache"
    write_store(store, make_plan(3))
    r = open_store(store, cache_dir=cache)
    want = r.read_batch(VIDEO, [0, 2])
    assert r.path.fs.misses > 0 and str(r.path) == str(store)
    (first,) = [p.name for p in cache.iterdir()]
    s3_server.stop()
    try:
        got = r.read_batch(VIDEO, [0, 2])  # every chunk from the cache folder
        with pytest.raises(StoreReadError, match=r"c\.0\.0\.0\.0\.0\[1\]"):
            r.read_batch(VIDEO, [1])  # never read before: the server is really gone
    finally:
        s3_server.start()
    assert r.path.fs.hits > 0
    for name in ("latents", "masks", "masked_latents"):
        assert np.array_equal(bits(got[name]), bits(want[name]))
    # Grown and finalized again (its shard 0 sealed anew): a new namespace, the new bytes.
    plan = make_plan(4)
    w = open_for_write(store, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=True)
    w.write_sample(VIDEO, 3, **sample(plan, VIDEO, 3))
    w.finalize()
    again = open_store(store, cache_dir=cache)
    latents = again.read_sample(VIDEO, 3)["latents"]
    assert np.array_equal(bits(latents), bits(sample(plan, VIDEO, 3)["latents"]))
    namespace = Path(again.path.fs.folder).name
    assert namespace != first and sorted(p.name for p in cache.iterdir()) == sorted(
        [first, namespace]
    )
    # A copy (what a loader worker gets) reopens the store through the same cache namespace.
    clone = copy.copy(again)
    assert clone.path.fs.folder == again.path.fs.folder and str(clone.path) == str(store)


def test_a_seal_deletes_its_staged_objects_in_bulk(s3_server, s3_bucket):
    """Sealing a shard removes its staged objects with one DeleteObjects request per array, not
    a DELETE per object; none of that shard's is left."""
    store = remote(s3_server, s3_bucket)
    w = write_store(store, make_plan(4), shard_samples=4, finalize=False)
    bucket = store / "buckets" / VIDEO

    def staged() -> list[str]:
        return [k for k, _ in bucket.walk() if "/.staged/" in k]

    before = staged()
    s3_server.requests.clear()
    w.seal(VIDEO, 0)
    served = list(s3_server.requests)
    assert not [p for m, p in served if m == "DELETE"]
    bulk = [p for m, p in served if m == "POST" and p.endswith("?delete")]
    arrays = {k.split("/")[0] for k in before}
    assert len(bulk) == len(arrays) == len(SAMPLE_ARRAYS)  # one request per array
    assert len(before) >= 4 * len(arrays) and staged() == []  # 4 rows (masks: K parts each)
    w.finalize()
    r = open_store(store)
    assert r.verify() == [] and len(r.buckets[VIDEO].slots) == 4


def test_an_endpoint_without_bulk_delete_gets_one_delete_an_object(
    s3_server, s3_bucket, monkeypatch
):
    """An S3-compatible endpoint that answers DeleteObjects with 501 Not Implemented: not
    retried, and the objects are deleted one by one instead."""
    import obstore

    store = remote(s3_server, s3_bucket)
    folder = store / "x"
    for name in ("a", "b", "c"):
        (folder / name).write(b"1")
    real = obstore.delete
    bulk: list[int] = []

    def no_bulk(client, paths):
        if isinstance(paths, list):
            bulk.append(len(paths))
            raise obstore.exceptions.GenericError("Received HTTP status: 501 Not Implemented")
        return real(client, paths)

    monkeypatch.setattr(obstore, "delete", no_bulk)
    folder.delete_many(["a", "b", "missing"])
    assert bulk == [3]  # one bulk attempt, not retried
    assert sorted(folder.listdir()) == ["c"]


def test_a_damaged_cache_entry_is_read_again_from_the_object_store(
    s3_server, s3_bucket, tmp_path, caplog
):
    """A cache disk that flipped a bit in a cached shard: the sample fails its checksum through
    the cache, its bucket's entries are removed and it is read again from S3 (one warning, the
    right bytes); the next reader finds good entries. Damage in S3 itself stays DamagedSample."""
    from cogfun.common.store import DamagedSample
    from cogfun.common.store.cache import key_digest

    store, cache = remote(s3_server, s3_bucket), tmp_path / "cache"
    write_store(store, make_plan(3))
    first = open_store(store, cache_dir=cache)
    want = first.read_batch(VIDEO, [0, 1])
    latents = store / "buckets" / VIDEO / "latents"
    digests = {key_digest(f"{latents.key}/{rel}") for rel, _ in latents.walk()}
    folder = Path(first.path.fs.folder)
    entries = [p.name.partition(".") for p in folder.iterdir()]
    # The latents shard's chunk ranges, START-LENGTH (not its index, a suffix -N-None, nor the
    # array's zarr.json, whole: 0-None).
    ranges = [f"{d}.{tag}" for d, _, tag in entries if d in digests and tag[0] != "-"]
    damaged = [folder / name for name in ranges if not name.endswith("-None")]
    assert len(damaged) == 2 and all(p.stat().st_size > 500 for p in damaged)  # rows 0 and 1
    for entry in damaged:
        raw = bytearray(entry.read_bytes())
        raw[len(raw) // 2] ^= 0x40  # the same size: a hit, not a miss
        entry.write_bytes(bytes(raw))
    caplog.set_level("WARNING", logger="cogfun.common.store.read")
    again = open_store(store, cache_dir=cache)
    got = again.read_batch(VIDEO, [0, 1])
    for name in ("latents", "masks", "masked_latents"):
        assert np.array_equal(bits(got[name]), bits(want[name]))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"sample {VIDEO}/0 failed its checksum as read through the cache folder" in warning
    assert again.path.fs.misses > 0
    caplog.clear()
    third = open_store(store, cache_dir=cache)
    got = third.read_batch(VIDEO, [0, 1])
    assert np.array_equal(bits(got["latents"]), bits(want["latents"]))
    assert third.path.fs.misses == 0 and third.path.fs.hits > 0 and not caplog.records
    # Damage in the object itself: read again from S3, damaged again, and named.
    flip_byte(store, VIDEO, "latents", 1)
    fresh = open_store(store, cache_dir=tmp_path / "cache2")
    with pytest.raises(DamagedSample, match=rf"damaged sample {VIDEO}/1 "):
        fresh.read_batch(VIDEO, [1])
    misses = fresh.path.fs.misses
    with pytest.raises(DamagedSample, match=rf"damaged sample {VIDEO}/1 "):
        fresh.read_batch(VIDEO, [1])  # known damaged at the source: no second eviction
    assert fresh.path.fs.misses == misses


def test_a_creation_marker_whose_put_response_was_lost_is_known_as_ours(
    s3_server, s3_bucket, written, monkeypatch
):
    """The conditional PUT of the `.creating` marker landed but its answer was lost, and the
    retry found the object there: the creator reads it back, finds its own, and goes on."""
    store = remote(s3_server, s3_bucket, "lost.zarr")
    real = Location.create

    def lost_answer(self, data):
        real(self, data)
        return False

    monkeypatch.setattr(Location, "create", lost_answer)
    write_store(store, written.plan, shard_samples=2)
    monkeypatch.setattr(Location, "create", real)
    assert open_store(store).digest() == open_store(written.local).digest()
    assert not (store / ".creating").is_file()

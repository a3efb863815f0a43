"""Location: the same file rules on a local folder and on an object store (moto's S3 server),
the object store's retries, and the local read cache."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time

import pytest
from cogfun.common.store import StoreError
from cogfun.common.store.location import location, parse_options
from cogfun.common.store.objects import ObjectFS, ObjectStoreIOError

DATA = bytes(range(256)) * 4  # 1024 bytes, every offset recognisable
OBJECTS_LOG = "cogfun.common.store.objects"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An empty folder: a local one, or a prefix of a fresh bucket."""
    if request.param == "local":
        return location(tmp_path / "root")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return location(f"s3://{bucket}/root", server.options(retries=2, retry_backoff_s=0.05))


def put(loc, data: bytes) -> None:
    loc.parent.mkdir()  # a local folder must exist; object stores have none
    loc.write(data)


def test_whole_files_and_byte_ranges(root):
    f = root / "a" / "data.bin"
    put(f, DATA)
    assert f.read() == DATA and f.size() == 1024 and f.is_file()
    assert (root / "a").is_dir() and not (root / "a").is_file() and root.exists()
    assert f.read(10, 5) == DATA[10:15]
    assert f.read(1000) == DATA[1000:]
    assert f.read(1020, 10) == DATA[1020:]  # a range past the end stops at the end
    assert f.read(5, 0) == b""
    assert f.read(-7) == DATA[-7:]
    assert f.read(-7, 3) == DATA[-7:-4]
    assert f.read(-5000) == DATA  # a file shorter than the suffix is read whole
    assert f.read_ranges([(0, 3), (100, 4), (1020, 4)]) == [DATA[:3], DATA[100:104], DATA[1020:]]
    text = root / "a" / "note.txt"
    text.write_text("héllo")
    assert text.read_text() == "héllo" and text.read() == "héllo".encode()


def test_a_missing_file_reads_none(root):
    missing = root / "nothing" / "here.bin"
    assert missing.read() is None and missing.read(4, 4) is None and missing.read(-4) is None
    assert missing.read_ranges([(0, 1)]) is None and missing.read_versioned() is None
    assert missing.size() is None and not missing.is_file() and not missing.exists()
    assert missing.parent.listdir() == [] and list(missing.parent.walk()) == []
    missing.delete()  # nothing to delete is no error


def test_create_and_replace_are_conditional(root):
    f = root / "lease"
    f.parent.mkdir()
    assert f.create(b"one") is True
    assert f.create(b"two") is False and f.read() == b"one"
    data, version = f.read_versioned()
    assert data == b"one"
    newer = f.replace(b"three", version)
    assert newer is not None and newer != version and f.read_versioned() == (b"three", newer)
    assert f.replace(b"four", version) is None  # a stale version: nothing written
    assert f.read() == b"three"
    f.delete()
    assert f.replace(b"five", newer) is None and f.read() is None


def test_streamed_writes_and_deletes(root):
    f = root / "shard"
    pieces = [b"ab", b"", b"cd" * 1000, DATA]
    put(f, b"old")
    f.write(iter(pieces))
    assert f.read() == b"".join(pieces)
    f.write(None)
    assert f.read() is None


def test_listing_walking_and_deleting_a_tree(root):
    tree = root / "tree"
    files = {"x": b"1", "sub/y": b"22", "sub/deep/z": b"333"}
    for rel, data in files.items():
        f = tree
        for part in rel.split("/"):
            f = f / part
        put(f, data)
    put(root / "beside", b"4")
    assert sorted(tree.listdir()) == ["sub", "x"]
    assert sorted((tree / "sub").listdir()) == ["deep", "y"]
    assert sorted(tree.walk()) == [("sub/deep/z", 3), ("sub/y", 2), ("x", 1)]
    tree.delete_tree()
    assert tree.listdir() == [] and list(tree.walk()) == [] and not tree.exists()
    assert root.listdir() == ["beside"]


def test_an_s3_location_pickles_with_its_options(s3_server, s3_bucket, monkeypatch):
    url = f"s3://{s3_bucket}/p/data.bin"
    options = s3_server.options(retries=2)
    loc = location(url, options)
    loc.write(DATA)
    assert pickle.dumps(loc)  # a DataLoader worker receives it this way
    rebuild, args = loc.__reduce__()  # what unpickling runs, without unpickling
    assert args == (url, options)
    monkeypatch.setattr(ObjectFS, "_cache", {})  # a fresh process: no client to share
    copy = rebuild(*args)
    assert copy.fs is not loc.fs and copy.fs.options == options and copy.fs.retries == 2
    assert str(copy) == url and copy.read() == DATA
    local = location("relative/store.zarr")
    assert local.__reduce__()[1] == (os.path.abspath("relative/store.zarr"), None)


def test_storage_options_and_urls_are_checked_by_name():
    assert parse_options("") == {} and parse_options('{"retries": 2}') == {"retries": 2}
    with pytest.raises(StoreError, match="--storage-options: not valid JSON"):
        parse_options("{endpoint: x}")
    with pytest.raises(StoreError, match="--storage-options: expected a JSON object, got list"):
        parse_options("[1]")
    with pytest.raises(StoreError, match="ftp://host/x: unsupported URL scheme 'ftp'"):
        location("ftp://host/x")
    with pytest.raises(StoreError, match="s3:///x: the URL names no bucket"):
        location("s3:///x")
    assert location("file:///tmp/store.zarr").local
    with pytest.raises(StoreError, match="retries must be >= 1"):
        location("s3://some-bucket/x", {"retries": 0})


def test_a_dead_server_fails_after_the_retries_naming_the_url(s3_server, s3_bucket, caplog):
    url = f"s3://{s3_bucket}/r/data.bin"
    loc = location(url, s3_server.options(retries=3, retry_backoff_s=0.05))
    loc.write(DATA)
    s3_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger=OBJECTS_LOG):
            with pytest.raises(ObjectStoreIOError) as failed:
                loc.read()
    finally:
        s3_server.start()
    assert f"GET {url} failed 3 times" in str(failed.value) and failed.value.attempts == 3
    warnings = [r for r in caplog.records if r.name == OBJECTS_LOG]
    assert len(warnings) == 2 and "(attempt 3 of 3)" in warnings[-1].getMessage()
    assert loc.read() == DATA


def test_a_read_survives_a_server_restart_within_its_retries(s3_server, s3_bucket, caplog):
    loc = location(
        f"s3://{s3_bucket}/r/data.bin", s3_server.options(retries=6, retry_backoff_s=0.2)
    )
    loc.write(DATA)
    s3_server.stop()
    restart = threading.Thread(target=lambda: (time.sleep(0.3), s3_server.start()))
    restart.start()
    try:
        with caplog.at_level(logging.WARNING, logger=OBJECTS_LOG):
            assert loc.read(-24) == DATA[-24:]
    finally:
        restart.join()
        if not s3_server.running:
            s3_server.start()
    assert any(r.name == OBJECTS_LOG for r in caplog.records)  # it did fail first


def test_the_read_cache_hits_serves_offline_and_prunes(s3_server, s3_bucket, tmp_path):
    loc = location(f"s3://{s3_bucket}/c/data.bin", s3_server.options(retries=1))
    loc.write(DATA)
    cached = loc.cached(tmp_path / "cache", "ns", max_bytes=1000)
    fs = cached.fs
    assert cached.read(0, 300) == DATA[:300] and (fs.hits, fs.misses) == (0, 1)
    assert cached.read(0, 300) == DATA[:300] and (fs.hits, fs.misses) == (1, 1)
    assert cached.read_ranges([(0, 300), (300, 10)]) == [DATA[:300], DATA[300:310]]
    assert (fs.hits, fs.misses) == (2, 2)
    s3_server.stop()
    try:
        assert cached.read(0, 300) == DATA[:300]  # no server needed for what is cached
        assert cached.read_ranges([(300, 10)]) == [DATA[300:310]]
        with pytest.raises(ObjectStoreIOError):
            cached.read(600, 10)
    finally:
        s3_server.start()
    for start in (310, 610, 700):  # 300 + 10 + 3 * 300 bytes: over 1000, pruned to <= 800
        time.sleep(0.01)  # distinct modification times: the oldest entries go first
        assert cached.read(start, 300) == DATA[start : start + 300]
    folder = tmp_path / "cache" / "ns"
    sizes = sorted(p.stat().st_size for p in folder.iterdir())
    assert sum(sizes) <= 800 and sizes == [300, 300]
    hits = fs.hits
    assert cached.read(700, 300) == DATA[700:1000] and fs.hits == hits + 1  # the newest stayed
    assert cached.read(0, 300) == DATA[:300] and fs.hits == hits + 1  # the oldest went
    local = location(tmp_path / "local")
    assert local.cached(tmp_path / "cache", "ns") is local


def test_a_hit_touches_its_entry_at_most_once_a_minute(s3_server, s3_bucket, tmp_path, monkeypatch):
    """The entries' mtimes are the LRU order: a hit refreshes its entry's, but not again within
    TOUCH_EVERY_S (a syscall saved on nearly every hit)."""
    from cogfun.common.store import cache

    loc = location(f"s3://{s3_bucket}/t/data.bin", s3_server.options(retries=1))
    loc.write(DATA)
    cached = loc.cached(tmp_path / "cache", "ns")
    assert cached.read(0, 300) == DATA[:300]  # a miss: the entry written
    (entry,) = (tmp_path / "cache" / "ns").iterdir()
    os.utime(entry, (1, 1))  # long ago
    assert cached.read(0, 300) == DATA[:300] and entry.stat().st_mtime > 1e9  # touched
    os.utime(entry, (1, 1))
    assert cached.read(0, 300) == DATA[:300] and entry.stat().st_mtime == 1  # not again
    later = time.monotonic() + cache.TOUCH_EVERY_S + 1
    monkeypatch.setattr(cache.time, "monotonic", lambda: later)
    assert cached.read(0, 300) == DATA[:300] and entry.stat().st_mtime > 1e9
    assert cached.fs.hits == 3


def _s3(s3_server, s3_bucket, name: str = "root"):
    return location(f"s3://{s3_bucket}/{name}", s3_server.options(retries=3, retry_backoff_s=0.05))


def test_suffix_reads_without_suffix_ranges_give_the_same_bytes(s3_server, s3_bucket):
    """Azure takes no suffix range: there a suffix read asks the size, then a bounded range."""
    f = _s3(s3_server, s3_bucket) / "data.bin"
    f.write(DATA)
    f.fs.suffix_ranges = False
    try:
        assert f.read(-7) == DATA[-7:] and f.read(-7, 3) == DATA[-7:-4]
        assert f.read(-5000) == DATA and (f.parent / "none").read(-4) is None
    finally:
        f.fs.suffix_ranges = True


def test_a_request_the_client_refuses_is_not_retried(s3_server, s3_bucket, monkeypatch):
    import obstore
    import obstore.exceptions as oe

    f = _s3(s3_server, s3_bucket) / "data.bin"
    calls = []

    def refused(*args, **kwargs):
        calls.append(1)
        raise oe.NotSupportedError("not supported by this store")

    monkeypatch.setattr(obstore, "get", refused)
    with pytest.raises(StoreError, match=f"GET {f}: this object store does not support it"):
        f.read()
    assert calls == [1]


def test_a_tree_is_deleted_root_metadata_first_and_a_creation_marker_last(
    s3_server, s3_bucket, monkeypatch
):
    import obstore

    root = _s3(s3_server, s3_bucket)
    for key in ("zarr.json", ".creating", "buckets/b/zarr.json", "captions/zarr.json"):
        (root / key).write(b"x")
    order: list[str] = []
    real = obstore.delete

    def record(store, paths):
        order.extend([paths] if isinstance(paths, str) else paths)
        return real(store, paths)

    monkeypatch.setattr(obstore, "delete", record)
    root.delete_tree()
    assert order[0] == "root/zarr.json" and order[-2:] == ["root/.creating", "root"]
    assert list(root.walk()) == []


def test_a_forked_child_connects_anew(s3_server, s3_bucket, monkeypatch):
    f = _s3(s3_server, s3_bucket) / "data.bin"
    f.write(DATA)
    parent = f.fs._store
    monkeypatch.setattr(os, "getpid", lambda: -12345)  # as in a forked DataLoader worker
    assert f.fs._store is not parent and f.read() == DATA


def test_the_cache_limit_covers_every_version_and_a_torn_entry_is_a_miss(
    s3_server, s3_bucket, tmp_path
):
    f = _s3(s3_server, s3_bucket) / "data.bin"
    f.write(DATA)
    old = f.cached(tmp_path / "cache", "old-version")
    for i in range(8):
        old.read(i * 100, 100)  # 800 bytes of an older store version's entries
    time.sleep(0.02)
    new = f.cached(tmp_path / "cache", "new-version", max_bytes=1000)  # measured at open: fine
    new.read(0, 300)  # 1100 bytes in all: pruned to 800, the oldest entries first
    sizes = {
        d.name: sum(e.stat().st_size for e in os.scandir(d)) for d in (tmp_path / "cache").iterdir()
    }
    assert sum(sizes.values()) <= 800 and sizes["new-version"] == 300
    entry = next((tmp_path / "cache" / "new-version").iterdir())
    entry.write_bytes(b"")  # a crash left an empty entry behind its rename
    hits = new.fs.hits
    assert new.read(0, 300) == DATA[:300] and new.fs.hits == hits  # fetched again
    assert entry.stat().st_size == 300
